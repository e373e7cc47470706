#pragma once

#include <atomic>
#include <cstdint>

namespace taskmaster {

// Milliseconds since the Unix epoch. Leases, delays and retention use wall time so that they
// keep their meaning across a master restart.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual int64_t NowMs() const = 0;
};

// The real clock. Thread-safe.
class SystemClock final : public Clock {
 public:
  int64_t NowMs() const override;
  static SystemClock* Get();
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
