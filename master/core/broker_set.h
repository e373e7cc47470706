// The brokers of the partitions a master serves, and the way to the others. With one partition
// (SQLite, memory) it holds one broker for good; with PostgreSQL the master adds and removes
// partitions as it takes and hands over their leases. Services ask it which broker a call
// belongs to; one that belongs to a partition served elsewhere is refused UNAVAILABLE with the
// serving master's address, which clients follow.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/partition.h"
#include "master/core/broker.h"

namespace taskmaster {

// Thread-safe.
class BrokerSet {
 public:
  // `owner_of(p)` names where partition p is served when not here (empty: nobody is known to).
  BrokerSet(int32_t partitions, std::function<std::string(int32_t)> owner_of)
      : partitions_(partitions), owner_of_(std::move(owner_of)) {}

  int32_t partitions() const { return partitions_; }

  // Serves partition `p` with `broker` (recovered), until Remove.
  void Add(int32_t p, std::shared_ptr<Broker> broker);
  // Stops serving `p`; returns its broker (null when not served) for the caller to shut down.
  std::shared_ptr<Broker> Remove(int32_t p);
  // The partitions served here, in order.
  std::vector<int32_t> Served() const;
  std::vector<std::shared_ptr<Broker>> Brokers() const;

  // The broker of a partition, task or job; UNAVAILABLE (naming the serving master, see
  // kServingMasterPayload) when it is served elsewhere, or nowhere yet.
  absl::StatusOr<std::shared_ptr<Broker>> ForPartition(int32_t p) const;
  absl::StatusOr<std::shared_ptr<Broker>> ForTask(TaskId id) const;
  absl::StatusOr<std::shared_ptr<Broker>> ForJob(const std::string& job_id) const;
  // Where a submit goes: an open job's own partition; a batch with idempotency keys to the
  // partition of its first key (so that the same batch sent again finds its keys); any other
  // to the partitions served here in turn.
  absl::StatusOr<std::shared_ptr<Broker>> ForSubmit(const Caller& caller,
                                                    const SubmitTarget& target,
                                                    const std::vector<TaskSpec>& specs);

  // For every broker, now and added later.
  void SetTenantLimits(std::map<std::string, TenantLimits> limits);

  // The partitions served at one moment and their brokers: an answer built from one snapshot
  // counts each partition it names, and only those (one may be handed over meanwhile).
  struct Snapshot {
    std::vector<int32_t> served;
    std::vector<std::shared_ptr<Broker>> brokers;
  };
  Snapshot Take() const;
  // Of a snapshot's partitions, merged: a queue's counts summed over partitions, a worker (which
  // holds a stream to each) shown once with its running and stuck tasks summed.
  static std::vector<QueueStatsView> QueueStats(const Snapshot& snapshot);
  static std::vector<WorkerView> Workers(const Snapshot& snapshot);
  static int64_t DuplicateResults(const Snapshot& snapshot);
  // The same, of the partitions served now; Metrics keeps each partition's recent failures.
  std::vector<QueueStatsView> QueueStats() const { return QueueStats(Take()); }
  std::vector<WorkerView> Workers() const { return Workers(Take()); }

  // The masters known to serve the partitions a snapshot does not hold, each once.
  std::vector<std::string> OtherMasters(const Snapshot& snapshot) const;
  BrokerMetrics Metrics() const;
  // Of the first partition served here ("" with none).
  std::string epoch() const;

  void Tick();
  // Shuts down every broker; none is removed.
  void Shutdown();

 private:
  const int32_t partitions_;
  const std::function<std::string(int32_t)> owner_of_;
  mutable absl::Mutex mu_;
  std::map<int32_t, std::shared_ptr<Broker>> brokers_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, TenantLimits> limits_ ABSL_GUARDED_BY(mu_);
  uint64_t next_submit_ ABSL_GUARDED_BY(mu_) = 0;  // round robin over brokers_
};

}  // namespace taskmaster
