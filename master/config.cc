// Every setting of the master, declared once (see common/settings.h).
#include "master/config.h"

#include <limits>

#include "common/files.h"
#include "common/partition.h"

namespace taskmaster {
namespace {

constexpr int64_t kDayMs = int64_t{24} * 3600 * 1000;

}  // namespace

void DeclareMasterSettings(MasterConfig* config, Settings* settings) {
  MasterOptions& o = config->master;
  BrokerOptions& b = o.broker;
  Settings& s = *settings;
  o.sqlite.data_dir = DefaultDataDir();

  s.Add("listen", &o.listen, "host:port to listen on (port 0: any free port)");
  s.Add("tokens", &o.tokens_file,
        "file of 'ROLE TOKEN [TENANT]' and 'limit TENANT KEY=N...' lines (roles: submit, work, "
        "admin), re-read on SIGHUP")
      .Path();
  s.Add("insecure", &o.insecure, "run without authentication (loopback addresses only)");
  s.Add("allow_plaintext", &o.allow_plaintext,
        "serve tokens without TLS on an address other than loopback (they travel in clear)");
  s.Add("tls_cert", &o.tls.cert_file, "PEM certificate: serve TLS (re-read with the key on SIGHUP)")
      .Path();
  s.Add("tls_key", &o.tls.key_file, "PEM private key of the certificate").Path();
  s.Add("tls_client_ca", &o.tls.client_ca_file,
        "PEM CA bundle: require client certificates it signed (mutual TLS)")
      .Path();
  s.Add("admin_listen", &o.admin.http.listen,
        "host:port of the admin listener: /metrics, /healthz, /readyz and the status page (empty: "
        "off; off loopback it serves HTTPS with tls_cert and asks for an admin token)");
  s.Add("admin_allow_plaintext", &o.admin.http.allow_plaintext,
        "serve the admin listener without TLS on an address other than loopback");
  s.Add("max_metric_queues", &o.admin.max_metric_queues,
        "queues exported as metric labels of their own; later ones are summed as '(other)'")
      .Range(1, 100'000);
  s.Add("max_metric_kinds", &b.max_metric_kinds,
        "kinds whose wait and run times are exported apart; later ones share '(other)'")
      .Range(1, 10'000);
  s.Add("grpc_reflection", &o.grpc_reflection,
        "serve gRPC server reflection (the API's schema, without a token) for tools like grpcurl");
  s.Add("store", &o.store,
        "sqlite (durable), postgres (durable, shared by several masters that split the queues' "
        "partitions and take over for each other) or memory (lost on restart)")
      .Choices({"sqlite", "postgres", "memory"});
  s.Add("postgres", &o.postgres.conninfo,
        "the postgres store's database: a libpq connection string or URL, without a password");
  s.Add("postgres_password_file", &o.postgres.password_file,
        "a file holding only the database password (else libpq's PGPASSFILE or ~/.pgpass)")
      .Path();
  s.Add("postgres_lease_ms", &o.postgres.lease_ms,
        "how long a master's hold on a partition lasts unrenewed: another master takes over "
        "within about this long of its death")
      .Range(500, 600'000);
  s.Add("postgres_partitions", &o.postgres.partitions,
        "partitions of the queues, each served by one master at a time (up to this many masters "
        "serve at once; 1: one serves, the others stand by); fixed when the database is first made")
      .Range(1, kMaxPartitions);
  s.Add("advertise", &o.advertise,
        "host:port where clients reach this master, told to those that reach a standby "
        "(default: the listen address)");
  s.Add("data_dir", &o.sqlite.data_dir,
        "where the sqlite store keeps its files (default: $STATE_DIRECTORY under systemd)");
  s.Add("sync", &config->sync,
        "full: fsync every commit; normal: survive a crash, a power loss may lose the last "
        "commits")
      .Choices({"full", "normal"});
  s.Add("store_reserve_bytes", &o.sqlite.reserve_bytes,
        "disk space held back in the data directory and given up when the disk fills");
  s.Add("max_message_bytes", &o.max_message_bytes, "largest gRPC message either way")
      .Range(4096, 1 << 30);
  s.Add("handshake_timeout_ms", &o.handshake_timeout_ms,
        "close a connection that has not finished its TLS/HTTP2 handshake by then")
      .Range(100, 3'600'000);
  s.Add("max_worker_buffer_bytes", &o.max_worker_buffer_bytes,
        "tasks waiting for a worker that does not read its stream, in bytes, before the stream "
        "is cut")
      .Range(1 << 20, int64_t{1} << 40);
  s.Add("max_watches_per_token", &o.max_watches_per_token,
        "job streams (WatchJob, SubmitAndWatch) one token may hold open")
      .Range(1, 1'000'000);
  s.Add("rpc_threads", &o.rpc_threads,
        "threads that run the gRPC calls, each with a completion queue of its own (1: the "
        "lowest latency; 2: many busy worker streams spread over two cores)")
      .Range(1, 64);
  s.Add("hold_first_event", &o.hold_first_event,
        "SubmitAndWatch's first event (the job id) waits for the first results until the next "
        "tick at most, so that a short task's answer comes in one message");
  s.Add("tenant_max_pending", &b.tenant_limits.max_pending,
        "unfinished tasks one tenant may have (0: no limit; 'limit' lines in the tokens file "
        "override it)");
  s.Add("tenant_submit_rate", &b.tenant_limits.submit_rate,
        "tasks per second one tenant may submit, averaged (0: no limit)");
  s.Add("max_payload_bytes", &b.max_payload_bytes, "largest task payload").Range(1, 1 << 30);
  s.Add("max_batch", &b.max_batch, "most tasks in one submit (a job of any size takes several)")
      .Range(1, 10'000'000);
  s.Add("max_open_jobs", &b.max_open_jobs, "jobs being built from several submits at once");
  s.Add("tenant_max_open_jobs", &b.tenant_max_open_jobs,
        "jobs being built from several submits at once, per tenant")
      .Range(1, std::numeric_limits<int64_t>::max());
  s.Add("open_job_timeout_ms", &b.open_job_timeout_ms,
        "close a job being built when no batch came for this long")
      .Range(1, 30 * kDayMs);
  s.Add("max_queue_length", &b.max_queue_length, "most pending tasks in one queue");
  s.Add("pack_wait_ms", &b.pack_wait_ms,
        "a worker that keeps up takes a batch's tasks in one message, as many as it should start "
        "within this, before other workers' idle threads get one each (0: idle threads first)")
      .Range(0, 60'000);
  s.Add("lease_timeout_ms", &b.lease_timeout_ms,
        "requeue a task when its worker sent no heartbeat for this long")
      .Range(100, kDayMs);
  s.Add("heartbeat_ms", &b.heartbeat_interval_ms, "heartbeat interval told to workers")
      .Range(10, kDayMs);
  s.Add("recovery_hold_ms", &b.recovery_hold_ms,
        "after a restart, how long dispatch waits for the workers that held leases to come back "
        "and claim what they hold")
      .Range(0, kDayMs);
  s.Add("pause_threshold_ms", &b.pause_threshold_ms,
        "a master that did not run for longer than this (paused, starved) gives workers the "
        "missed time back instead of expiring their leases")
      .Range(1, kDayMs);
  s.Add("reconnect_grace_ms", &b.reconnect_grace_ms,
        "how long a disconnected worker keeps its tasks")
      .Range(0, kDayMs);
  s.Add("default_timeout_ms", &b.default_timeout_ms, "execution timeout of tasks that set none")
      .Range(1, 30 * kDayMs);
  s.Add("default_max_attempts", &b.default_max_attempts, "attempts of tasks that set none")
      .Range(1, 1000);
  s.Add("retry_backoff_ms", &b.retry_backoff_ms, "first retry delay (doubles each time)")
      .Range(0, kDayMs);
  s.Add("retry_backoff_max_ms", &b.retry_backoff_max_ms, "longest retry delay")
      .Range(0, 30 * kDayMs);
  s.Add("result_retention_ms", &b.result_retention_ms,
        "how long finished tasks and results are kept")
      .Range(0, 3650 * kDayMs);
  s.Add("tick_ms", &config->tick_ms, "how often timers (leases, delays, retention) run")
      .Range(1, 60'000);
  s.Add("shutdown_timeout_ms", &config->shutdown_timeout_ms,
        "on SIGTERM, how long calls may take to end before they are cancelled")
      .Range(0, 3'600'000);
  s.Add("port_file", &config->port_file, "write the port listened on to this file");
  s.Add("log_level", &config->log_level, "trace, debug, info, warn, error")
      .Choices({"trace", "debug", "info", "warn", "warning", "err", "error", "critical", "off"});
  s.Add("log_format", &config->log_format,
        "text (for people) or json (one object a line, for log shippers)")
      .Choices({"text", "json"});
}

void Settle(MasterConfig* config) {
  MasterOptions& o = config->master;
  o.tick = std::chrono::milliseconds(config->tick_ms);
  // Dispatch keeps well under the buffer at which a worker's stream is cut off.
  o.broker.max_worker_backlog_bytes = static_cast<size_t>(o.max_worker_buffer_bytes) / 4;
  o.sqlite.sync = config->sync == "full" ? SyncMode::kFull : SyncMode::kNormal;
}

}  // namespace taskmaster
