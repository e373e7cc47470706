// Telling systemd how a Type=notify service is doing (sd_notify): ready, a status line a person
// can read, stopping, and watchdog pings. Every call does nothing when the process was not
// started by systemd (no $NOTIFY_SOCKET), so the daemons call them unconditionally.
#pragma once

#include <chrono>
#include <string_view>

namespace taskmaster {

class ServiceNotifier {
 public:
  ServiceNotifier();

  void Ready(std::string_view status) const;
  void Status(std::string_view status) const;
  void Stopping(std::string_view status) const;
  void Watchdog() const;

  // How often to call Watchdog: half of the unit's WatchdogSec=, as sd_watchdog_enabled(3)
  // advises; zero when the unit has no watchdog.
  std::chrono::microseconds watchdog_interval() const { return watchdog_interval_; }

 private:
  void Send(std::string_view state, std::string_view status) const;
  std::chrono::microseconds watchdog_interval_{0};
};

}  // namespace taskmaster
