// The part every durable store shares: the broker's changes queue in memory (no I/O under the
// broker's lock), and one writer thread commits everything queued since its last commit in one
// transaction (group commit), answers Submit and Flush once it is durable, and retries a commit
// that failed for a reason worth retrying. A store (SQLite, PostgreSQL) supplies the commit.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "master/store/completer.h"
#include "master/store/store.h"
#include "spdlog/logger.h"

namespace taskmaster {

// One queued change. Changes to the same task within a batch collapse into one.
struct StoreChange {
  enum class Kind : uint8_t {
    kSubmit,
    kUpdateTask,
    kDeleteTask,
    kDeleteJob,
    kPutWorker,
    kDeleteWorker,
    kNone
  };
  Kind kind = Kind::kNone;
  TaskId task_id = 0;    // kUpdateTask, kDeleteTask
  TaskStatusRow status;  // kUpdateTask
  std::string key;       // kDeleteJob: the job; kPutWorker, kDeleteWorker: the worker
  std::string secret;    // kPutWorker
  // kSubmit: the rows, and who waits for them to be written or refused.
  std::unique_ptr<SubmitRows> submit;
  std::function<void(absl::Status)> submitted;
  // kSubmit: a commit that held it failed in a way that may have written it (kRetryAll): if it
  // is given up on after all, its client must not be told that nothing was kept.
  bool maybe_written = false;
};

// What a store does when a commit fails.
enum class CommitFailure {
  // Nothing of it was written: submits are refused (their clients told), other changes retried.
  kRefuseSubmits,
  // It may or may not have been written (a lost connection): every change, submits included, is
  // retried until a commit succeeds, and the commit must apply a batch twice harmlessly.
  kRetryAll,
};

// The error of a submit that a failed commit may have written, when it is given up on (the
// store closed, or lost its right to write): UNKNOWN, which clients do not retry blindly.
absl::Status MaybeWrittenError(const absl::Status& why);

class QueuedStore : public Store {
 public:
  ~QueuedStore() override;

  absl::Status Load(RecoveryVisitor* visitor) final;
  absl::Status Writable() const final;
  StoreMetrics Metrics() const final;
  void Submit(SubmitRows rows, std::function<void(absl::Status)> done) final;
  void UpdateTask(TaskId id, TaskStatusRow status) final;
  void DeleteTask(TaskId id) final;
  void DeleteJob(const std::string& job_id) final;
  void PutWorker(const WorkerRow& worker) final;
  void DeleteWorker(const std::string& worker_id) final;
  void Flush(std::function<void(absl::Status)> done) final;
  // A subclass calls it first in its destructor: the writer must end before what it uses does.
  void Close() final;

 protected:
  // `writes_leases`: false for a store that does not keep leases (a worker claims its task back
  // after a restart): a lease then never replaces the status queued before it.
  QueuedStore(std::shared_ptr<spdlog::logger> log, int64_t retry_interval_ms,
              bool writes_leases = true)
      : log_(std::move(log)),
        retry_interval_ms_(retry_interval_ms),
        writes_leases_(writes_leases) {}

  // Starts the writer thread; once, after whatever Commit uses is ready.
  void StartWriter();

  // Reads the stored state; the writer commits nothing meanwhile.
  virtual absl::Status LoadRecords(RecoveryVisitor* visitor) = 0;
  // Writes `batch` in one transaction; on the writer thread only.
  virtual absl::Status Commit(const std::vector<StoreChange>& batch) = 0;
  // After each commit, on the writer thread: how a failure is handled (a store may also end the
  // process on an error it cannot retry, or make room to retry in).
  virtual CommitFailure AfterCommit(const absl::Status& status) = 0;

  // A commit failed in a way no retry can mend: logs why, `status` and then `why`, and ends the
  // process (exit code 70, EX_SOFTWARE) without running anything more. Nothing unwritten was
  // acknowledged; recovery, or another master, starts from what is stored.
  [[noreturn]] void StopTheMaster(const absl::Status& status, std::string_view why);

  const std::shared_ptr<spdlog::logger> log_;

 private:
  StoreChange& Append(StoreChange::Kind kind) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WriterLoop();
  void StopWriting() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static absl::Status ClosedError();
  void Answer(std::function<void(absl::Status)> done, absl::Status status);
  void Requeue(std::vector<StoreChange> failed) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SleepUnlessStopping(int64_t ms);

  const int64_t retry_interval_ms_;  // between a failed commit and the next try
  const bool writes_leases_;
  std::thread writer_;
  Completer completer_;

  mutable absl::Mutex mu_;
  std::vector<StoreChange> pending_ ABSL_GUARDED_BY(mu_);
  // task → its change in pending_
  std::unordered_map<TaskId, size_t> task_ops_ ABSL_GUARDED_BY(mu_);
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;  // changes recorded
  uint64_t durable_ ABSL_GUARDED_BY(mu_) = 0;  // changes committed
  std::vector<std::pair<uint64_t, std::function<void(absl::Status)>>> waiters_ ABSL_GUARDED_BY(mu_);
  StoreMetrics metrics_ ABSL_GUARDED_BY(mu_);  // of the commits that succeeded
  absl::Status error_ ABSL_GUARDED_BY(mu_);    // the last commit's error, OK once one succeeds
  bool stop_ ABSL_GUARDED_BY(mu_) = false;     // Close began
  // Load reads the store: the writer waits, as a connection takes one thread at a time.
  bool loading_ ABSL_GUARDED_BY(mu_) = false;
  bool writer_done_ ABSL_GUARDED_BY(mu_) = false;  // the writer ended: nothing more is written
};

}  // namespace taskmaster
