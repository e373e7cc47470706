// The queue and writer thread every durable store shares (see queued_store.h).
#include "master/store/queued_store.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace taskmaster {

QueuedStore::~QueuedStore() { Close(); }

// Called by the broker, then again by the destructors: the second call finds both threads joined
// already.
void QueuedStore::Close() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  // The writer commits what it can and hands over its last callbacks; the completer runs them and
  // any they cause, then ends.
  if (writer_.joinable()) writer_.join();
  completer_.Close();
}

void QueuedStore::StartWriter() {
  writer_ = std::thread([this] { WriterLoop(); });
}

absl::Status QueuedStore::Load(RecoveryVisitor* visitor) {
  {
    absl::MutexLock lock(&mu_);
    // Nothing queued yet, so the writer has no commit under way: with loading_ set it starts
    // none, and the connection is the loader's alone.
    if (version_ != 0) {
      return absl::FailedPreconditionError("the store is loaded before any change, once");
    }
    loading_ = true;
  }
  absl::Status loaded = LoadRecords(visitor);
  absl::MutexLock lock(&mu_);
  loading_ = false;
  return loaded;
}

StoreMetrics QueuedStore::Metrics() const {
  absl::MutexLock lock(&mu_);
  return metrics_;
}

absl::Status QueuedStore::Writable() const {
  absl::MutexLock lock(&mu_);
  return error_;
}

void QueuedStore::Submit(SubmitRows rows, std::function<void(absl::Status)> done) {
  auto owned = std::make_unique<SubmitRows>(std::move(rows));
  {
    absl::MutexLock lock(&mu_);
    if (!writer_done_) {
      StoreChange& op = Append(StoreChange::Kind::kSubmit);
      op.submit = std::move(owned);
      op.submitted = std::move(done);
      return;
    }
  }
  Answer(std::move(done), ClosedError());
}

void QueuedStore::UpdateTask(TaskId id, TaskStatusRow status) {
  // Not kept: the task's status before its lease (queued, or written) is what recovery reads.
  if (!writes_leases_ && status.state == TaskState::kLeased) return;
  absl::MutexLock lock(&mu_);
  ++version_;
  if (auto it = task_ops_.find(id); it != task_ops_.end()) {
    StoreChange& earlier = pending_[it->second];
    if (earlier.kind == StoreChange::Kind::kUpdateTask) {
      earlier.status = std::move(status);
      return;
    }
  }
  StoreChange& op = Append(StoreChange::Kind::kUpdateTask);
  op.task_id = id;
  op.status = std::move(status);
  task_ops_[id] = pending_.size() - 1;
}

void QueuedStore::DeleteTask(TaskId id) {
  absl::MutexLock lock(&mu_);
  if (auto it = task_ops_.find(id); it != task_ops_.end()) {
    // Whatever this batch would have written of the task is moot now.
    pending_[it->second].kind = StoreChange::Kind::kNone;
  }
  StoreChange& op = Append(StoreChange::Kind::kDeleteTask);
  op.task_id = id;
  task_ops_[id] = pending_.size() - 1;
}

void QueuedStore::DeleteJob(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  Append(StoreChange::Kind::kDeleteJob).key = job_id;
}

void QueuedStore::PutWorker(const WorkerRow& worker) {
  absl::MutexLock lock(&mu_);
  StoreChange& op = Append(StoreChange::Kind::kPutWorker);
  op.key = worker.worker_id;
  op.secret = worker.secret;
}

void QueuedStore::DeleteWorker(const std::string& worker_id) {
  absl::MutexLock lock(&mu_);
  Append(StoreChange::Kind::kDeleteWorker).key = worker_id;
}

void QueuedStore::Flush(std::function<void(absl::Status)> done) {
  bool durable = false;
  bool closed = false;
  {
    absl::MutexLock lock(&mu_);
    if (writer_done_ && durable_ < version_) {
      closed = true;
    } else if (durable_ < version_ || !error_.ok()) {
      waiters_.push_back({version_, std::move(done)});
      return;
    } else {
      durable = true;
    }
  }
  if (closed) {
    Answer(std::move(done), ClosedError());
  } else {
    done(durable ? absl::OkStatus() : ClosedError());
  }
}

StoreChange& QueuedStore::Append(StoreChange::Kind kind) {
  ++version_;
  pending_.emplace_back().kind = kind;
  return pending_.back();
}

void QueuedStore::WriterLoop() {
  bool failing = false;  // the last commit failed: wait, then try again
  while (true) {
    if (failing) SleepUnlessStopping(retry_interval_ms_);
    std::vector<StoreChange> batch;
    uint64_t target;
    {
      absl::MutexLock lock(&mu_);
      // While failing, an empty commit still tries the store: it tells when it takes writes
      // again, so new submits are accepted again.
      auto work = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return !loading_ && (stop_ || !pending_.empty() || !error_.ok());
      };
      mu_.Await(absl::Condition(&work));
      if (stop_ && (pending_.empty() || failing)) {
        if (!pending_.empty()) {
          log_->error("stopping with {} changes that could not be written", pending_.size());
        }
        StopWriting();
        return;
      }
      batch.swap(pending_);
      task_ops_.clear();
      target = version_;
    }
    const auto began = std::chrono::steady_clock::now();
    absl::Status status = Commit(batch);
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - began;
    const CommitFailure on_failure = AfterCommit(status);
    // With kRefuseSubmits, submits are written whole or dropped: a client told that its batch
    // failed must never find it stored later. Every other change is kept and written again
    // before newer ones.
    std::vector<std::function<void(absl::Status)>> done;
    std::vector<std::function<void(absl::Status)>> maybe_written;  // refused, perhaps written
    if (status.ok() || on_failure == CommitFailure::kRefuseSubmits) {
      for (StoreChange& op : batch) {
        if (op.kind != StoreChange::Kind::kSubmit) continue;
        (op.maybe_written && !status.ok() ? maybe_written : done)
            .push_back(std::move(op.submitted));
        op.kind = StoreChange::Kind::kNone;
      }
    } else {
      for (StoreChange& op : batch) op.maybe_written |= op.kind == StoreChange::Kind::kSubmit;
    }
    const size_t submits = done.size() + maybe_written.size();
    bool changed;  // from writing to failing or back
    bool idle;     // nothing waits to be written
    {
      absl::MutexLock lock(&mu_);
      if (status.ok()) {
        durable_ = target;
        metrics_.commit_seconds.Observe(took.count());
        metrics_.commit_changes.Observe(static_cast<double>(batch.size()));
      }
      changed = status.ok() != error_.ok();
      error_ = status;
      auto first_pending = std::partition(waiters_.begin(), waiters_.end(),
                                          [&](const auto& w) { return w.first <= target; });
      for (auto it = waiters_.begin(); it != first_pending; ++it) {
        done.push_back(std::move(it->second));
      }
      waiters_.erase(waiters_.begin(), first_pending);
      if (!status.ok()) Requeue(std::move(batch));
      idle = pending_.empty();
    }
    failing = !status.ok();
    if (changed && status.ok()) log_->info("the store writes again");
    if (changed && !status.ok()) {
      log_->error("{}; new submits are refused until it writes again",
                  std::string(status.message()));
    }
    if (!status.ok() && submits > 0) {
      log_->warn("{} submits were refused and not stored: {}", submits,
                 std::string(status.message()));
    }
    if (!maybe_written.empty())
      completer_.Post(std::move(maybe_written), MaybeWrittenError(status));
    // With nothing to commit next, the answers go out from here: a hand-off to the completer
    // would cost a sequential round trip a thread's wake-up per commit.
    if (idle) {
      completer_.RunOrPost(std::move(done), status);
    } else {
      completer_.Post(std::move(done), status);
    }
  }
}

// The writer's last act: whoever still waits is told that the store closed first.
void QueuedStore::StopWriting() {
  std::vector<std::function<void(absl::Status)>> done;
  std::vector<std::function<void(absl::Status)>> maybe_written;
  for (StoreChange& op : pending_) {
    if (op.kind != StoreChange::Kind::kSubmit) continue;
    (op.maybe_written ? maybe_written : done).push_back(std::move(op.submitted));
  }
  for (auto& [version, callback] : waiters_) done.push_back(std::move(callback));
  waiters_.clear();
  completer_.Post(std::move(maybe_written), MaybeWrittenError(ClosedError()));
  completer_.Post(std::move(done), ClosedError());
  writer_done_ = true;
}

absl::Status MaybeWrittenError(const absl::Status& why) {
  return absl::UnknownError(
      absl::StrCat(why.message(),
                   "; an earlier try to write the batch lost its answer, so it may be stored "
                   "after all: submit it again only with the same idempotency keys"));
}

absl::Status QueuedStore::ClosedError() {
  return absl::UnavailableError("the master stopped before this was written");
}

// After the writer stopped: the completer answers while it runs, the caller once it is closed.
void QueuedStore::Answer(std::function<void(absl::Status)> done, absl::Status status) {
  std::vector<std::function<void(absl::Status)>> one;
  one.push_back(std::move(done));
  if (!completer_.Post(std::move(one), status)) one.front()(status);
}

// Puts the changes of a failed commit back before those queued since, collapsing the changes of
// each task again, so a long outage keeps one pending change per task instead of a list.
void QueuedStore::Requeue(std::vector<StoreChange> failed) {
  std::vector<StoreChange> newer;
  newer.swap(pending_);
  task_ops_.clear();
  for (std::vector<StoreChange>* ops : {&failed, &newer}) {
    for (StoreChange& op : *ops) {
      if (op.kind == StoreChange::Kind::kNone) continue;
      const bool per_task =
          op.kind == StoreChange::Kind::kUpdateTask || op.kind == StoreChange::Kind::kDeleteTask;
      auto earlier = per_task ? task_ops_.find(op.task_id) : task_ops_.end();
      if (earlier != task_ops_.end()) {
        StoreChange& e = pending_[earlier->second];
        if (op.kind == StoreChange::Kind::kUpdateTask && e.kind == StoreChange::Kind::kUpdateTask) {
          e.status = std::move(op.status);
          continue;
        }
        if (op.kind == StoreChange::Kind::kDeleteTask) e.kind = StoreChange::Kind::kNone;
      }
      if (per_task) task_ops_[op.task_id] = pending_.size();
      pending_.push_back(std::move(op));
    }
  }
}

// Sleeps `ms` unless the store is closing meanwhile, in steps on the monotonic clock: a timed
// mutex wait here would follow the wall clock.
void QueuedStore::SleepUnlessStopping(int64_t ms) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (std::chrono::steady_clock::now() < until) {
    {
      absl::MutexLock lock(&mu_);
      if (stop_) return;
    }
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(
        std::chrono::milliseconds(20), until - std::chrono::steady_clock::now()));
  }
}

void QueuedStore::StopTheMaster(const absl::Status& status, std::string_view why) {
  constexpr int kExitSoftware = 70;
  log_->critical("{}; stopping the master: {}", std::string(status.message()), why);
  log_->flush();
  std::_Exit(kExitSoftware);
}

}  // namespace taskmaster
