// State transitions of tasks (ready, delayed, leased, given back, lost, finished, forgotten),
// with the queue counters that follow each one, and the rows and messages they leave for the
// store and the workers.
#include <utility>

#include "common/util.h"
#include "master/core/broker_impl.h"

namespace taskmaster {

void Broker::Impl::Touch(Task& t) {
  if (!persistent_ || t.dirty) return;
  t.dirty = true;
  dirty_.push_back(t.id);
}

void Broker::Impl::SetState(Task& t, TaskState state) {
  Touch(t);
  QueueCounters& c = *t.cls->counters;
  auto live = [&c](TaskState s) -> int64_t* {
    if (s == TaskState::kPending) return &c.ready;
    if (s == TaskState::kDelayed) return &c.delayed;
    if (s == TaskState::kLeased) return &c.leased;
    return nullptr;
  };
  if (int64_t* was = live(t.state)) --*was;
  t.state = state;
  t.at_ms = now_ms_;
  if (int64_t* now = live(state)) ++*now;
}

void Broker::Impl::Unlease(Task& t) {
  if (Worker* w = t.leased_to()) {
    w->leases.erase(t.id);
    t.notes->leased_to = nullptr;
  }
  progress_.erase(t.id);
}

void Broker::Impl::MakeReady(Task& t, bool front) {
  SetState(t, TaskState::kPending);
  auto& lane = t.cls->ready[t.priority];
  if (front) {
    lane.push_front({t.seq, t.id});  // a task given back keeps its place
  } else {
    t.seq = next_seq_++;
    lane.push_back({t.seq, t.id});
  }
}

void Broker::Impl::Enqueue(Task& t) {
  if (t.state == TaskState::kDelayed) {
    delayed_.push({t.at_ms, t.id});
  } else {
    t.cls->ready[t.priority].push_back({t.seq, t.id});
  }
}

void Broker::Impl::Delay(Task& t, int64_t not_before) {
  SetState(t, TaskState::kDelayed);
  t.at_ms = not_before;
  delayed_.push({not_before, t.id});
}

void Broker::Impl::LeaseTo(Task& t, Worker& w, int32_t attempt) {
  SetState(t, TaskState::kLeased);
  t.lease_lost = false;
  t.attempts = attempt;
  t.Notes().leased_to = &w;
  t.notes->worker = w.name;
  w.leases.insert(t.id);
}

void Broker::Impl::Lease(Task& t, Worker& w) {
  t.cls->times->wait_seconds.Observe(static_cast<double>(now_ms_ - t.at_ms) / 1000);
  LeaseTo(t, w, t.attempts + 1);
  w.credits--;
  w.outbox.tasks.push_back(
      {t.id, t.attempts, t.cls->kind, t.payload.str(), t.timeout_ms, t.cls->queue});
  w.outbox_bytes += t.payload.size();
  MarkDirty(w);
}

void Broker::Impl::LoseLease(Task& t, const std::string& reason, Effects& fx) {
  Unlease(t);
  if (t.state != TaskState::kLeased) return;
  t.Notes().error = reason;
  const bool dead = t.attempts >= t.max_attempts;
  CountFailure(t, dead);
  if (dead) {
    Finish(t, TaskState::kDead, fx);
  } else {
    t.cls->counters->redelivered++;
    MakeReady(t, /*front=*/false);
    t.lease_lost = true;
  }
}

void Broker::Impl::CountFailure(const Task& t, bool dead) {
  QueueCounters& c = *t.cls->counters;
  c.failed++;
  if (!dead) c.retried++;
  if (options_.recent_failures == 0) return;
  if (failures_.size() >= options_.recent_failures) failures_.pop_back();
  failures_.push_front({now_ms_, t.id, t.job->id, t.cls->queue, t.cls->kind, t.worker(), t.attempts,
                        dead, ValidUtf8(t.error(), kMaxFailureErrorBytes)});
}

bool Broker::Impl::Adopt(Task& t, const TaskRef& ref, Worker& w, bool awaited) {
  const bool waiting = t.state == TaskState::kPending || t.state == TaskState::kDelayed;
  // Its lease expired here while this very worker was away (not a result: that one counted).
  const bool expired_away = t.lease_lost && ref.attempt == t.attempts && t.worker() == w.name;
  // Granted just before the master's crash, never on disk: the next attempt.
  const bool lost_in_crash = awaited && ref.attempt == t.attempts + 1;
  if (!waiting || t.job->staged || !(expired_away || lost_in_crash) || ref.attempt < 1 ||
      ref.attempt > t.max_attempts || !CanRun(w, *t.cls)) {
    return false;
  }
  if (expired_away) {
    // The expiry was no failed attempt after all: Stats says so; metrics, whose counters only
    // grow, count the reclaim instead.
    t.cls->counters->failed--;
    t.cls->counters->reclaimed++;
  }
  LeaseTo(t, w, ref.attempt);
  return true;
}

void Broker::Impl::GiveBack(Task& t) {
  Unlease(t);
  t.attempts--;
  MakeReady(t, /*front=*/true);
  // It keeps its place at the head of its list, so it must not look younger than the tasks behind
  // it: it has waited since it was submitted, as far as anyone can tell now.
  t.at_ms = t.created_ms;
}

void Broker::Impl::Finish(Task& t, TaskState state, Effects& fx) {
  SetState(t, state);
  t.job->account->unfinished--;
  QueueCounters& c = *t.cls->counters;
  t.seq = next_completion_++;
  fx.finished_through = t.seq;
  if (state == TaskState::kSucceeded) c.succeeded++;
  if (state == TaskState::kDead) c.dead++;
  if (state == TaskState::kCancelled) c.cancelled++;
  CountDone(t.job, t, fx);
  if (!extra_jobs_.empty()) {
    auto [begin, end] = extra_jobs_.equal_range(t.id);
    for (auto it = begin; it != end; ++it) CountDone(it->second, t, fx);
    extra_jobs_.erase(t.id);
  }
}

void Broker::Impl::Forget(std::unordered_map<TaskId, Task>::iterator it) {
  TaskClass* cls = it->second.cls;
  tasks_.erase(it);
  if (--cls->tasks > 0) return;
  for (auto& [id, w] : workers_) std::erase(w->eligible, cls);
  classes_.erase(std::make_tuple(cls->queue, cls->kind, cls->labels));
}

TaskStatusRow Broker::Impl::StatusOf(const Task& t) const {
  TaskStatusRow s;
  s.state = t.state;
  s.attempts = t.attempts;
  s.not_before_ms = t.not_before_ms();
  s.finished_ms = IsFinished(t.state) ? t.at_ms : 0;
  s.seq = IsFinished(t.state) ? 0 : t.seq;
  s.completion_seq = t.completion_seq();
  s.output = t.output();
  s.error = t.error();
  s.worker = t.worker();
  if (const Worker* w = t.leased_to(); w && t.state == TaskState::kLeased) s.worker_id = w->id;
  return s;
}

TaskRow Broker::Impl::RowOf(const Task& t) const {
  TaskRow r;
  r.id = t.id;
  r.job_id = t.job->id;
  r.queue = t.cls->queue;
  r.kind = t.cls->kind;
  r.labels = t.cls->labels;
  r.payload = t.payload.str();
  r.priority = t.priority;
  r.max_attempts = t.max_attempts;
  r.timeout_ms = t.timeout_ms;
  r.created_ms = t.created_ms;
  r.idempotency_key = t.key();
  r.status = StatusOf(t);
  return r;
}

void Broker::Impl::Collect(Effects& fx) {
  for (TaskId id : dirty_) {
    auto it = tasks_.find(id);
    if (it == tasks_.end() || !it->second.dirty) continue;
    it->second.dirty = false;
    store_->UpdateTask(id, StatusOf(it->second));
  }
  dirty_.clear();
  for (Worker* w : dirty_workers_) {
    w->dirty = false;
    if (w->channel && !w->outbox.empty()) {
      fx.sends.emplace_back(w->channel, std::move(w->outbox));
    }
    w->outbox = WorkerOutbound{};
    w->outbox_bytes = 0;
  }
  dirty_workers_.clear();
}

void Broker::Impl::MarkDirty(Worker& w) {
  if (w.dirty) return;
  w.dirty = true;
  dirty_workers_.push_back(&w);
}

}  // namespace taskmaster
