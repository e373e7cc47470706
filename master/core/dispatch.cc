// Dispatch: which worker may run which task class, and handing ready tasks to workers with
// credit, best first (highest priority, then oldest), idle slots before prefetch.
#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/util.h"
#include "master/core/broker_impl.h"
#include "master/core/validate.h"

namespace taskmaster {
namespace core {
namespace {

// `v` sorted: a worker's kinds and queues, up to kMaxNames each, are looked up for every task
// class at attach and for every worker when a class appears, under the broker's lock.
bool Contains(const std::vector<std::string>& v, const std::string& s) {
  return std::binary_search(v.begin(), v.end(), s);
}

}  // namespace

std::vector<std::string> SortedUnique(std::vector<std::string> v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

bool CanRun(const Worker& w, const TaskClass& c) {
  if (!Contains(w.queues, c.queue) || !Contains(w.kinds, c.kind)) return false;
  for (const auto& [key, value] : c.labels) {
    auto it = w.labels.find(key);
    if (it == w.labels.end() || it->second != value) return false;
  }
  return true;
}

std::string DescribeClass(const TaskClass& c) {
  std::string out = absl::StrCat("kind '", c.kind, "' on queue '", c.queue, "'");
  if (!c.labels.empty()) {
    absl::StrAppend(&out, " with labels ", absl::StrJoin(c.labels, ",", absl::PairFormatter("=")));
  }
  return out;
}

}  // namespace core

auto Broker::Impl::PopBest(Worker& w) -> Task* {
  TaskClass* best = nullptr;
  int32_t best_priority = 0;
  uint64_t best_seq = 0;
  for (TaskClass* cls : w.eligible) {
    const ReadyEntry* head = nullptr;
    while (!cls->ready.empty()) {
      auto lane = cls->ready.begin();
      while (!lane->second.empty() && IsStale(lane->second.front())) lane->second.pop_front();
      if (lane->second.empty()) {
        cls->ready.erase(lane);
        continue;
      }
      head = &lane->second.front();
      if (!best || lane->first > best_priority ||
          (lane->first == best_priority && head->seq < best_seq)) {
        best = cls;
        best_priority = lane->first;
        best_seq = head->seq;
      }
      break;
    }
  }
  if (!best) return nullptr;
  auto lane = best->ready.begin();
  const TaskId id = lane->second.front().id;
  lane->second.pop_front();
  if (lane->second.empty()) best->ready.erase(lane);
  return &tasks_.at(id);
}

bool Broker::Impl::IsStale(const ReadyEntry& e) const {
  auto it = tasks_.find(e.id);
  return it == tasks_.end() || it->second.state != TaskState::kPending || it->second.seq != e.seq;
}

bool Broker::Impl::CanTake(const Worker& w) const {
  if (!w.connected || w.draining || w.credits <= 0 || w.eligible.empty()) return false;
  const size_t limit = options_.max_worker_backlog_bytes;
  return limit == 0 || !w.channel || w.channel->Backlog() + w.outbox_bytes < limit;
}

bool Broker::Impl::Dispatching() const { return !shutting_down_ && awaited_.empty(); }

void Broker::Impl::EndHoldIfDue(int64_t now, Effects& fx) {
  if (awaited_.empty() || now < hold_until_ms_) return;
  Log(fx, spdlog::level::warn, "dispatching without {} workers attached before the restart ({}...)",
      awaited_.size(), Printable(*awaited_.begin()));
  awaited_.clear();
}

void Broker::Impl::DispatchTo(Worker& w, size_t max_leases) {
  if (!Dispatching()) return;
  while (CanTake(w) && w.leases.size() < max_leases) {
    Task* t = PopBest(w);
    if (!t) break;
    Lease(*t, w);
  }
}

void Broker::Impl::DispatchAll() {
  if (!Dispatching()) return;
  std::vector<Worker*> hungry;
  for (auto& [id, w] : workers_) {
    if (CanTake(*w)) hungry.push_back(w.get());
  }
  for (Worker* w : hungry) {
    if (const int32_t depth = PackDepth(*w); depth > 0) {
      DispatchTo(*w, static_cast<size_t>(w->slots) + static_cast<size_t>(depth));
    }
  }
  for (bool slots_only : {true, false}) {
    bool progress = true;
    while (progress) {
      progress = false;
      for (Worker* w : hungry) {
        if (!CanTake(*w)) continue;
        if (slots_only && static_cast<int32_t>(w->leases.size()) >= w->slots) continue;
        Task* t = PopBest(*w);
        if (!t) continue;
        Lease(*t, *w);
        progress = true;
      }
    }
  }
}

int32_t Broker::Impl::PackDepth(const Worker& w) const {
  if (options_.pack_wait_ms <= 0 || w.task_us <= 0) return 0;
  // Whole rounds only: the slots of a worker filled at once all free up after task_us, so a
  // task queued behind them waits at least that long however many slots it has.
  const double rounds = std::floor(static_cast<double>(options_.pack_wait_ms) * 1000 /
                                   static_cast<double>(w.task_us));
  return static_cast<int32_t>(std::min<double>(rounds * w.slots, core::kMaxHeld));
}

void Broker::Impl::Grant(Worker& w, int32_t credits, int64_t task_us) {
  // A peer's claim, bounded: a day per task says as much as any longer time.
  if (task_us > 0) w.task_us = std::min<int64_t>(task_us, int64_t{86'400} * 1'000'000);
  // Never more tasks out with a worker than it could plausibly run or queue, however many
  // credits it sends while holding its leases. In 64 bits: a peer's count must not overflow ours.
  if (credits > 0) {
    const int64_t room =
        static_cast<int64_t>(core::kMaxHeld) - static_cast<int64_t>(w.leases.size());
    w.credits = static_cast<int32_t>(
        std::max<int64_t>(0, std::min<int64_t>(int64_t{w.credits} + credits, room)));
  }
}

}  // namespace taskmaster
