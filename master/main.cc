// taskmaster: the master daemon. Flags → MasterOptions → Start → wait for a signal → Shutdown.

#include <csignal>

#include "CLI/CLI.hpp"
#include "absl/synchronization/mutex.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/signals.h"
#include "master/rpc/master.h"

int main(int argc, char** argv) {
  taskmaster::BlockDaemonSignals();
  // Debian's absl checks every lock for deadlock cycles; the tests keep that, daemons skip it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  taskmaster::MasterOptions o;
  taskmaster::BrokerOptions& b = o.broker;
  std::string log_level = "info";
  std::string port_file;
  int64_t shutdown_ms = 5'000;
  int64_t tick_ms = o.tick.count();

  CLI::App app{"taskmaster: the master of a distributed task queue"};
  app.add_option("--listen", o.listen, "host:port to listen on (port 0: any free port)")
      ->capture_default_str();
  app.add_option("--tokens", o.tokens_file,
                 "file of 'ROLE TOKEN [TENANT]' and 'limit TENANT KEY=N...' lines (roles: submit, "
                 "work, admin), re-read on SIGHUP");
  app.add_flag("--insecure", o.insecure, "run without authentication (loopback addresses only)");
  app.add_flag("--allow-plaintext", o.allow_plaintext,
               "serve tokens without TLS on an address other than loopback (they travel in clear)");
  app.add_option("--tls-cert", o.tls.cert_file,
                 "PEM certificate: serve TLS (re-read with --tls-key on SIGHUP)");
  app.add_option("--tls-key", o.tls.key_file, "PEM private key of --tls-cert");
  app.add_option("--tls-client-ca", o.tls.client_ca_file,
                 "PEM CA bundle: require client certificates it signed (mutual TLS)");
  std::string sync = "full";
  app.add_option("--store", o.store, "sqlite (durable) or memory (lost on restart)")
      ->check(CLI::IsMember({"sqlite", "memory"}))
      ->capture_default_str();
  o.sqlite.data_dir = taskmaster::DefaultDataDir();
  app.add_option("--data-dir", o.sqlite.data_dir, "where the sqlite store keeps its files")
      ->capture_default_str();
  app.add_option("--sync", sync,
                 "full: fsync every commit; normal: survive a crash, a power loss may lose the "
                 "last commits")
      ->check(CLI::IsMember({"full", "normal"}))
      ->capture_default_str();
  app.add_option("--max-message-bytes", o.max_message_bytes, "largest gRPC message either way")
      ->capture_default_str();
  app.add_option("--handshake-timeout-ms", o.handshake_timeout_ms,
                 "close a connection that has not finished its TLS/HTTP2 handshake by then")
      ->capture_default_str();
  app.add_option("--max-worker-buffer-bytes", o.max_worker_buffer_bytes,
                 "tasks waiting for a worker that does not read its stream, in bytes, before "
                 "the stream is cut")
      ->capture_default_str();
  app.add_option("--max-watches-per-token", o.max_watches_per_token,
                 "job streams (WatchJob, SubmitAndWatch) one token may hold open")
      ->capture_default_str();
  app.add_option("--tenant-max-pending", b.tenant_limits.max_pending,
                 "unfinished tasks one tenant may have (0: no limit; 'limit' lines in the tokens "
                 "file override it)")
      ->capture_default_str();
  app.add_option("--tenant-submit-rate", b.tenant_limits.submit_rate,
                 "tasks per second one tenant may submit, averaged (0: no limit)")
      ->capture_default_str();
  app.add_option("--max-payload-bytes", b.max_payload_bytes, "largest task payload")
      ->capture_default_str();
  app.add_option("--max-batch", b.max_batch,
                 "most tasks in one submit (a job of any size takes several)")
      ->capture_default_str();
  app.add_option("--max-open-jobs", b.max_open_jobs,
                 "jobs being built from several submits at once")
      ->capture_default_str();
  app.add_option("--tenant-max-open-jobs", b.tenant_max_open_jobs,
                 "jobs being built from several submits at once, per tenant")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--open-job-timeout-ms", b.open_job_timeout_ms,
                 "close a job being built when no batch came for this long")
      ->check(CLI::Range(int64_t{1}, int64_t{30} * 24 * 3600 * 1000))
      ->capture_default_str();
  app.add_option("--max-queue-length", b.max_queue_length, "most pending tasks in one queue")
      ->capture_default_str();
  app.add_option("--lease-timeout-ms", b.lease_timeout_ms,
                 "requeue a task when its worker sent no heartbeat for this long")
      ->capture_default_str();
  app.add_option("--heartbeat-ms", b.heartbeat_interval_ms, "heartbeat interval told to workers")
      ->capture_default_str();
  app.add_option("--recovery-hold-ms", b.recovery_hold_ms,
                 "after a restart, how long dispatch waits for the workers that held leases to "
                 "come back and claim what they hold")
      ->capture_default_str();
  app.add_option("--pause-threshold-ms", b.pause_threshold_ms,
                 "a master that did not run for longer than this (paused, starved) gives "
                 "workers the missed time back instead of expiring their leases")
      ->capture_default_str();
  app.add_option("--reconnect-grace-ms", b.reconnect_grace_ms,
                 "how long a disconnected worker keeps its tasks")
      ->capture_default_str();
  app.add_option("--default-timeout-ms", b.default_timeout_ms,
                 "execution timeout of tasks that set none")
      ->capture_default_str();
  app.add_option("--default-max-attempts", b.default_max_attempts,
                 "attempts of tasks that set none")
      ->capture_default_str();
  app.add_option("--retry-backoff-ms", b.retry_backoff_ms, "first retry delay (doubles each time)")
      ->capture_default_str();
  app.add_option("--retry-backoff-max-ms", b.retry_backoff_max_ms, "longest retry delay")
      ->capture_default_str();
  app.add_option("--result-retention-ms", b.result_retention_ms,
                 "how long finished tasks and results are kept")
      ->capture_default_str();
  app.add_option("--tick-ms", tick_ms, "how often timers (leases, delays, retention) run")
      ->capture_default_str();
  app.add_option("--shutdown-timeout-ms", shutdown_ms,
                 "on SIGTERM, how long calls may take to end before they are cancelled")
      ->capture_default_str();
  bool repair = false;
  app.add_flag("--repair", repair,
               "check the store in --data-dir, keep every valid record, move the rest into a "
               "rejected-*.jsonl file beside it, say what was done, and exit");
  app.add_option("--store-reserve-bytes", o.sqlite.reserve_bytes,
                 "disk space held back in the data directory and given up when the disk fills")
      ->capture_default_str();
  app.add_option("--port-file", port_file, "write the port listened on to this file");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  if (absl::Status s = taskmaster::SetupLogging(log_level); !s.ok()) {
    fprintf(stderr, "taskmaster: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  o.tick = std::chrono::milliseconds(tick_ms);
  // Dispatch keeps well under the buffer at which a worker's stream is cut off.
  b.max_worker_backlog_bytes = static_cast<size_t>(o.max_worker_buffer_bytes) / 4;
  o.sqlite.sync = sync == "full" ? taskmaster::SyncMode::kFull : taskmaster::SyncMode::kNormal;
  if (repair) {
    absl::StatusOr<std::string> report = taskmaster::RepairSqliteStore(o.sqlite);
    if (!report.ok()) {
      fprintf(stderr, "taskmaster: %s\n", std::string(report.status().message()).c_str());
      return 1;
    }
    printf("%s\n", report->c_str());
    return 0;
  }
  auto master = taskmaster::Master::Start(o);
  if (!master.ok()) {
    fprintf(stderr, "taskmaster: %s\n", std::string(master.status().message()).c_str());
    return 1;
  }
  if (!port_file.empty()) {
    if (absl::Status s = taskmaster::WritePortFile(port_file, (*master)->port()); !s.ok()) {
      fprintf(stderr, "taskmaster: %s\n", std::string(s.message()).c_str());
      (*master)->Shutdown(std::chrono::milliseconds(0));
      return 1;
    }
  }
  for (;;) {
    const int sig = taskmaster::WaitForSignal(std::chrono::seconds(3600));
    if (sig == SIGINT || sig == SIGTERM) break;
    if (sig == SIGHUP) (*master)->Reload();
  }
  (*master)->Shutdown(std::chrono::milliseconds(shutdown_ms));
  return 0;
}
