// Sizes and periods master, worker and client agree on, each named once. No gRPC here: the
// worker's plain accounting uses them too.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace taskmaster {

// A message that batches items (tasks, results) closes once it holds about this many bytes, so
// no batch comes near a message limit whatever the items' sizes.
inline constexpr size_t kBatchBytes = 1 << 20;
// What a task or a result costs in a batch beyond its payload (or output and error): ids,
// attempt, kind and queue names as they usually are, and protobuf framing. Only batches are cut by
// it, so an estimate serves.
inline constexpr size_t kItemOverheadBytes = 32;

// Limits both ends agree on: one value sets the send and receive caps. 64 MiB: far above a batch
// (kBatchBytes) and a 1 MiB payload, far below what would let one peer exhaust memory.
inline constexpr int kDefaultMaxMessageBytes = 64 << 20;

// Longest message a progress report keeps: a status line, not a log.
inline constexpr size_t kMaxProgressMessageBytes = 256;

// Keepalive pings from a worker to its master tell a dead connection well within a lease: this
// many per lease period (docs/lifecycle.md, "Time"), ...
inline constexpr int64_t kKeepalivesPerLease = 3;
// ... never closer than this, ...
inline constexpr int64_t kMinKeepaliveMs = 1'000;
// ... and this far apart until a welcome says how long leases last.
inline constexpr int64_t kDefaultKeepaliveMs = 30'000;

inline int64_t WorkerKeepaliveMs(int64_t lease_timeout_ms) {
  return std::max(kMinKeepaliveMs, lease_timeout_ms / kKeepalivesPerLease);
}

// The closest pings a master accepts: below what its workers send (WorkerKeepaliveMs), so it never
// answers them with GOAWAY, and within gRPC's sane range.
inline int MasterMinPingIntervalMs(int64_t lease_timeout_ms) {
  return static_cast<int>(std::clamp<int64_t>(lease_timeout_ms / 4, 500, 20'000));
}

}  // namespace taskmaster
