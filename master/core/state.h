// The broker core's own records: tasks, jobs, workers, task classes and the effects a locked
// section leaves to do once its lock is released. Internal to master/core.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "common/inline_bytes.h"
#include "master/core/task.h"
#include "spdlog/spdlog.h"

namespace taskmaster::core {

struct Job;
struct Worker;

struct QueueCounters {
  int64_t ready = 0;  // PENDING
  int64_t delayed = 0;
  int64_t leased = 0;
  // Since the master started.
  int64_t submitted = 0;
  int64_t succeeded = 0;
  int64_t failed = 0;       // failed attempts: reported, or a lost lease
  int64_t retried = 0;      // failed attempts followed by another
  int64_t redelivered = 0;  // of those, lost leases
  int64_t reclaimed = 0;    // lost leases taken back by their worker (and no longer failed)
  int64_t dead = 0;
  int64_t cancelled = 0;
};

struct ReadyEntry {
  uint64_t seq;
  TaskId id;
  bool operator<(const ReadyEntry& o) const { return seq < o.seq; }
};

// Tasks of one (queue, kind, required labels): a worker either can run all of them or none, so
// dispatch looks only at the classes a worker is eligible for.
struct TaskClass {
  std::string queue;
  std::string kind;
  Labels labels;
  QueueCounters* counters;
  KindTimesView* times;  // its kind's (shared with the other classes of the kind)
  // Ready tasks: highest priority first, FIFO within one. Entries of tasks that left PENDING
  // since are skipped when they reach the front (their seq no longer matches).
  std::map<int32_t, std::deque<ReadyEntry>, std::greater<>> ready;
  // Tasks of the class the master knows, finished ones included: with none left it is freed.
  int64_t tasks = 0;
};

struct TaskNotes {
  std::string output;
  std::string error;
  std::string idempotency_key;
  std::string worker;  // name of the last worker that held it
  // Set from lease until the worker reports or the lease is lost. Here, not in Task: a leased task
  // has notes anyway (`worker`), and a pending one spares the pointer.
  Worker* leased_to = nullptr;
};

inline const std::string kNone;

struct Task {
  TaskNotes& Notes() {
    if (!notes) notes = std::make_unique<TaskNotes>();
    return *notes;
  }
  const std::string& output() const { return notes ? notes->output : kNone; }
  const std::string& error() const { return notes ? notes->error : kNone; }
  const std::string& key() const { return notes ? notes->idempotency_key : kNone; }
  const std::string& worker() const { return notes ? notes->worker : kNone; }
  uint64_t completion_seq() const { return IsFinished(state) ? seq : 0; }
  int64_t not_before_ms() const { return state == TaskState::kDelayed ? at_ms : 0; }
  Worker* leased_to() const { return notes ? notes->leased_to : nullptr; }

  TaskId id = 0;
  Job* job = nullptr;
  TaskClass* cls = nullptr;
  InlineBytes payload;
  // What most pending tasks lack, kept apart so that a million pending tasks stay small.
  std::unique_ptr<TaskNotes> notes;
  int64_t created_ms = 0;
  // The time its state turns on: ready since (PENDING), leased since, finished at; DELAYED, when
  // it becomes ready. Read for the times metrics observe, as finished_ms and as not_before_ms.
  int64_t at_ms = 0;
  int64_t timeout_ms = 0;
  // Its place: unfinished, in its ready list; finished, in the order of finishing across all
  // tasks. A finished task never waits again, so one field serves both.
  uint64_t seq = 0;
  int32_t priority = 0;
  int32_t attempts = 0;
  int32_t max_attempts = 0;
  TaskState state = TaskState::kPending;
  bool dirty = false;  // changed since the store last heard of it
  // Back to waiting because its lease was lost, not because a result came: its worker may still
  // return with it (see Adopt).
  bool lease_lost = false;
};

// One tenant's use of the master, for its limits.
struct Account {
  int64_t unfinished = 0;  // tasks submitted and not finished (pending, delayed, leased)
  // Submit-rate allowance in tasks: refills at the rate up to one second's worth; a batch may
  // overdraw it, and the next waits until it is positive again.
  double allowance = 0;
  int64_t refilled_ms = -1;  // -1: never used (starts full)
  int64_t open_jobs = 0;     // jobs taking more batches (see Job::open)
};

struct Job {
  std::string id;
  std::string tenant;
  Account* account = nullptr;
  int64_t total = 0;
  int64_t done = 0;
  int64_t succeeded = 0;
  int64_t dead = 0;
  int64_t cancelled = 0;
  int64_t created_ms = 0;
  // Submitted, not yet on disk: invisible to clients and workers until the store has it, and
  // forgotten without a trace if the store fails to write it.
  bool staged = false;
  // Takes more batches until a submit closes it (or it idles past the open-job timeout); only a
  // closed job completes.
  bool open = false;
  int64_t batches = 1;      // submit calls applied
  int64_t appended_ms = 0;  // when the latest one was
  bool idle_check = false;  // has its entry in Impl::idle_checks_
  // With a persistent store, a batch on its way to disk: its tasks belong to this staged job,
  // unseen, and join this one once durable (their rows already name this job). Its `open` is what
  // this job's becomes then.
  std::unique_ptr<Job> append;
  std::vector<TaskId> tasks;
  std::vector<TaskId> completed;  // completion order
  std::vector<std::shared_ptr<JobWatcher>> watchers;
};

struct Worker {
  std::string id;
  std::string name;
  std::string host;
  std::vector<std::string> kinds;   // sorted
  std::vector<std::string> queues;  // sorted
  Labels labels;
  int32_t slots = 1;
  int32_t credits = 0;
  uint64_t generation = 0;
  bool connected = false;
  bool draining = false;
  int32_t stuck = 0;  // handlers past their deadline, as its last heartbeat said
  int64_t connected_ms = 0;
  int64_t disconnected_ms = 0;
  // Its last heartbeat: all its leases expire together when none came for the lease timeout.
  int64_t heard_ms = 0;
  // Given in its first welcome: a later hello under its id must show it (ids are visible to any
  // client, and must not let another stream take its leases).
  std::string secret;
  std::shared_ptr<WorkerChannel> channel;
  std::unordered_set<TaskId> leases;
  // Its handlers' average time per task, as it last said (0: it never said): dispatch fills a
  // fast worker in one message rather than spread tasks one per worker (PackDepth).
  int64_t task_us = 0;
  std::vector<TaskClass*> eligible;
  WorkerOutbound outbox;    // collected under the lock, sent after it
  size_t outbox_bytes = 0;  // of the tasks in the outbox, not yet in the channel's backlog
  bool dirty = false;
};

// Whether `w` may run the tasks of `c` (its queues, kinds and labels allow it).
bool CanRun(const Worker& w, const TaskClass& c);
// Sorted without repeats: how a worker's kinds and queues are kept, for CanRun's binary search.
std::vector<std::string> SortedUnique(std::vector<std::string> v);
// "kind 'k' on queue 'q' with labels a=b", for messages.
std::string DescribeClass(const TaskClass& c);

// What a locked section leaves to do once the lock is released.
struct Effects {
  std::vector<std::pair<std::shared_ptr<WorkerChannel>, WorkerOutbound>> sends;
  std::vector<std::shared_ptr<JobWatcher>> notify;
  uint64_t finished_through = 0;         // highest completion_seq given out in this section
  std::vector<std::string> reveal_jobs;  // jobs with results to show once they are durable
  std::unordered_set<Job*> touched;
  // Log lines, written once the lock is released.
  std::vector<std::pair<spdlog::level::level_enum, std::string>> logs;
};

template <typename... Args>
void Log(Effects& fx, spdlog::level::level_enum level, fmt::format_string<Args...> format,
         Args&&... args) {
  fx.logs.emplace_back(level, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace taskmaster::core
