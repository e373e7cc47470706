// Workers: a stream's hello (with the leases it keeps, revokes or takes back), credits,
// results and give-backs, heartbeats, drain and departure.
#include <algorithm>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/limits.h"
#include "common/util.h"
#include "master/core/broker_impl.h"
#include "master/core/validate.h"

namespace taskmaster {

core::Worker* Broker::Impl::FindWorker(const WorkerHandle& h) {
  auto it = workers_.find(h.worker_id);
  if (it == workers_.end() || it->second->generation != h.generation) return nullptr;
  return it->second.get();
}

void Broker::Impl::RemoveWorker(Worker& w, const std::string& reason, Effects& fx) {
  const std::vector<TaskId> leases(w.leases.begin(), w.leases.end());
  for (TaskId id : leases) {
    auto it = tasks_.find(id);
    if (it != tasks_.end() && it->second.leased_to() == &w) LoseLease(it->second, reason, fx);
  }
  std::erase(dirty_workers_, &w);
  if (persistent_) store_->DeleteWorker(w.id);
  workers_.erase(w.id);
}

absl::StatusOr<Broker::WorkerHandle> Broker::Impl::Attach(WorkerHello hello,
                                                          std::shared_ptr<WorkerChannel> channel) {
  if (absl::Status s = core::ValidateHello(hello); !s.ok()) return s;
  Section section(*this);
  Effects& fx = section.fx;
  const int64_t now = clock_->NowMs();
  auto& slot = workers_[hello.worker_id];
  if (!slot) {
    slot = std::make_unique<Worker>();
    slot->id = hello.worker_id;
  } else if (!slot->secret.empty() && !ConstantTimeEquals(slot->secret, hello.secret)) {
    Log(fx, spdlog::level::warn,
        "refused a hello for worker id {}: it is in use, and the hello did not show its secret",
        Quote(hello.worker_id));
    return absl::PermissionDeniedError(
        absl::StrCat("worker id ", Quote(hello.worker_id),
                     " belongs to another worker stream; a worker picks a fresh id at start"));
  }
  // New, or known only from a lease stored before the restart.
  if (slot->secret.empty()) slot->secret = RandomHex(16);
  Worker& w = *slot;
  // Keep the leases the worker still holds; requeue those lost on the way (never started).
  std::unordered_map<TaskId, int32_t> held;  // task → attempt
  if (hello.master_epoch == epoch_) {
    for (const TaskRef& ref : hello.held) held[ref.id] = ref.attempt;
  }
  const std::vector<TaskId> leases(w.leases.begin(), w.leases.end());
  for (TaskId id : leases) {
    auto it = tasks_.find(id);
    if (it == tasks_.end() || it->second.leased_to() != &w) {
      w.leases.erase(id);
      continue;
    }
    Task& t = it->second;
    if (auto h = held.find(id); h != held.end() && h->second == t.attempts) continue;
    if (t.state == TaskState::kLeased) {
      GiveBack(t);
    } else {
      Unlease(t);
    }
  }
  // Shown in logs, in `taskctl workers` and on every task it ran: printable from here on.
  w.name = Printable(hello.name.empty() ? hello.worker_id : hello.name);
  w.host = Printable(hello.host);
  w.kinds = core::SortedUnique(std::move(hello.kinds));
  w.queues = core::SortedUnique(std::move(hello.queues));
  w.labels = std::move(hello.labels);
  w.slots = hello.slots;
  w.credits = 0;
  w.task_us = 0;  // a new process may run other handlers: it says again once it has measured
  w.generation = next_generation_++;
  w.connected = true;
  w.draining = false;
  w.connected_ms = now;
  w.heard_ms = now;
  w.channel = std::move(channel);
  w.eligible.clear();
  for (auto& [key, cls] : classes_) {
    if (CanRun(w, *cls)) w.eligible.push_back(cls.get());
  }
  Welcome welcome{epoch_,
                  options_.heartbeat_interval_ms,
                  options_.lease_timeout_ms,
                  {},
                  w.secret,
                  options_.partitions};
  size_t adopted = 0;
  const bool awaited = awaited_.contains(w.id);
  for (const auto& [id, attempt] : held) {
    auto it = tasks_.find(id);
    if (it != tasks_.end() && !w.leases.contains(id) &&
        Adopt(it->second, {id, attempt}, w, awaited)) {
      ++adopted;
    }
  }
  for (const TaskRef& ref : hello.held) {
    if (!w.leases.contains(ref.id) || tasks_.at(ref.id).attempts != ref.attempt) {
      welcome.revoked.push_back(ref);
    }
  }
  const size_t revoked = welcome.revoked.size();  // logged below, once `welcome` is moved
  w.outbox = WorkerOutbound{};
  w.outbox.welcome = std::move(welcome);
  MarkDirty(w);
  if (persistent_) store_->PutWorker({w.id, w.secret});
  if (awaited_.erase(w.id) > 0 && awaited_.empty()) {
    Log(fx, spdlog::level::info, "every worker attached before the restart is back: dispatching");
  }
  Log(fx, spdlog::level::info,
      "worker {} ({}) attached: {} slots, kinds [{}], queues [{}], {} leases kept ({} taken "
      "back from the queue), {} revoked",
      w.name, w.host, w.slots, absl::StrJoin(w.kinds, ","), absl::StrJoin(w.queues, ","),
      w.leases.size(), adopted, revoked);
  DispatchAll();  // tasks it gave back may go to others
  return WorkerHandle{w.id, w.generation};
}

void Broker::Impl::AddCredits(const WorkerHandle& handle, int32_t credits, int64_t task_us) {
  Section section(*this);
  Worker* w = FindWorker(handle);
  if (!w || credits <= 0) return;
  Grant(*w, credits, task_us);
  DispatchTo(*w);
}

void Broker::Impl::Report(const WorkerHandle& handle, std::vector<TaskReport> reports,
                          int32_t credits, int64_t task_us) {
  std::shared_ptr<WorkerChannel> channel;
  std::vector<TaskRef> acked;
  acked.reserve(reports.size());
  {
    Section section(*this);
    Effects& fx = section.fx;
    Worker* w = FindWorker(handle);
    if (!w) return;
    channel = w->channel;
    bool gave_back = false;
    for (TaskReport& r : reports) {
      acked.push_back({r.id, r.attempt});
      // An untrusted worker's: cut where a character may end, since clients parse it too.
      if (r.error.size() > kMaxErrorBytes) r.error = ValidUtf8(r.error, kMaxErrorBytes);
      auto it = tasks_.find(r.id);
      if (it == tasks_.end()) continue;
      Task& t = it->second;
      if (t.leased_to() != w || t.attempts != r.attempt) {
        ++duplicates_;  // a stale attempt, or a result already recorded
        continue;
      }
      if (r.outcome == Outcome::kReturned && t.state == TaskState::kLeased) {
        GiveBack(t);
        gave_back = true;
        continue;
      }
      Unlease(t);
      if (t.state != TaskState::kLeased) continue;  // cancelled while it ran: its slot is free
      if (r.outcome != Outcome::kCancelled) {
        t.cls->times->run_seconds.Observe(static_cast<double>(now_ms_ - t.at_ms) / 1000);
      }
      switch (r.outcome) {
        case Outcome::kSucceeded:
          t.Notes().output = std::move(r.output);
          t.Notes().error.clear();
          Finish(t, TaskState::kSucceeded, fx);
          break;
        case Outcome::kFailed:
          t.Notes().error = std::move(r.error);
          if (r.permanent || t.attempts >= t.max_attempts) {
            CountFailure(t, /*dead=*/true);
            Finish(t, TaskState::kDead, fx);
          } else {
            CountFailure(t, /*dead=*/false);
            const int shift = std::min(t.attempts - 1, 30);
            const int64_t backoff =
                std::min(options_.retry_backoff_max_ms, options_.retry_backoff_ms << shift);
            Delay(t, now_ms_ + backoff);
          }
          break;
        case Outcome::kCancelled:
          t.Notes().error = r.error.empty() ? "cancelled" : std::move(r.error);
          Finish(t, TaskState::kCancelled, fx);
          break;
        case Outcome::kReturned:  // handled above
          break;
      }
    }
    Grant(*w, credits, task_us);
    if (!persistent_) {
      // Nothing to wait for: the acks leave with the next tasks, in one message.
      w->outbox.acked = std::move(acked);
      acked.clear();
      MarkDirty(*w);
    }
    if (gave_back) {
      DispatchAll();
    } else {
      DispatchTo(*w);
    }
  }
  if (!channel || acked.empty()) return;
  store_->Flush([channel, acked = std::move(acked)](absl::Status status) mutable {
    // Unacknowledged results stay with the worker, which sends them again after reconnecting.
    if (!status.ok()) return;
    WorkerOutbound message;
    message.acked = std::move(acked);
    channel->Send(std::move(message));
  });
}

void Broker::Impl::Progress(const WorkerHandle& handle, std::vector<TaskProgress> reports) {
  absl::MutexLock lock(&mu_);
  Worker* w = FindWorker(handle);
  if (!w) return;
  const int64_t now = clock_->NowMs();
  // No worker holds more tasks than its leases: what is beyond them cannot be for one.
  if (reports.size() > w->leases.size()) reports.resize(w->leases.size());
  for (TaskProgress& p : reports) {
    // Only for a task this worker holds now, at the attempt it holds: never a stale one.
    auto t = tasks_.find(p.id);
    if (t == tasks_.end() || t->second.leased_to() != w || t->second.attempts != p.attempt)
      continue;
    p.done = std::max<int64_t>(p.done, 0);
    p.total = std::max<int64_t>(p.total, 0);
    p.message = Printable(ValidUtf8(p.message, kMaxProgressMessageBytes));
    p.updated_ms = now;
    progress_[p.id] = std::move(p);
  }
}

bool Broker::Impl::Heartbeat(const WorkerHandle& handle, int32_t stuck) {
  absl::MutexLock lock(&mu_);
  Worker* w = FindWorker(handle);
  if (!w) return false;
  w->heard_ms = clock_->NowMs();
  // Only shown to operators, yet bounded: a worker cannot have more stuck handlers than slots.
  w->stuck = std::clamp(stuck, 0, w->slots);
  return true;
}

void Broker::Impl::Drain(const WorkerHandle& handle) {
  Section section(*this);
  Effects& fx = section.fx;
  Worker* w = FindWorker(handle);
  if (!w) return;
  w->draining = true;
  w->credits = 0;
  Log(fx, spdlog::level::info, "worker {} is draining with {} tasks", w->name, w->leases.size());
}

void Broker::Impl::Detach(const WorkerHandle& handle, bool bye) {
  Section section(*this);
  Effects& fx = section.fx;
  Worker* w = FindWorker(handle);
  if (!w) return;
  if (bye) {
    Log(fx, spdlog::level::info, "worker {} left with {} unfinished tasks", w->name,
        w->leases.size());
    RemoveWorker(*w, absl::StrCat("worker ", w->name, " stopped while running it"), fx);
  } else {
    Log(fx, spdlog::level::warn,
        "worker {} disconnected with {} tasks; they wait {} ms for it to come back", w->name,
        w->leases.size(), options_.reconnect_grace_ms);
    w->connected = false;
    w->channel.reset();
    w->credits = 0;
    w->disconnected_ms = clock_->NowMs();
  }
  DispatchAll();
}

std::vector<WorkerView> Broker::Impl::Workers() const {
  absl::MutexLock lock(&mu_);
  std::vector<WorkerView> out;
  for (const auto& [id, w] : workers_) out.push_back(ViewOf(*w));
  std::sort(out.begin(), out.end(),
            [](const WorkerView& a, const WorkerView& b) { return a.name < b.name; });
  return out;
}

}  // namespace taskmaster
