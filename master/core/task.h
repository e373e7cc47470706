#pragma once

// Plain types the broker core shares with its store and its service layer. No gRPC, no SQLite.

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/histogram.h"

namespace taskmaster {

using TaskId = uint64_t;
using Labels = std::map<std::string, std::string>;

enum class TaskState : uint8_t { kPending, kDelayed, kLeased, kSucceeded, kDead, kCancelled };

std::string_view TaskStateName(TaskState state);
inline bool IsFinished(TaskState s) {
  return s == TaskState::kSucceeded || s == TaskState::kDead || s == TaskState::kCancelled;
}

// Who makes a client call. Jobs and tasks belong to the tenant that submitted them, and exist
// only for callers of that tenant, or callers that see all (admins).
struct Caller {
  std::string tenant;  // "" is the default tenant
  bool sees_all = false;
};

// One task as a client submits it.
struct TaskSpec {
  std::string queue;  // empty: "default"
  std::string kind;
  std::string payload;
  int32_t priority = 0;
  int64_t delay_ms = 0;
  int64_t timeout_ms = 0;    // 0: the master's default
  int32_t max_attempts = 0;  // 0: the master's default
  std::string idempotency_key;
  Labels labels;  // required worker labels
};

// Where a submit's tasks go. A job of any size is built from several calls: the first opens it
// (keep_open), each later one appends batch 1, 2, ... to it, and one without keep_open closes it.
struct SubmitTarget {
  std::string job_id;      // empty: a new job
  int64_t batch = 0;       // with job_id: the number of this batch in the job
  bool keep_open = false;  // the job takes more batches, and cannot complete until closed
};

// A consistent copy of one task, for status and results.
// How far a running task has come, as its handler reported it.
struct TaskProgress {
  TaskId id = 0;
  int32_t attempt = 0;
  int64_t done = 0;
  int64_t total = 0;  // 0: unknown
  std::string message;
  int64_t updated_ms = 0;  // set by the master
};

struct TaskView {
  TaskId id = 0;
  std::string job_id;
  std::string queue;
  std::string kind;
  TaskState state = TaskState::kPending;
  int32_t attempts = 0;
  int32_t max_attempts = 0;
  int32_t priority = 0;
  std::string payload;
  std::string output;
  std::string error;
  std::string worker;
  std::string waiting_for;  // why a pending task has not started; set by GetTask only
  bool settled = true;      // false while its final state is not on disk yet (GetTask only)
  int64_t created_ms = 0;
  int64_t finished_ms = 0;
  int64_t not_before_ms = 0;
  std::optional<TaskProgress> progress;  // while leased, once reported; set by GetTask only
};

// What a result costs in a reply beyond its output and error: its ids, names, counts and times
// with their protobuf framing come to well under this; replies are cut by the sum.
inline constexpr size_t kResultOverheadBytes = 64;
inline size_t ResultBytes(const TaskView& v) {
  return v.output.size() + v.error.size() + kResultOverheadBytes;
}

// How many running tasks' progress GetJob shows.
inline constexpr size_t kMaxRunningShown = 10;

struct JobView {
  std::string job_id;
  int64_t total = 0;
  int64_t done = 0;
  int64_t succeeded = 0;
  int64_t dead = 0;
  int64_t cancelled = 0;
  int64_t created_ms = 0;
  bool open = false;  // takes more batches; it completes only once closed
  // GetJob only: the latest progress of running tasks, most recent first, at most
  // kMaxRunningShown.
  std::vector<TaskProgress> running;
};

struct SubmitOutcome {
  std::string job_id;
  std::vector<TaskId> task_ids;       // in the order of the request
  std::vector<std::string> warnings;  // e.g. no connected worker runs a kind
  int64_t batch = 0;                  // the number of this batch in its job (0: the first)
  // The batch had been applied before (a retry after a lost answer): nothing was added, and
  // task_ids is empty.
  bool duplicate = false;
};

struct JobEvents {
  std::vector<TaskView> results;  // finished tasks after the cursor, in completion order
  JobView progress;
};

struct QueueStatsView {
  std::string queue;
  int64_t pending = 0;  // PENDING and DELAYED now
  int64_t delayed = 0;  // of those, DELAYED (a delay or a retry's backoff)
  int64_t leased = 0;   // now
  // How long the oldest PENDING task has waited to be leased (0 with none): the head of each of
  // its ready lists, where a task given back keeps its place and counts from its submission.
  int64_t oldest_ready_age_ms = 0;
  // Totals since the master started.
  int64_t submitted = 0;
  int64_t succeeded = 0;
  int64_t failed = 0;       // failed attempts, retried or not (reported, or a lost lease)
  int64_t retried = 0;      // failed attempts followed by another
  int64_t redelivered = 0;  // of those, lost leases (the worker went silent)
  int64_t reclaimed = 0;    // lost leases their worker came back with (then not failed)
  int64_t dead = 0;
  int64_t cancelled = 0;
};

// Adds `from`'s counts to `into`'s (the oldest age stays): one queue over several partitions, or
// several queues summed under one name.
void AddCounts(QueueStatsView& into, const QueueStatsView& from);

struct WorkerView {
  std::string worker_id;
  std::string name;
  std::string host;
  std::vector<std::string> kinds;
  std::vector<std::string> queues;
  Labels labels;
  int32_t slots = 0;
  int32_t running = 0;
  bool connected = false;
  bool draining = false;
  int64_t connected_ms = 0;
  int32_t stuck = 0;  // as the worker's last heartbeat said
  // Since its last heartbeat: a connected worker silent for long is likely cut off, and loses its
  // leases at the lease timeout.
  int64_t heartbeat_age_ms = 0;
  // Connected, but unheard for BrokerOptions::SilentAfterMs: likely cut off.
  bool silent = false;
};

// A failed attempt, as the status page lists the latest ones.
struct FailureView {
  int64_t time_ms = 0;
  TaskId task_id = 0;
  std::string job_id;
  std::string queue;
  std::string kind;
  std::string worker;
  int32_t attempt = 0;
  bool dead = false;  // its last attempt (else it is retried)
  std::string error;
};

// Per kind, how long tasks waited from ready to leased and ran from leased to their result.
struct KindTimesView {
  std::string kind;  // kOtherKinds past BrokerOptions::max_metric_kinds
  Histogram wait_seconds{kTaskSecondsBuckets};
  Histogram run_seconds{kTaskSecondsBuckets};
};
inline constexpr char kOtherKinds[] = "(other)";

// ---- The worker stream, in core terms ----

struct TaskRef {
  TaskId id = 0;
  int32_t attempt = 0;
  bool operator==(const TaskRef&) const = default;
};

struct WorkerHello {
  std::string worker_id;
  std::string name;
  std::string host;
  std::vector<std::string> kinds;
  std::vector<std::string> queues;  // empty: {"default"}
  Labels labels;
  int32_t slots = 1;
  std::vector<TaskRef> held;  // tasks kept from an earlier stream of the same worker
  std::string master_epoch;   // the epoch `held` came from
  std::string secret;         // from its earlier welcome: proves the id is its own
};

struct LeasedTask {
  TaskId id = 0;
  int32_t attempt = 0;
  std::string kind;
  std::string payload;
  int64_t timeout_ms = 0;
  std::string queue;
};

enum class Outcome : uint8_t { kSucceeded, kFailed, kCancelled, kReturned };

struct TaskReport {
  TaskId id = 0;
  int32_t attempt = 0;
  Outcome outcome = Outcome::kSucceeded;
  std::string output;
  std::string error;
  bool permanent = false;  // a failure that retrying cannot fix
};

struct Welcome {
  std::string master_epoch;
  int64_t heartbeat_interval_ms = 0;
  int64_t lease_timeout_ms = 0;
  std::vector<TaskRef> revoked;
  std::string secret;      // the worker shows it in a later hello to keep its id
  int32_t partitions = 1;  // the worker holds a stream to the owner of each
};

// What the master sends a worker; any combination of fields in one message.
struct WorkerOutbound {
  std::optional<Welcome> welcome;
  std::vector<LeasedTask> tasks;
  std::vector<TaskId> cancel;
  std::vector<TaskRef> acked;
  bool shutting_down = false;
  int64_t heartbeat_echo = 0;

  bool empty() const {
    return !welcome && tasks.empty() && cancel.empty() && acked.empty() && !shutting_down &&
           heartbeat_echo == 0;
  }
};

// The service's end of one worker stream. Send is called without any broker lock held, from
// any thread, and must not block.
class WorkerChannel {
 public:
  virtual ~WorkerChannel() = default;
  virtual void Send(WorkerOutbound message) = 0;
  // Bytes of tasks sent that the worker has not read yet. Called under the broker's lock: it
  // must not block.
  virtual size_t Backlog() const { return 0; }
};

// Told when a job has new results; must not block (read them with Broker::ReadJob).
class JobWatcher {
 public:
  virtual ~JobWatcher() = default;
  virtual void OnJobChanged() = 0;
};

}  // namespace taskmaster
