// Jobs and tasks as clients see them: visibility across tenants and durability, views, job
// results and watchers, cancellation, completion and retention.
#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "master/core/broker_impl.h"

namespace taskmaster {

void Broker::Impl::RevealWhenDurable(uint64_t through, std::vector<std::string> job_ids) {
  store_->Flush([this, through, job_ids = std::move(job_ids)](absl::Status status) mutable {
    if (!status.ok()) {
      // The store retries the write: look again after its next attempt, unless it is closing.
      bool closing;
      {
        absl::MutexLock lock(&mu_);
        closing = closing_;
      }
      if (!closing) RevealWhenDurable(through, std::move(job_ids));
      return;
    }
    // Watchers as of now: one that started following since the result came in is told too.
    std::vector<std::shared_ptr<JobWatcher>> notify;
    {
      absl::MutexLock lock(&mu_);
      durable_completion_ = std::max(durable_completion_, through);
      for (const std::string& id : job_ids) {
        auto it = jobs_.find(id);
        if (it == jobs_.end()) continue;
        notify.insert(notify.end(), it->second->watchers.begin(), it->second->watchers.end());
      }
    }
    for (auto& watcher : notify) watcher->OnJobChanged();
  });
}

bool Broker::Impl::Sees(const Caller& caller, const Job& job) {
  return !job.staged && (caller.sees_all || job.tenant == caller.tenant);
}

absl::StatusOr<core::Job*> Broker::Impl::VisibleJob(const Caller& caller,
                                                    const std::string& job_id) const {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end() || !Sees(caller, *it->second)) {
    return absl::NotFoundError(
        absl::StrCat("no job ", job_id, " (never submitted, or past retention)"));
  }
  return it->second.get();
}

absl::StatusOr<const core::Task*> Broker::Impl::VisibleTask(const Caller& caller, TaskId id) const {
  auto it = tasks_.find(id);
  if (it == tasks_.end() || !Sees(caller, *it->second.job)) {
    return absl::NotFoundError(
        absl::StrCat("no task ", id, " (never submitted, or past retention)"));
  }
  return &it->second;
}

bool Broker::Impl::Settled(const Task& t) const {
  return !persistent_ || t.completion_seq() <= durable_completion_;
}

void Broker::Impl::CountDone(Job* job, const Task& t, Effects& fx) {
  job->done++;
  if (t.state == TaskState::kSucceeded) job->succeeded++;
  if (t.state == TaskState::kDead) job->dead++;
  if (t.state == TaskState::kCancelled) job->cancelled++;
  job->completed.push_back(t.id);
  MaybeJobComplete(job, t.at_ms);
  if (!fx.touched.insert(job).second) return;
  if (persistent_) {
    fx.reveal_jobs.push_back(job->id);  // its watchers are told once the result is on disk
  } else {
    fx.notify.insert(fx.notify.end(), job->watchers.begin(), job->watchers.end());
  }
}

void Broker::Impl::MaybeJobComplete(Job* job, int64_t now) {
  if (job->done == job->total && !job->open) {
    job_expiry_.push_back({now + options_.result_retention_ms, job->id});
  }
}

void Broker::Impl::DeleteJob(Job& job) {
  for (TaskId id : job.tasks) {
    auto it = tasks_.find(id);
    if (it == tasks_.end() || it->second.job != &job) continue;
    if (!it->second.key().empty()) keys_.erase(KeyIndex(it->second));
    if (persistent_) store_->DeleteTask(id);
    Forget(it);
  }
  if (persistent_) store_->DeleteJob(job.id);
  jobs_.erase(job.id);
}

bool Broker::Impl::CancelLocked(Task& t, Effects& fx) {
  if (IsFinished(t.state)) return false;
  Worker* w = t.state == TaskState::kLeased ? t.leased_to() : nullptr;
  if (w) {
    // Its slot stays taken until the worker reports the task stopped.
    w->outbox.cancel.push_back(t.id);
    MarkDirty(*w);
  }
  t.Notes().error = "cancelled by a client";
  Finish(t, TaskState::kCancelled, fx);
  return true;
}

WorkerView Broker::Impl::ViewOf(const Worker& w) const {
  const int64_t unheard = std::max<int64_t>(0, clock_->NowMs() - w.heard_ms);
  return {w.id,           w.name,
          w.host,         w.kinds,
          w.queues,       w.labels,
          w.slots,        static_cast<int32_t>(w.leases.size()),
          w.connected,    w.draining,
          w.connected_ms, w.stuck,
          unheard,        w.connected && unheard >= options_.SilentAfterMs()};
}

TaskView Broker::Impl::ViewOf(const Task& t, bool with_payload) const {
  TaskView v;
  v.id = t.id;
  v.job_id = t.job->id;
  v.queue = t.cls->queue;
  v.kind = t.cls->kind;
  v.state = t.state;
  v.attempts = t.attempts;
  v.max_attempts = t.max_attempts;
  v.priority = t.priority;
  if (with_payload) v.payload = t.payload.str();
  v.output = t.output();
  v.error = t.error();
  v.worker = t.worker();
  v.created_ms = t.created_ms;
  v.finished_ms = IsFinished(t.state) ? t.at_ms : 0;
  v.not_before_ms = t.not_before_ms();
  return v;
}

JobView Broker::Impl::ViewOf(const Job& j) const {
  JobView v{j.id, j.total, j.done, j.succeeded, j.dead, j.cancelled, j.created_ms, j.open, {}};
  for (auto id = j.completed.rbegin(); id != j.completed.rend(); ++id) {
    auto t = tasks_.find(*id);
    if (t == tasks_.end() || Settled(t->second)) break;  // durability follows completion order
    v.done--;
    v.succeeded -= t->second.state == TaskState::kSucceeded;
    v.dead -= t->second.state == TaskState::kDead;
    v.cancelled -= t->second.state == TaskState::kCancelled;
  }
  return v;
}

std::string Broker::Impl::WaitingFor(const Task& t) const {
  if (t.state == TaskState::kDelayed) {
    return absl::StrCat(t.attempts > 0 ? "retry backoff" : "delay", ": due in ",
                        std::max<int64_t>(0, t.not_before_ms() - clock_->NowMs()), " ms");
  }
  if (t.state != TaskState::kPending) return "";
  int capable = 0;
  for (const auto& [id, w] : workers_) {
    if (w->connected && !w->draining && CanRun(*w, *t.cls)) ++capable;
  }
  if (capable == 0) return absl::StrCat("no connected worker runs ", DescribeClass(*t.cls));
  return absl::StrCat("all ", capable, " workers that run ", DescribeClass(*t.cls), " are busy");
}

absl::StatusOr<TaskView> Broker::Impl::GetTask(const Caller& caller, TaskId id) const {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<const Task*> t = VisibleTask(caller, id);
  if (!t.ok()) return t.status();
  TaskView view = ViewOf(**t);
  view.waiting_for = WaitingFor(**t);
  view.settled = Settled(**t);
  if (auto p = progress_.find(id); p != progress_.end()) view.progress = p->second;
  return view;
}

absl::StatusOr<JobView> Broker::Impl::GetJob(const Caller& caller,
                                             const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<Job*> job = VisibleJob(caller, job_id);
  if (!job.ok()) return job.status();
  JobView view = ViewOf(**job);
  // Bounded by the tasks running now, not by the job's size.
  for (const auto& [id, progress] : progress_) {
    auto t = tasks_.find(id);
    if (t != tasks_.end() && t->second.job == *job) view.running.push_back(progress);
  }
  std::sort(
      view.running.begin(), view.running.end(),
      [](const TaskProgress& a, const TaskProgress& b) { return a.updated_ms > b.updated_ms; });
  if (view.running.size() > kMaxRunningShown) view.running.resize(kMaxRunningShown);
  return view;
}

absl::StatusOr<int64_t> Broker::Impl::CancelTask(const Caller& caller, TaskId id) {
  Section section(*this);
  absl::StatusOr<const Task*> t = VisibleTask(caller, id);
  if (!t.ok()) return t.status();
  return CancelLocked(tasks_.at(id), section.fx) ? 1 : 0;
}

absl::StatusOr<int64_t> Broker::Impl::CancelJob(const Caller& caller, const std::string& job_id) {
  Section section(*this);
  absl::StatusOr<Job*> job = VisibleJob(caller, job_id);
  if (!job.ok()) return job.status();
  int64_t cancelled = 0;
  for (TaskId id : (*job)->tasks) {
    auto t = tasks_.find(id);
    if (t != tasks_.end() && CancelLocked(t->second, section.fx)) ++cancelled;
  }
  return cancelled;
}

absl::StatusOr<JobEvents> Broker::Impl::ReadJob(const Caller& caller, const std::string& job_id,
                                                int64_t after, size_t max, size_t max_bytes) const {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<Job*> found = VisibleJob(caller, job_id);
  if (!found.ok()) return found.status();
  const Job& job = **found;
  JobEvents events;
  events.progress = ViewOf(job);
  const auto total = static_cast<int64_t>(job.completed.size());
  size_t bytes = 0;
  for (int64_t i = std::max<int64_t>(0, after);
       i < total && events.results.size() < max && bytes < max_bytes; ++i) {
    auto t = tasks_.find(job.completed[i]);
    if (t != tasks_.end() && !Settled(t->second)) break;  // not on disk yet
    if (t == tasks_.end()) {
      // Past retention: keep the position so the cursor stays right.
      TaskView gone;
      gone.id = job.completed[i];
      gone.job_id = job.id;
      gone.error = "result expired";
      events.results.push_back(std::move(gone));
    } else {
      TaskView view = ViewOf(t->second, /*with_payload=*/false);
      bytes += ResultBytes(view);
      events.results.push_back(std::move(view));
    }
  }
  return events;
}

absl::Status Broker::Impl::Watch(const Caller& caller, const std::string& job_id,
                                 std::shared_ptr<JobWatcher> watcher) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<Job*> job = VisibleJob(caller, job_id);
  if (!job.ok()) return job.status();
  (*job)->watchers.push_back(std::move(watcher));
  return absl::OkStatus();
}

void Broker::Impl::Unwatch(const std::string& job_id, const JobWatcher* watcher) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return;
  std::erase_if(it->second->watchers, [&](const auto& w) { return w.get() == watcher; });
}

std::vector<QueueStatsView> Broker::Impl::QueueStats() const {
  absl::MutexLock lock(&mu_);
  return QueueStatsLocked();
}

std::vector<QueueStatsView> Broker::Impl::QueueStatsLocked() const {
  // The head of a ready list is its oldest entry. Those of tasks that left PENDING (cancelled,
  // leased elsewhere) go as dispatch would drop them: each entry is dropped once, so a scrape
  // stays short whatever the lists hold, and a stale head never hides the live tasks behind it.
  std::map<std::string_view, int64_t> oldest_since;
  for (const auto& [key, cls] : classes_) {
    for (auto lane = cls->ready.begin(); lane != cls->ready.end();) {
      while (!lane->second.empty() && IsStale(lane->second.front())) lane->second.pop_front();
      if (lane->second.empty()) {
        lane = cls->ready.erase(lane);
        continue;
      }
      const int64_t since = tasks_.at(lane->second.front().id).at_ms;
      auto [it, added] = oldest_since.emplace(cls->queue, since);
      if (!added) it->second = std::min(it->second, since);
      ++lane;
    }
  }
  const int64_t now = clock_->NowMs();
  std::vector<QueueStatsView> out;
  out.reserve(counters_.size());
  for (const auto& [queue, c] : counters_) {
    QueueStatsView v{.queue = queue,
                     .pending = c.ready + c.delayed,
                     .delayed = c.delayed,
                     .leased = c.leased,
                     .submitted = c.submitted,
                     .succeeded = c.succeeded,
                     .failed = c.failed,
                     .retried = c.retried,
                     .redelivered = c.redelivered,
                     .reclaimed = c.reclaimed,
                     .dead = c.dead,
                     .cancelled = c.cancelled};
    if (auto it = oldest_since.find(queue); it != oldest_since.end()) {
      v.oldest_ready_age_ms = std::max<int64_t>(0, now - it->second);
    }
    out.push_back(std::move(v));
  }
  return out;
}

BrokerMetrics Broker::Impl::Metrics() const {
  absl::MutexLock lock(&mu_);
  BrokerMetrics m;
  m.queues = QueueStatsLocked();
  for (const auto& [kind, times] : kind_times_) m.kinds.push_back(*times);
  m.failures.assign(failures_.begin(), failures_.end());
  m.duplicate_results = duplicates_;
  return m;
}

int64_t Broker::Impl::DuplicateResults() const {
  absl::MutexLock lock(&mu_);
  return duplicates_;
}

}  // namespace taskmaster
