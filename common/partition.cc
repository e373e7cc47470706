#include "common/partition.h"

#include <charconv>

#include "absl/strings/str_cat.h"

namespace taskmaster {

std::string JobIdPrefixOf(int32_t partition) {
  return partition == 0 ? std::string("job-") : absl::StrCat("job-p", partition, "-");
}

std::optional<int32_t> PartitionOfJob(std::string_view job_id) {
  if (!job_id.starts_with("job-")) return std::nullopt;
  job_id.remove_prefix(4);
  if (!job_id.starts_with("p")) return 0;
  job_id.remove_prefix(1);
  int32_t partition = 0;
  const auto [end, error] =
      std::from_chars(job_id.data(), job_id.data() + job_id.size(), partition);
  if (error != std::errc() || end == job_id.data() || end == job_id.data() + job_id.size() ||
      *end != '-' || partition <= 0 || partition >= kMaxPartitions) {
    return std::nullopt;
  }
  return partition;
}

int32_t PartitionOfKey(std::string_view tenant, std::string_view key, int32_t partitions) {
  if (partitions <= 1) return 0;
  // FNV-1a: stable across processes and builds (absl's hash is salted per process).
  uint64_t h = 1469598103934665603ull;
  for (const std::string_view part : {tenant, std::string_view("\0", 1), key}) {
    for (const char c : part) {
      h ^= static_cast<unsigned char>(c);
      h *= 1099511628211ull;
    }
  }
  return static_cast<int32_t>(h % static_cast<uint64_t>(partitions));
}

}  // namespace taskmaster
