#include "common/clock.h"

#include <chrono>

namespace taskmaster {
namespace {

template <typename C>
int64_t Ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(C::now().time_since_epoch()).count();
}

}  // namespace

SystemClock::SystemClock()
    : start_wall_ms_(Ms<std::chrono::system_clock>()),
      start_steady_ms_(Ms<std::chrono::steady_clock>()) {}

int64_t SystemClock::NowMs() const {
  return start_wall_ms_ + (Ms<std::chrono::steady_clock>() - start_steady_ms_);
}

SystemClock* SystemClock::Get() {
  static SystemClock clock;
  return &clock;
}

}  // namespace taskmaster
