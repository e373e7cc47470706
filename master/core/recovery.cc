// Recovery: the broker's state rebuilt from the store's rows at start.
#include <algorithm>
#include <chrono>
#include <map>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "master/core/broker_impl.h"

namespace taskmaster {

// Rebuilds the state from the store's rows. Runs before any call, so the order of rows within
// a table does not matter: ready lists and completion orders are sorted afterwards.
class Broker::Impl::Loader final : public RecoveryVisitor {
 public:
  explicit Loader(Impl& b) : b_(b), now_(b.clock_->NowMs()) {}

  void OnJob(JobRow row) override {
    b_.mu_.AssertHeld();  // Recover holds it
    auto job = std::make_unique<Job>();
    job->id = std::move(row.job_id);
    job->tenant = std::move(row.tenant);
    job->account = &b_.accounts_[job->tenant];
    job->total = row.total;
    job->created_ms = row.created_ms;
    job->batches = row.batches;
    // An open job gets a whole timeout after the restart for its client to come back.
    job->appended_ms = now_;
    Job& j = *job;
    b_.jobs_[j.id] = std::move(job);
    if (row.open) {
      b_.CountOpen(j, true);
      b_.ScheduleIdleCheck(j, now_ + b_.options_.open_job_timeout_ms);
    }
  }

  void OnTask(TaskRow row) override {
    b_.mu_.AssertHeld();  // Recover holds it
    auto job = b_.jobs_.find(row.job_id);
    if (job == b_.jobs_.end()) {
      ++orphans_;
      return;
    }
    Task& t = b_.tasks_[row.id];
    t.id = row.id;
    t.job = job->second.get();
    t.cls = b_.ClassFor(row.queue, row.kind, row.labels);
    t.cls->tasks++;
    t.payload = row.payload;
    if (!row.status.output.empty() || !row.status.error.empty() || !row.idempotency_key.empty() ||
        !row.status.worker.empty()) {
      t.notes = std::make_unique<core::TaskNotes>(
          core::TaskNotes{std::move(row.status.output), std::move(row.status.error),
                          std::move(row.idempotency_key), std::move(row.status.worker)});
    }
    t.created_ms = row.created_ms;
    // Ready since it was submitted, as far as the store knows; leased since now, its worker
    // claiming it again.
    t.at_ms = IsFinished(row.status.state)              ? row.status.finished_ms
              : row.status.state == TaskState::kLeased  ? now_
              : row.status.state == TaskState::kDelayed ? row.status.not_before_ms
                                                        : row.created_ms;
    t.timeout_ms = row.timeout_ms;
    t.seq = IsFinished(row.status.state) ? row.status.completion_seq : row.status.seq;
    t.priority = row.priority;
    t.attempts = row.status.attempts;
    t.max_attempts = row.max_attempts;
    t.state = row.status.state;
    t.job->tasks.push_back(t.id);
    if (!t.key().empty()) b_.keys_[KeyIndex(t)] = t.id;
    if (!IsFinished(t.state)) t.job->account->unfinished++;
    b_.next_id_ = std::max(b_.next_id_, t.id + 1);
    uint64_t& next = IsFinished(t.state) ? b_.next_completion_ : b_.next_seq_;
    next = std::max(next, t.seq + 1);
    core::QueueCounters& c = *t.cls->counters;
    switch (t.state) {
      case TaskState::kPending:
        c.ready++;
        ready_.push_back({t.seq, t.id});
        break;
      case TaskState::kDelayed:
        c.delayed++;
        // A system clock set back while the master was down must not stretch a delay beyond
        // what it was when it was set.
        t.at_ms = std::min(t.at_ms, now_ + (t.at_ms - t.created_ms));
        b_.delayed_.push({t.at_ms, t.id});
        break;
      case TaskState::kLeased:
        c.leased++;
        Relet(t, row.status.worker_id);
        break;
      default:
        finished_.push_back({static_cast<int64_t>(t.seq), t.job, t.id});
    }
  }

  void OnJobMember(JobMemberRow row) override {
    b_.mu_.AssertHeld();  // Recover holds it
    auto job = b_.jobs_.find(row.job_id);
    auto task = b_.tasks_.find(row.task_id);
    if (job == b_.jobs_.end() || task == b_.tasks_.end()) return;
    Job* j = job->second.get();
    j->tasks.push_back(row.task_id);
    if (!IsFinished(task->second.state)) {
      b_.extra_jobs_.emplace(row.task_id, j);
    } else if (row.position >= 0) {
      early_.push_back({row.position, j, row.task_id});
    } else {
      finished_.push_back({static_cast<int64_t>(task->second.completion_seq()), j, row.task_id});
    }
  }

  void OnHighestTaskId(TaskId id) override {
    b_.mu_.AssertHeld();  // Recover holds it
    b_.next_id_ = std::max(b_.next_id_, id + 1);
  }

  // Attached when the master stopped: known as disconnected, so it is awaited after the
  // restart and forgotten (with its stored row) once its grace has passed.
  void OnWorker(WorkerRow row) override {
    b_.mu_.AssertHeld();  // Recover holds it
    WorkerNamed(row.worker_id, row.worker_id).secret = std::move(row.secret);
  }

  // Everything loaded was on disk.
  void Settle() {
    b_.mu_.AssertHeld();  // Recover holds it
    b_.durable_completion_ = b_.next_completion_ - 1;
  }

  // Ready lists and completion orders, sorted as they were.
  void Finish() {
    b_.mu_.AssertHeld();  // Recover holds it
    std::sort(ready_.begin(), ready_.end());
    for (const ReadyEntry& e : ready_) {
      const Task& t = b_.tasks_.at(e.id);
      t.cls->ready[t.priority].push_back(e);
    }
    // Tasks a job followed that had finished before it was created come first.
    std::sort(early_.begin(), early_.end());
    std::sort(finished_.begin(), finished_.end());
    for (const auto* list : {&early_, &finished_}) {
      for (const auto& [order, job, id] : *list) {
        const Task& t = b_.tasks_.at(id);
        job->done++;
        job->succeeded += t.state == TaskState::kSucceeded;
        job->dead += t.state == TaskState::kDead;
        job->cancelled += t.state == TaskState::kCancelled;
        job->completed.push_back(id);
      }
    }
    std::vector<std::pair<int64_t, std::string>> expiries;
    for (const auto& [id, job] : b_.jobs_) {
      if (job->done != job->total || job->open) continue;
      int64_t last = job->created_ms;
      for (TaskId t : job->completed) last = std::max(last, b_.tasks_.at(t).at_ms);
      expiries.push_back({last + b_.options_.result_retention_ms, id});
    }
    std::sort(expiries.begin(), expiries.end());
    b_.job_expiry_.assign(expiries.begin(), expiries.end());
  }

  size_t orphans() const { return orphans_; }

 private:
  // A task leased when the master stopped stays with its worker for the reconnect grace: a
  // worker that comes back still holding it keeps it, and otherwise it is requeued then.
  void Relet(Task& t, const std::string& worker_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(b_.mu_) {
    Worker& w = WorkerNamed(worker_id, t.worker().empty() ? worker_id : t.worker());
    t.Notes().leased_to = &w;
    w.leases.insert(t.id);
  }

  // The worker `worker_id`, disconnected as of the restart (its lease period starts now).
  Worker& WorkerNamed(const std::string& worker_id, const std::string& name)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(b_.mu_) {
    auto& w = b_.workers_[worker_id];
    if (!w) {
      w = std::make_unique<Worker>();
      w->id = worker_id;
      w->name = name;
      w->generation = b_.next_generation_++;
      w->disconnected_ms = now_;
      w->heard_ms = now_;
    }
    return *w;
  }

  Impl& b_;
  const int64_t now_;
  std::vector<ReadyEntry> ready_;
  std::vector<std::tuple<int64_t, Job*, TaskId>> finished_;
  std::vector<std::tuple<int64_t, Job*, TaskId>> early_;
  size_t orphans_ = 0;
};

absl::Status Broker::Impl::Recover() {
  const auto start = std::chrono::steady_clock::now();
  Loader loader(*this);
  std::map<TaskState, int64_t> by_state;
  size_t jobs, tasks;
  {
    // Recover runs before any other call, so holding the lock while the store reads blocks
    // nobody, and every row is applied under it.
    absl::MutexLock lock(&mu_);
    now_ms_ = clock_->NowMs();
    if (absl::Status status = store_->Load(&loader); !status.ok()) return status;
    loader.Finish();
    loader.Settle();
    // Every worker attached at the stop, and every one that held a lease then.
    for (const auto& [id, w] : workers_) awaited_.insert(id);
    hold_until_ms_ = clock_->NowMs() + options_.recovery_hold_ms;
    for (const auto& [id, t] : tasks_) by_state[t.state]++;
    jobs = jobs_.size();
    tasks = tasks_.size();
  }
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::steady_clock::now() - start)
                      .count();
  log_->info(
      "recovered {} jobs and {} tasks ({} pending, {} delayed, {} leased, {} finished) in {} ms",
      jobs, tasks, by_state[TaskState::kPending], by_state[TaskState::kDelayed],
      by_state[TaskState::kLeased],
      by_state[TaskState::kSucceeded] + by_state[TaskState::kDead] +
          by_state[TaskState::kCancelled],
      ms);
  if (loader.orphans() > 0) {  // a store must check this itself (see Store::Load)
    return absl::DataLossError(
        absl::StrCat("the store holds ", loader.orphans(), " tasks whose job is missing"));
  }
  return absl::OkStatus();
}

}  // namespace taskmaster
