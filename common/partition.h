// Partitions of the queues: with the PostgreSQL store, each is owned by one master at a time, and
// every task and job id says which partition it lives in, so that any master can tell where a
// call belongs without a lookup. With one partition (SQLite, memory) every id is partition 0's,
// as ids were before partitions existed.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace taskmaster {

// The payload of an UNAVAILABLE refusal that names the master serving the call's partition.
inline constexpr char kServingMasterPayload[] = "taskmaster/serving-master";

// A master holds at most this many partitions; a worker holds a stream per partition.
inline constexpr int32_t kMaxPartitions = 256;

// A task id is its partition in the bits above kPartitionShift and a sequence below.
inline constexpr int kPartitionShift = 48;

inline uint64_t FirstTaskIdOf(int32_t partition) {
  return (static_cast<uint64_t>(partition) << kPartitionShift) + 1;
}

inline int32_t PartitionOfTask(uint64_t task_id) {
  return static_cast<int32_t>(task_id >> kPartitionShift);
}

// Job ids: "job-<hex>" in partition 0, "job-p<N>-<hex>" in partition N.
std::string JobIdPrefixOf(int32_t partition);
// The partition a job id names; nullopt for an id no master made.
std::optional<int32_t> PartitionOfJob(std::string_view job_id);

// Where a batch whose first idempotency key is `key` goes, of `partitions`: the same batch sent
// again (after a lost answer) reaches the same partition, which finds its keys.
int32_t PartitionOfKey(std::string_view tenant, std::string_view key, int32_t partitions);

}  // namespace taskmaster
