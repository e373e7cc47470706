// Telling systemd how a Type=notify service is doing (sd_notify): ready, a status line a person
// can read, stopping, and watchdog pings. Every call does nothing when the process was not
// started by systemd (no $NOTIFY_SOCKET), so the daemons call them unconditionally.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <string_view>

namespace taskmaster {

class ServiceNotifier {
 public:
  ServiceNotifier();

  // The status lines are made only when systemd listens: a daemon started by hand does not
  // count its work every few seconds for nobody.
  void Ready(const std::function<std::string()>& status) const;
  void Status(const std::function<std::string()>& status) const;
  void Stopping(std::string_view status) const;
  void Watchdog() const;

  // How often a daemon's loop wakes to ping the watchdog and refresh its status: every 5 s, and
  // at least at half of the unit's WatchdogSec= (as sd_watchdog_enabled(3) advises); hourly when
  // systemd does not listen.
  std::chrono::milliseconds wake_interval() const { return wake_interval_; }

 private:
  void Send(std::string_view state, std::string_view status) const;
  bool listening_ = false;  // $NOTIFY_SOCKET is set
  bool watchdog_ = false;
  std::chrono::milliseconds wake_interval_{std::chrono::hours(1)};
};

}  // namespace taskmaster
