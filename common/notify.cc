// ServiceNotifier through libsystemd.
#include "common/notify.h"

#include <systemd/sd-daemon.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace taskmaster {

ServiceNotifier::ServiceNotifier() {
  const char* socket = std::getenv("NOTIFY_SOCKET");
  listening_ = socket && *socket;
  if (!listening_) return;
  wake_interval_ = std::chrono::seconds(5);
  uint64_t usec = 0;
  // Also checks $WATCHDOG_PID: a child that inherited the variables does not ping for its parent.
  if (sd_watchdog_enabled(/*unset_environment=*/0, &usec) > 0) {
    watchdog_ = true;
    wake_interval_ = std::clamp(
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::microseconds(usec / 2)),
        std::chrono::milliseconds(1), wake_interval_);
  }
}

void ServiceNotifier::Send(std::string_view state, std::string_view status) const {
  if (!listening_) return;
  std::string message(state);
  if (!status.empty()) {
    // One line: the protocol separates assignments by newlines.
    std::string line(status);
    for (char& c : line) {
      if (c == '\n') c = ' ';
    }
    if (!message.empty()) message += '\n';
    message += "STATUS=" + line;
  }
  sd_notify(/*unset_environment=*/0, message.c_str());
}

void ServiceNotifier::Ready(const std::function<std::string()>& status) const {
  if (listening_) Send("READY=1", status());
}

void ServiceNotifier::Status(const std::function<std::string()>& status) const {
  if (listening_) Send("", status());
}

void ServiceNotifier::Stopping(std::string_view status) const { Send("STOPPING=1", status); }

void ServiceNotifier::Watchdog() const {
  if (watchdog_) Send("WATCHDOG=1", "");
}

}  // namespace taskmaster
