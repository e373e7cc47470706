// ServiceNotifier through libsystemd.
#include "common/notify.h"

#include <systemd/sd-daemon.h>

#include <cstdint>
#include <string>

namespace taskmaster {

ServiceNotifier::ServiceNotifier() {
  uint64_t usec = 0;
  // Also checks $WATCHDOG_PID: a child that inherited the variables does not ping for its parent.
  if (sd_watchdog_enabled(/*unset_environment=*/0, &usec) > 0) {
    watchdog_interval_ = std::chrono::microseconds(usec / 2);
  }
}

void ServiceNotifier::Send(std::string_view state, std::string_view status) const {
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

void ServiceNotifier::Ready(std::string_view status) const { Send("READY=1", status); }

void ServiceNotifier::Status(std::string_view status) const { Send("", status); }

void ServiceNotifier::Stopping(std::string_view status) const { Send("STOPPING=1", status); }

void ServiceNotifier::Watchdog() const {
  if (watchdog_interval_.count() > 0) Send("WATCHDOG=1", "");
}

}  // namespace taskmaster
