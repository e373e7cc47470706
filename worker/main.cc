// taskworker: runs tasks for a master. Flags → WorkerOptions → Start → drain on SIGTERM/SIGINT
// (a second signal leaves at once).
#include <csignal>
#include <cstdlib>
#include <thread>

#include "CLI/CLI.hpp"
#include "absl/synchronization/mutex.h"
#include "common/auth.h"
#include "common/logging.h"
#include "common/signals.h"
#include "common/util.h"
#include "worker/worker.h"

int main(int argc, char** argv) {
  taskmaster::BlockDaemonSignals();
  // Debian's absl checks every lock for deadlock cycles; the tests keep that, daemons skip it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  taskmaster::WorkerOptions o;
  std::string token_file, queues = "default", labels, log_level = "info";
  int64_t drain_ms = o.drain_timeout.count();
  int64_t reconnect_max_ms = o.reconnect_max.count();

  CLI::App app{"taskworker: runs tasks for a taskmaster master"};
  app.add_option("--master", o.master.address, "host:port of the master")
      ->envname("TASKMASTER_ADDR")
      ->required();
  app.add_option("--token-file", token_file,
                 "file holding a 'work' token (or set TASKMASTER_TOKEN)");
  app.add_option("--threads", o.threads, "tasks run at once (default: one per core)");
  int64_t prefetch_window_ms = o.prefetch_window.count();
  app.add_option("--prefetch", o.prefetch,
                 "tasks held beyond running ones (default: adaptive, see --prefetch-window-ms)");
  app.add_option("--prefetch-max", o.prefetch_max, "most tasks an adaptive prefetch holds")
      ->capture_default_str();
  app.add_option("--prefetch-window-ms", prefetch_window_ms,
                 "adaptive prefetch holds about this much work per thread")
      ->capture_default_str();
  app.add_option("--queues", queues, "queues to take tasks from, comma separated")
      ->capture_default_str();
  app.add_option("--labels", labels, "labels of this worker: k=v,k2=v2");
  app.add_option("--name", o.name, "name shown by taskctl workers (default: host-pid)");
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
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  auto fail = [](const absl::Status& status) {
    fprintf(stderr, "taskworker: %s\n", std::string(status.message()).c_str());
    return 2;
  };
  if (absl::Status s = taskmaster::SetupLogging(log_level); !s.ok()) return fail(s);
  absl::StatusOr<taskmaster::PresentedToken> token = taskmaster::LoadPresentedToken(token_file);
  if (!token.ok()) return fail(token.status());
  if (!token->warning.empty()) taskmaster::GetLogger("worker")->warn("{}", token->warning);
  o.token = std::move(token->token);
  o.queues = taskmaster::SplitList(queues);
  auto parsed = taskmaster::ParseLabels(labels);
  if (!parsed.ok()) return fail(parsed.status());
  o.labels = *parsed;
  o.drain_timeout = std::chrono::milliseconds(drain_ms);
  o.prefetch_window = std::chrono::milliseconds(prefetch_window_ms);
  o.reconnect_max = std::chrono::milliseconds(reconnect_max_ms);

  taskmaster::Registry registry;
  if (absl::Status s = taskmaster::RegisterBuiltins(registry); !s.ok()) return fail(s);
  if (std::string warning = taskmaster::CleartextTokenWarning(o.master, !o.token.empty());
      !warning.empty()) {
    taskmaster::GetLogger("worker")->warn("{}", warning);
  }
  auto worker = taskmaster::Worker::Start(o, &registry);
  if (!worker.ok()) return fail(worker.status());

  // SIGHUP (a closed terminal, a reload sent to every daemon) leaves a worker running: it has
  // nothing to re-read.
  auto stop = [](int sig) { return sig == SIGINT || sig == SIGTERM; };
  // Any wait will do until the first signal; during the drain, how soon its end is noticed.
  constexpr auto kIdleWait = std::chrono::hours(1);
  constexpr auto kDrainPoll = std::chrono::milliseconds(100);
  while (!stop(taskmaster::WaitForSignal(kIdleWait))) {
  }
  std::thread drain([&] { (*worker)->Drain(); });
  while (!(*worker)->Stopped()) {
    if (stop(taskmaster::WaitForSignal(kDrainPoll))) (*worker)->Abort();
  }
  drain.join();
  return 0;
}
