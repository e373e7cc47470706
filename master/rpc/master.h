// The Master: a broker, its store and the gRPC server wired together, with its options.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/grpc_util.h"
#include "master/admin/admin.h"
#include "master/core/broker.h"
#include "master/rpc/tls.h"
#include "master/store/postgres_store.h"
#include "master/store/sqlite_store.h"

namespace taskmaster {

struct MasterOptions {
  // host:port to listen on; port 0 picks a free port (see Master::port).
  std::string listen = "127.0.0.1:7070";
  // File of `ROLE TOKEN [TENANT]` and `limit` lines (see TokenSet). Required unless `insecure`;
  // re-read by Reload.
  std::string tokens_file;
  // No authentication at all; allowed on loopback addresses only.
  bool insecure = false;
  // Tokens without TLS on an address other than loopback: refused unless this is set.
  bool allow_plaintext = false;
  // TLS: the master's certificate and key; with a client CA, clients must present a
  // certificate it signed (mutual TLS). Re-read by Reload.
  TlsFiles tls;
  int max_message_bytes = kDefaultMaxMessageBytes;
  // A connection that has not finished its TLS and HTTP/2 handshake by then is closed: anyone who
  // can reach the port could otherwise hold a descriptor each for gRPC's default, 120 s.
  int64_t handshake_timeout_ms = 20'000;
  // What may wait for a worker that does not read its stream before the stream is cut.
  int64_t max_worker_buffer_bytes = 256 << 20;
  // WatchJob and SubmitAndWatch streams one token may hold open at once.
  int64_t max_watches_per_token = 1000;
  // SubmitAndWatch's first event, which names the job, waits for the job's first results until
  // the next tick at most, so that a short task's answer reaches the client in one message.
  bool hold_first_event = true;
  // "sqlite" (durable, under data_dir), "postgres" (durable, shared by several masters, of
  // which one serves and the others stand by) or "memory" (state lost when the master stops).
  std::string store = "sqlite";
  SqliteStoreOptions sqlite;
  PostgresStoreOptions postgres;
  // host:port where clients reach this master, told to those that reach a standby (empty: the
  // listen address, with this host's name when it listens on every address).
  std::string advertise;
  // The admin listener (metrics, probes, the status page); off when its address is empty. It
  // serves HTTPS with the master's certificate when the master has one, and asks for an admin
  // token when the master has tokens and the listener is off loopback.
  MasterAdminOptions admin;
  // The gRPC server reflection service, for tools such as grpcurl: it tells only the API's
  // schema (public in docs/api.md), but answers without a token, so it is off unless asked.
  bool grpc_reflection = false;
  // Threads that run the calls, each serving a completion queue of its own. One costs the least
  // per message and gives the lowest latency; a second spreads many busy worker streams over
  // two cores.
  int64_t rpc_threads = 1;
  // How often leases, delays and retention are checked.
  std::chrono::milliseconds tick{100};
  BrokerOptions broker;
};

// A running master: broker, store and gRPC server. Thread-safe.
class Master {
 public:
  static absl::StatusOr<std::unique_ptr<Master>> Start(const MasterOptions& options);
  virtual ~Master() = default;

  // The port the server listens on (the chosen one when options.listen asked for port 0).
  virtual int port() const = 0;
  // Re-reads the tokens file and the TLS files (on SIGHUP). What fails its checks is refused
  // with a log line, and the master keeps what it had; connections and streams stay open.
  virtual void Reload() = 0;
  // Tells workers, stops accepting, and waits for calls to end until `deadline` has passed,
  // then cancels what is left.
  virtual void Shutdown(std::chrono::milliseconds deadline) = 0;
  // The admin listener's port; 0 when it is off.
  virtual int admin_port() const = 0;
  // One line for a person (systemd's STATUS=): where it listens and what it holds.
  virtual std::string StatusLine() const = 0;
  // Whether the timers ticked lately. Gates the watchdog pings, so that systemd restarts a master
  // whose serving loop hung rather than one whose main thread merely runs.
  virtual bool Ticking() const = 0;
  // The process's exit code once it stopped: 0, or EX_TEMPFAIL (75) when another master took
  // its partition over (its supervisor restarts it, and it stands by).
  virtual int exit_code() const = 0;
};

}  // namespace taskmaster
