// taskmaster: the master daemon. Settings (file, environment, flags) → MasterOptions → Start →
// serve until a signal, telling systemd how it goes → Shutdown.

#include <csignal>

#include "CLI/CLI.hpp"
#include "absl/synchronization/mutex.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/notify.h"
#include "common/signals.h"
#include "master/config.h"
#include "master/rpc/master.h"

int main(int argc, char** argv) {
  taskmaster::BlockDaemonSignals();
  // Debian's absl checks every lock for deadlock cycles; the tests keep that, daemons skip it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  taskmaster::MasterConfig config;
  // Clients and workers read TASKMASTER_ADDR and TASKMASTER_TOKEN, maybe from the same environment.
  taskmaster::Settings settings("TASKMASTER_", {"ADDR", "TOKEN"});
  taskmaster::DeclareMasterSettings(&config, &settings);
  CLI::App app{"taskmaster: the master of a distributed task queue", "taskmaster"};
  bool repair = false;
  app.add_flag("--repair", repair,
               "check the store in --data-dir, keep every valid record, move the rest into a "
               "rejected-*.jsonl file beside it, say what was done, and exit");
  if (std::optional<int> exit_code = settings.ParseCommandLine(app, argc, argv)) return *exit_code;
  taskmaster::Settle(&config);
  taskmaster::MasterOptions& o = config.master;

  if (absl::Status s = taskmaster::SetupLogging(config.log_level, config.log_format); !s.ok()) {
    fprintf(stderr, "taskmaster: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (repair) {
    absl::StatusOr<std::string> report = taskmaster::RepairSqliteStore(o.sqlite);
    if (!report.ok()) {
      fprintf(stderr, "taskmaster: %s\n", std::string(report.status().message()).c_str());
      return 1;
    }
    printf("%s\n", report->c_str());
    return 0;
  }
  const taskmaster::ServiceNotifier notifier;
  notifier.Status([] { return "recovering the store"; });
  auto master = taskmaster::Master::Start(o);
  if (!master.ok()) {
    fprintf(stderr, "taskmaster: %s\n", std::string(master.status().message()).c_str());
    return 1;
  }
  if (!config.port_file.empty()) {
    if (absl::Status s = taskmaster::WritePortFile(config.port_file, (*master)->port()); !s.ok()) {
      fprintf(stderr, "taskmaster: %s\n", std::string(s.message()).c_str());
      (*master)->Shutdown(std::chrono::milliseconds(0));
      return 1;
    }
  }
  // Recovered and listening: only now may systemd start the units ordered after this one.
  auto status = [&] { return (*master)->StatusLine(); };
  notifier.Ready(status);
  for (;;) {
    const int sig = taskmaster::WaitForSignal(notifier.wake_interval());
    if (sig == SIGINT || sig == SIGTERM) break;
    if (sig == SIGHUP) (*master)->Reload();
    if ((*master)->Ticking()) notifier.Watchdog();
    notifier.Status(status);
  }
  notifier.Stopping("draining: telling workers, waiting for calls to end");
  (*master)->Shutdown(std::chrono::milliseconds(config.shutdown_timeout_ms));
  return (*master)->exit_code();
}
