// The store interface: the rows the broker core persists and the calls it makes to persist
// and recover them. Plain types only, as the core includes it.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/histogram.h"
#include "master/core/task.h"

namespace taskmaster {

// What a task can change into after it was submitted.
struct TaskStatusRow {
  TaskState state = TaskState::kPending;
  int32_t attempts = 0;
  int64_t not_before_ms = 0;
  int64_t finished_ms = 0;
  uint64_t seq = 0;             // FIFO position among ready tasks
  uint64_t completion_seq = 0;  // order in which tasks finished; 0 while unfinished
  std::string output;
  std::string error;
  std::string worker;     // name of the worker holding it or that held it last
  std::string worker_id;  // id of the worker holding its lease (LEASED only)
};

// A task as stored: what it was submitted with, and its status.
struct TaskRow {
  TaskId id = 0;
  std::string job_id;
  std::string queue;
  std::string kind;
  Labels labels;
  std::string payload;
  int32_t priority = 0;
  int32_t max_attempts = 0;
  int64_t timeout_ms = 0;
  int64_t created_ms = 0;
  std::string idempotency_key;
  TaskStatusRow status;
};

struct JobRow {
  std::string job_id;
  int64_t total = 0;
  int64_t created_ms = 0;
  std::string tenant;
  bool open = false;    // takes more batches (see SubmitTarget)
  int64_t batches = 1;  // submit calls applied to it
};

// A task of another job that a job follows through a resubmitted idempotency key. `position` is
// its place in the job's completion order when it had finished before the job was created,
// -1 when it finished later (its completion_seq orders it then).
struct JobMemberRow {
  std::string job_id;
  TaskId task_id = 0;
  int64_t position = -1;
};

// A worker attached to the master, and the secret it must show to attach again under its id.
struct WorkerRow {
  std::string worker_id;
  std::string secret;
};

// One submit: a job with its new tasks and the tasks of other jobs it follows through
// idempotency keys. A store writes it whole in one transaction, or not at all. A batch appended
// to an open job carries the job's row as it becomes (its new total, batches and open flag),
// which replaces the stored one.
struct SubmitRows {
  JobRow job;
  std::vector<TaskRow> tasks;
  std::vector<JobMemberRow> members;
};

// Receives a store's contents at start, jobs first, then tasks, then job members.
class RecoveryVisitor {
 public:
  virtual ~RecoveryVisitor() = default;
  virtual void OnJob(JobRow job) = 0;
  virtual void OnTask(TaskRow task) = 0;
  virtual void OnJobMember(JobMemberRow member) = 0;
  // The highest task id ever stored, deleted tasks included: ids are never reused.
  virtual void OnHighestTaskId(TaskId id) = 0;
  // A worker that was attached (or within its reconnect grace) when the master stopped.
  virtual void OnWorker(WorkerRow worker) = 0;
};

// Where the broker's state persists.
//
// The broker records its changes in order while holding its own lock, so the change methods must
// not do I/O: they queue. Flush asks for durability; a store commits everything queued since its
// last commit in one transaction (group commit), so a burst of submits costs one fsync.
//
// Implementations are thread-safe.
// What a store's commits took, for metrics.
struct StoreMetrics {
  Histogram commit_seconds{kCommitSecondsBuckets};
  Histogram commit_changes{kBatchSizeBuckets};  // changes (rows) per commit
};

class Store {
 public:
  virtual ~Store() = default;

  // Identifies this store's contents. It changes when the state is lost (a memory store that
  // restarted), so workers and clients can tell that ids they hold no longer mean anything.
  virtual std::string Epoch() const = 0;

  // False for a store that keeps nothing: the broker then skips building rows.
  virtual bool persistent() const = 0;

  // Replays the stored state into `visitor`, only records that check out (each task's job
  // exists, each job has its tasks); damage is an error naming it. Called once, before any
  // change.
  virtual absl::Status Load(RecoveryVisitor* visitor) = 0;

  // OK while writes succeed; the error that stops them otherwise (disk full, I/O error). New
  // work is refused with it, while acknowledged work waits in memory to be written.
  virtual absl::Status Writable() const = 0;

  // Its commits so far; a store that commits nothing (memory) has none.
  virtual StoreMetrics Metrics() const { return {}; }

  // ---- Changes, in the broker's order. No I/O. ----

  // Queues a submit as one unit that no commit splits. `done` runs once it is durable, or with
  // the error that kept it off the disk: then nothing of it was written and nothing ever will
  // be, so the broker can forget it and tell the client so.
  virtual void Submit(SubmitRows rows, std::function<void(absl::Status)> done) = 0;
  virtual void UpdateTask(TaskId id, TaskStatusRow status) = 0;
  virtual void DeleteTask(TaskId id) = 0;
  virtual void DeleteJob(const std::string& job_id) = 0;
  // Workers attached now: after a restart the master waits for them to claim what they hold.
  virtual void PutWorker(const WorkerRow& worker) = 0;
  virtual void DeleteWorker(const std::string& worker_id) = 0;

  // Runs `done` once every change recorded before the call is durable, or with the error that
  // prevented it (the changes stay queued and are retried). `done` may run inline or on the
  // store's own thread, never with a broker lock held.
  virtual void Flush(std::function<void(absl::Status)> done) = 0;

  // Writes what it can, runs every callback it still holds (with the error that kept its change
  // off the disk, if any), and stops: no callback runs after Close returns, and callbacks that
  // call Submit or Flush meanwhile are answered too. Nothing may call the store afterwards.
  // Idempotent.
  virtual void Close() = 0;
};

}  // namespace taskmaster
