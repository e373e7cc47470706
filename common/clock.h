#pragma once

#include <atomic>
#include <cstdint>

namespace taskmaster {

// Milliseconds since the Unix epoch, on a clock that never jumps: see SystemClock.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual int64_t NowMs() const = 0;
};

// The wall time when the process started, advanced by the monotonic clock since. Every timer
// (leases, grace periods, delays, backoff, retention) runs on it, so a step of the system clock
// changes none of them; the times it shows drift from the system clock by the steps made since
// the start. Stored times are on this clock too, so across a restart the system clock at start is
// the reference (docs/lifecycle.md, "Time"). Thread-safe.
class SystemClock final : public Clock {
 public:
  int64_t NowMs() const override;
  static SystemClock* Get();

 private:
  SystemClock();
  const int64_t start_wall_ms_;
  const int64_t start_steady_ms_;
};

// A clock that moves only when told to, for tests. Thread-safe.
class FakeClock final : public Clock {
 public:
  explicit FakeClock(int64_t start_ms = 1'700'000'000'000) : now_ms_(start_ms) {}
  int64_t NowMs() const override { return now_ms_.load(); }
  void Advance(int64_t ms) { now_ms_ += ms; }

 private:
  std::atomic<int64_t> now_ms_;
};

}  // namespace taskmaster
