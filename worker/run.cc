// RunWorker, the SDK's main: the config file, then the flags over it, the kinds (built-in, exec,
// plugins, the caller's), the engine, and a drain on SIGTERM/SIGINT (a second one leaves at once).
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/auth.h"
#include "common/logging.h"
#include "common/notify.h"
#include "common/settings.h"
#include "common/signals.h"
#include "common/util.h"
#include "worker/config.h"
#include "worker/exec.h"
#include "worker/handlers.h"
#include "worker/plugin.h"
#include "worker/worker.h"

namespace taskmaster {
namespace {

int Fail(const absl::Status& status) {
  fprintf(stderr, "taskworker: %s\n", std::string(status.message()).c_str());
  return 2;
}

// The value of --config, looked for before the other flags are parsed: the file's values are
// their defaults, so that a flag given overrides the file. RunWorker checks that CLI11 found the
// same.
std::string ConfigPath(int argc, char** argv) {
  constexpr std::string_view kFlag = "--config";
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == kFlag && i + 1 < argc) return argv[i + 1];
    if (arg.starts_with(kFlag) && arg.size() > kFlag.size() && arg[kFlag.size()] == '=') {
      return std::string(arg.substr(kFlag.size() + 1));
    }
  }
  return "";
}

// The kinds the worker runs: the caller's, the built-ins, the config's exec kinds, the plugins'.
absl::Status AddKinds(const WorkerConfig& config, Registry& registry) {
  if (config.builtins) {
    if (absl::Status s = RegisterBuiltins(registry); !s.ok()) return s;
  }
  for (const auto& [kind, spec] : config.exec) {
    if (spec.max_output > static_cast<size_t>(config.worker.master.max_message_bytes)) {
      return absl::InvalidArgumentError(
          absl::StrCat("exec.", kind, ".max_output_bytes (", spec.max_output,
                       ") is more than one result can carry (max_message_bytes ",
                       config.worker.master.max_message_bytes, ")"));
    }
    absl::StatusOr<Handler> handler = MakeExecHandler(kind, spec);
    if (!handler.ok()) return handler.status();
    if (absl::Status s = registry.Register(kind, std::move(*handler)); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("exec kind: ", s.message()));
    }
  }
  for (const std::string& path : config.plugins) {
    if (absl::Status s = LoadPlugin(path, registry); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace

int RunWorker(int argc, char** argv, Registry registry) {
  BlockDaemonSignals();
  // Debian's absl checks every lock for deadlock cycles; the tests keep that, daemons skip it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);

  WorkerConfig config;
  const std::string config_file = ConfigPath(argc, argv);
  std::string config_path = config_file;
  if (!config_path.empty()) {
    if (absl::Status s = LoadWorkerConfig(config_path, &config); !s.ok()) return Fail(s);
  }
  WorkerOptions& o = config.worker;
  std::string queues = absl::StrJoin(o.queues, ",");
  std::string labels;
  int64_t drain_ms = o.drain_timeout.count();
  int64_t reconnect_max_ms = o.reconnect_max.count();
  int64_t prefetch_window_ms = o.prefetch_window.count();
  int64_t progress_interval_ms = o.progress_interval.count();
  std::vector<std::string> plugins;
  bool print_config = false;

  CLI::App app{"taskworker: runs tasks for a taskmaster master"};
  app.add_option("--config", config_path,
                 "TOML file of these settings, exec kinds and pools (flags override)");
  app.add_flag("--print-config", print_config,
               "print the settings in effect (file and flags merged, secrets masked) and exit");
  app.add_option("--master", o.master.address,
                 "host:port of the master, or several comma-separated (masters sharing a "
                 "PostgreSQL store: the one that serves is found and followed)")
      ->envname("TASKMASTER_ADDR");
  app.add_option("--token-file", config.token_file,
                 "file holding a 'work' token (or set TASKMASTER_TOKEN)");
  app.add_option("--threads", o.threads,
                 "tasks run at once in the default pool (default: one per core)");
  app.add_option("--prefetch", o.prefetch,
                 "tasks held beyond running ones (default: adaptive, see --prefetch-window-ms)");
  app.add_option("--prefetch-max", o.prefetch_max, "most tasks an adaptive prefetch holds")
      ->capture_default_str();
  app.add_option("--prefetch-window-ms", prefetch_window_ms,
                 "adaptive prefetch holds about this much work per thread")
      ->capture_default_str();
  app.add_option("--progress-interval-ms", progress_interval_ms,
                 "handlers' progress reaches the master at most this often")
      ->capture_default_str();
  app.add_option("--queues", queues, "queues to take tasks from, comma separated")
      ->capture_default_str();
  app.add_option("--labels", labels, "labels of this worker: k=v,k2=v2");
  app.add_option("--name", o.name, "name shown by taskctl workers (default: host-pid)");
  app.add_option("--plugin", plugins, "shared object registering kinds (repeatable)");
  app.add_option("--drain-timeout-ms", drain_ms,
                 "on SIGTERM, how long running tasks may take to finish")
      ->capture_default_str();
  app.add_option("--reconnect-max-ms", reconnect_max_ms, "longest wait between reconnects")
      ->capture_default_str();
  app.add_option("--max-message-bytes", o.master.max_message_bytes,
                 "largest gRPC message either way (as the master's)")
      ->capture_default_str();
  app.add_option("--tls-ca", o.master.tls_ca_file, "PEM CA bundle: connect with TLS");
  app.add_option("--tls-cert", o.master.tls_cert_file, "PEM client certificate (mutual TLS)");
  app.add_option("--tls-key", o.master.tls_key_file, "PEM key of --tls-cert");
  app.add_option("--admin-listen", o.admin_listen,
                 "host:port of the admin listener: /metrics, /healthz, /readyz (default: off)");
  app.add_flag("--admin-allow-plaintext", o.admin_allow_plaintext,
               "serve the admin listener on an address other than loopback (it has no TLS)");
  app.add_option("--log-level", config.log_level, "trace, debug, info, warn, error")
      ->capture_default_str();
  app.add_option("--log-format", config.log_format,
                 "text (for people) or json (one object a line, for log shippers)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (app.count("--config") > 0 && (config_path.empty() || config_path != config_file)) {
    return Fail(absl::InvalidArgumentError("--config: give one file, as --config FILE"));
  }

  // Only flags given replace the file's lists: a label value may hold what --labels splits on.
  if (app.count("--queues")) o.queues = SplitList(queues);
  if (app.count("--labels")) {
    absl::StatusOr<std::map<std::string, std::string>> parsed = ParseLabels(labels);
    if (!parsed.ok()) return Fail(parsed.status());
    o.labels = *parsed;
  }
  // Secrets may come from systemd's credentials: "$CREDENTIALS_DIRECTORY/token".
  for (std::string* path : {&config.token_file, &o.master.tls_ca_file, &o.master.tls_cert_file,
                            &o.master.tls_key_file}) {
    absl::StatusOr<std::string> expanded = ExpandCredentialsPath(*path);
    if (!expanded.ok()) return Fail(expanded.status());
    *path = std::move(*expanded);
  }
  o.drain_timeout = std::chrono::milliseconds(drain_ms);
  o.prefetch_window = std::chrono::milliseconds(prefetch_window_ms);
  o.progress_interval = std::chrono::milliseconds(progress_interval_ms);
  o.reconnect_max = std::chrono::milliseconds(reconnect_max_ms);
  config.plugins.insert(config.plugins.end(), plugins.begin(), plugins.end());
  if (print_config) {
    const char* env_token = getenv("TASKMASTER_TOKEN");
    std::cout << FormatWorkerConfig(config, config.token_file.empty() && env_token && *env_token);
    return 0;
  }
  if (o.master.address.empty()) {
    return Fail(absl::InvalidArgumentError(
        "no master: give --master, `master` in the --config file, or TASKMASTER_ADDR"));
  }

  if (absl::Status s = SetupLogging(config.log_level, config.log_format); !s.ok()) return Fail(s);
  const std::shared_ptr<spdlog::logger> log = GetLogger("worker");
  absl::StatusOr<PresentedToken> token = LoadPresentedToken(config.token_file);
  if (!token.ok()) return Fail(token.status());
  if (!token->warning.empty()) log->warn("{}", token->warning);
  o.token = std::move(token->token);
  if (absl::Status s = AddKinds(config, registry); !s.ok()) return Fail(s);
  if (std::string warning = CleartextTokenWarning(o.master, !o.token.empty()); !warning.empty()) {
    log->warn("{}", warning);
  }
  absl::StatusOr<std::unique_ptr<Worker>> worker = Worker::Start(o, &registry);
  if (!worker.ok()) return Fail(worker.status());
  // Ready once its pools run: a worker waits for an absent master without failing its unit.
  const ServiceNotifier notifier;
  auto status = [&] { return (*worker)->StatusLine(); };
  notifier.Ready(status);

  // SIGHUP (a closed terminal, a reload sent to every daemon) leaves a worker running: it has
  // nothing to re-read.
  auto stop = [](int sig) { return sig == SIGINT || sig == SIGTERM; };
  // During the drain, how soon its end is noticed.
  constexpr auto kDrainPoll = std::chrono::milliseconds(100);
  while (!stop(WaitForSignal(notifier.wake_interval()))) {
    notifier.Watchdog();
    notifier.Status(status);
  }
  notifier.Stopping("draining: running tasks finish, the others go back to the master");
  std::thread drain([&] { (*worker)->Drain(); });
  while (!(*worker)->Stopped()) {
    notifier.Watchdog();
    if (stop(WaitForSignal(std::min(notifier.wake_interval(), kDrainPoll)))) (*worker)->Abort();
  }
  drain.join();
  return 0;
}

}  // namespace taskmaster
