// Time: due delayed tasks, expired leases, workers that did not come back, results past
// retention, a master that did not run; and the master's shutdown.
#include <utility>

#include "absl/strings/str_cat.h"
#include "master/core/broker_impl.h"

namespace taskmaster {

void Broker::Impl::ForgivePause(int64_t now, Effects& fx) {
  const int64_t gap = now - last_tick_ms_;
  last_tick_ms_ = now;
  if (gap <= options_.pause_threshold_ms) return;
  for (auto& [id, w] : workers_) {
    w->heard_ms = std::min(now, w->heard_ms + gap);
    if (!w->connected) w->disconnected_ms = std::min(now, w->disconnected_ms + gap);
  }
  // Nor do open jobs' clients lose their time (a pause is rare: all jobs are looked at).
  if (open_jobs_ > 0) {
    for (auto& [id, job] : jobs_) {
      if (job->open) job->appended_ms = std::min(now, job->appended_ms + gap);
    }
  }
  Log(fx, spdlog::level::warn,
      "the master did not run for {} ms (paused or starved): workers' leases and reconnect "
      "graces, and open jobs' idle timeouts, are extended by that much",
      gap);
}

void Broker::Impl::Tick() {
  std::vector<std::string> idle;
  {
    Section section(*this);
    idle = TickLocked(section.fx);
  }
  for (const std::string& job_id : idle) CloseIdle(job_id);
}

std::vector<std::string> Broker::Impl::TickLocked(Effects& fx) {
  const int64_t now = clock_->NowMs();
  ForgivePause(now, fx);
  EndHoldIfDue(now, fx);
  while (!delayed_.empty() && delayed_.top().first <= now) {
    auto [due, id] = delayed_.top();
    delayed_.pop();
    auto it = tasks_.find(id);
    if (it != tasks_.end() && it->second.state == TaskState::kDelayed && it->second.at_ms == due) {
      MakeReady(it->second, /*front=*/false);
    }
  }
  std::vector<Worker*> gone;
  for (auto& [worker_id, w] : workers_) {
    // Gone once its grace has passed, and never sooner than a lease after its last heartbeat:
    // until then it may still be running its tasks (it stops them only then, see
    // docs/lifecycle.md), and they must not run in two places.
    if (!w->connected && now - w->disconnected_ms >= options_.reconnect_grace_ms &&
        now - w->heard_ms >= options_.lease_timeout_ms) {
      gone.push_back(w.get());
      continue;
    }
    // A disconnected worker has the reconnect grace instead.
    if (!w->connected || w->leases.empty() || now - w->heard_ms < options_.lease_timeout_ms) {
      continue;
    }
    Log(fx, spdlog::level::warn, "no heartbeat from worker {} for {} ms: its {} leases expire",
        w->name, now - w->heard_ms, w->leases.size());
    const std::vector<TaskId> expired(w->leases.begin(), w->leases.end());
    for (TaskId id : expired) {
      auto it = tasks_.find(id);
      if (it == tasks_.end()) {
        w->leases.erase(id);
        continue;
      }
      w->outbox.cancel.push_back(id);
      MarkDirty(*w);
      LoseLease(it->second,
                absl::StrCat("lease expired: no heartbeat from worker ", w->name, " for ",
                             options_.lease_timeout_ms, " ms"),
                fx);
    }
  }
  for (Worker* w : gone) {
    Log(fx, spdlog::level::warn, "worker {} did not come back in time; its {} tasks are requeued",
        w->name, w->leases.size());
    RemoveWorker(*w, absl::StrCat("worker ", w->name, " disconnected while running it"), fx);
  }
  while (!job_expiry_.empty() && job_expiry_.front().first <= now) {
    auto it = jobs_.find(job_expiry_.front().second);
    job_expiry_.pop_front();
    if (it != jobs_.end()) DeleteJob(*it->second);
  }
  DispatchAll();
  return IdleOpenJobs(now, fx);
}

void Broker::Impl::Shutdown() {
  Section section(*this);
  Effects& fx = section.fx;
  shutting_down_ = true;
  for (auto& [id, w] : workers_) {
    if (!w->connected) continue;
    w->outbox.shutting_down = true;
    MarkDirty(*w);
  }
  // Followers of jobs end their streams (see stopping()) and reconnect to the next master.
  for (auto& [id, job] : jobs_) {
    fx.notify.insert(fx.notify.end(), job->watchers.begin(), job->watchers.end());
  }
}

bool Broker::Impl::stopping() const {
  absl::MutexLock lock(&mu_);
  return shutting_down_;
}

}  // namespace taskmaster
