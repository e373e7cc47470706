#include "master/core/broker_set.h"

#include <algorithm>
#include <iterator>
#include <set>
#include <string>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "common/partition.h"

namespace taskmaster {
namespace {

// One queue's counts over the partitions, by name.
class QueueSums {
 public:
  void Add(const QueueStatsView& q) {
    auto [it, added] = sums_.try_emplace(q.queue, q);
    if (!added) AddCounts(it->second, q);
  }
  std::vector<QueueStatsView> Take() && {
    std::vector<QueueStatsView> out;
    for (auto& [name, q] : sums_) out.push_back(std::move(q));
    return out;
  }

 private:
  std::map<std::string, QueueStatsView> sums_;
};

}  // namespace

void BrokerSet::Add(int32_t p, std::shared_ptr<Broker> broker) {
  std::map<std::string, TenantLimits> limits;
  {
    absl::MutexLock lock(&mu_);
    limits = limits_;
  }
  broker->SetTenantLimits(std::move(limits));
  absl::MutexLock lock(&mu_);
  brokers_[p] = std::move(broker);
}

std::shared_ptr<Broker> BrokerSet::Remove(int32_t p) {
  absl::MutexLock lock(&mu_);
  auto node = brokers_.extract(p);
  return node.empty() ? nullptr : std::move(node.mapped());
}

std::vector<int32_t> BrokerSet::Served() const {
  absl::MutexLock lock(&mu_);
  std::vector<int32_t> served;
  for (const auto& [p, broker] : brokers_) served.push_back(p);
  return served;
}

std::vector<std::shared_ptr<Broker>> BrokerSet::Brokers() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Broker>> all;
  for (const auto& [p, broker] : brokers_) all.push_back(broker);
  return all;
}

absl::StatusOr<std::shared_ptr<Broker>> BrokerSet::ForPartition(int32_t p) const {
  if (p < 0 || p >= partitions_) {
    return absl::InvalidArgumentError(
        absl::StrCat("partition ", p, " does not exist: the queues have ", partitions_));
  }
  {
    absl::MutexLock lock(&mu_);
    if (auto it = brokers_.find(p); it != brokers_.end()) return it->second;
  }
  const std::string owner = owner_of_ ? owner_of_(p) : "";
  absl::Status refused = absl::UnavailableError(
      owner.empty() ? absl::StrCat("partition ", p, " is being taken over; retry in a moment")
                    : absl::StrCat("partition ", p, " is served by the master at ", owner));
  if (!owner.empty()) refused.SetPayload(kServingMasterPayload, absl::Cord(owner));
  return refused;
}

absl::StatusOr<std::shared_ptr<Broker>> BrokerSet::ForTask(TaskId id) const {
  const int32_t p = PartitionOfTask(id);
  if (p >= partitions_) return absl::NotFoundError(absl::StrCat("no task ", id));
  return ForPartition(p);
}

absl::StatusOr<std::shared_ptr<Broker>> BrokerSet::ForJob(const std::string& job_id) const {
  const std::optional<int32_t> p = PartitionOfJob(job_id);
  if (!p || *p >= partitions_) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  return ForPartition(*p);
}

absl::StatusOr<std::shared_ptr<Broker>> BrokerSet::ForSubmit(const Caller& caller,
                                                             const SubmitTarget& target,
                                                             const std::vector<TaskSpec>& specs) {
  if (!target.job_id.empty()) return ForJob(target.job_id);
  for (const TaskSpec& spec : specs) {
    if (!spec.idempotency_key.empty()) {
      return ForPartition(PartitionOfKey(caller.tenant, spec.idempotency_key, partitions_));
    }
  }
  {
    absl::MutexLock lock(&mu_);
    if (!brokers_.empty()) {
      auto it = brokers_.begin();
      std::advance(it, next_submit_++ % brokers_.size());
      return it->second;
    }
  }
  return ForPartition(0);  // nothing served here: names a master that serves
}

void BrokerSet::SetTenantLimits(std::map<std::string, TenantLimits> limits) {
  {
    absl::MutexLock lock(&mu_);
    limits_ = limits;
  }
  for (const std::shared_ptr<Broker>& broker : Brokers()) broker->SetTenantLimits(limits);
}

BrokerSet::Snapshot BrokerSet::Take() const {
  absl::MutexLock lock(&mu_);
  Snapshot snapshot;
  for (const auto& [p, broker] : brokers_) {
    snapshot.served.push_back(p);
    snapshot.brokers.push_back(broker);
  }
  return snapshot;
}

std::vector<QueueStatsView> BrokerSet::QueueStats(const Snapshot& snapshot) {
  QueueSums sums;
  for (const std::shared_ptr<Broker>& broker : snapshot.brokers) {
    for (const QueueStatsView& q : broker->QueueStats()) sums.Add(q);
  }
  return std::move(sums).Take();
}

std::vector<WorkerView> BrokerSet::Workers(const Snapshot& snapshot) {
  std::map<std::string, WorkerView> merged;
  for (const std::shared_ptr<Broker>& broker : snapshot.brokers) {
    for (WorkerView& w : broker->Workers()) {
      auto [it, added] = merged.try_emplace(w.worker_id, w);
      if (added) continue;
      WorkerView& m = it->second;
      m.running += w.running;
      m.stuck += w.stuck;  // each stream counts its own partition's stuck handlers
      m.connected = m.connected || w.connected;
      m.draining = m.draining || w.draining;
      m.connected_ms = std::min(m.connected_ms, w.connected_ms);
      m.heartbeat_age_ms = std::min(m.heartbeat_age_ms, w.heartbeat_age_ms);
      m.silent = m.silent && w.silent;
    }
  }
  std::vector<WorkerView> out;
  for (auto& [id, w] : merged) out.push_back(std::move(w));
  return out;
}

int64_t BrokerSet::DuplicateResults(const Snapshot& snapshot) {
  int64_t total = 0;
  for (const std::shared_ptr<Broker>& broker : snapshot.brokers) {
    total += broker->DuplicateResults();
  }
  return total;
}

std::vector<std::string> BrokerSet::OtherMasters(const Snapshot& snapshot) const {
  const std::set<int32_t> served(snapshot.served.begin(), snapshot.served.end());
  std::set<std::string> others;
  for (int32_t p = 0; owner_of_ && p < partitions_; ++p) {
    if (served.contains(p)) continue;
    if (std::string owner = owner_of_(p); !owner.empty()) others.insert(std::move(owner));
  }
  return {others.begin(), others.end()};
}

BrokerMetrics BrokerSet::Metrics() const {
  BrokerMetrics out;
  QueueSums queues;
  std::map<std::string, KindTimesView> kinds;
  for (const std::shared_ptr<Broker>& broker : Brokers()) {
    BrokerMetrics m = broker->Metrics();
    out.duplicate_results += m.duplicate_results;
    for (const QueueStatsView& q : m.queues) queues.Add(q);
    for (KindTimesView& k : m.kinds) {
      auto [it, added] = kinds.try_emplace(k.kind, k);
      if (added) continue;
      it->second.wait_seconds.Merge(k.wait_seconds);
      it->second.run_seconds.Merge(k.run_seconds);
    }
    std::move(m.failures.begin(), m.failures.end(), std::back_inserter(out.failures));
  }
  out.queues = std::move(queues).Take();
  for (auto& [name, k] : kinds) out.kinds.push_back(std::move(k));
  // Each partition's newest (BrokerOptions::recent_failures of each), newest first.
  std::stable_sort(
      out.failures.begin(), out.failures.end(),
      [](const FailureView& a, const FailureView& b) { return a.time_ms > b.time_ms; });
  return out;
}

std::string BrokerSet::epoch() const {
  absl::MutexLock lock(&mu_);
  return brokers_.empty() ? std::string() : brokers_.begin()->second->epoch();
}

void BrokerSet::Tick() {
  for (const std::shared_ptr<Broker>& broker : Brokers()) broker->Tick();
}

void BrokerSet::Shutdown() {
  for (const std::shared_ptr<Broker>& broker : Brokers()) broker->Shutdown();
}

}  // namespace taskmaster
