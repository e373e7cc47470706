// The broker's input rules: what a submitted task and a worker's hello may hold, with the limits
// that bound what an untrusted peer can make the master keep. Internal to master/core.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "master/core/task.h"

namespace taskmaster::core {

inline constexpr char kDefaultQueue[] = "default";
inline constexpr size_t kMaxIdempotencyKey = 256;
// The longest delay or execution timeout: a century, past any real use and far from overflowing
// what is computed from it (not-before times in int64 milliseconds here, deadlines in int64
// nanoseconds in workers, which end 292 years out).
inline constexpr int64_t kMaxDurationMs = int64_t{100} * 365 * 24 * 3600 * 1000;
inline constexpr int32_t kMaxAttemptsLimit = 100;
inline constexpr int32_t kMaxSlots = 100'000;
// Tasks a worker may hold (leases and credits together, see Grant), and so may say it holds when
// it reconnects: each claim costs the master about 185 bytes while the hello is handled.
inline constexpr size_t kMaxHeld = kMaxSlots;
// A worker's kinds and queues, each.
inline constexpr size_t kMaxNames = 1'000;
// Labels of a task or a worker: how many, and how long a value.
inline constexpr size_t kMaxLabels = 64;
inline constexpr size_t kMaxLabelValue = 256;
// A worker's id, name and host (its id is stored, and all three are shown and logged).
inline constexpr size_t kMaxHelloText = 255;

absl::Status ValidateLabels(const Labels& labels);

// A task as submitted, its defaults filled in; `max_payload_bytes` bounds its payload and labels
// together.
absl::Status ValidateSpec(const TaskSpec& s, size_t max_payload_bytes);

// A worker's hello; an empty queue list becomes the default queue.
absl::Status ValidateHello(WorkerHello& hello);

}  // namespace taskmaster::core
