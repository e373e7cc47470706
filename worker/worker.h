// The worker's public interface: its options and the engine that connects to a master and runs
// tasks. Everything behind it (slots, pool, session) is internal to worker/.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/grpc_util.h"
#include "worker/handlers.h"

namespace taskmaster {

// A pool of threads with its own credits and prefetch, serving some of the worker's kinds: slow
// I/O kinds in one pool never hold back compute kinds in another, nor the other way round.
struct PoolOptions {
  std::string name;                // [A-Za-z0-9_.-]{1,64}
  int threads = 0;                 // 0: one per core
  std::vector<std::string> kinds;  // empty: every kind no other pool serves
  std::optional<int> prefetch;     // unset: the worker's
};

struct WorkerOptions {
  ChannelOptions master;  // address and transport of the master
  std::string token;      // bearer token with the `work` role; empty for an --insecure master
  std::string name;       // shown in `taskctl workers`; empty: host-pid
  int threads = 0;        // 0: one per core; the size of the default pool
  // Tasks held beyond the running ones. -1: adaptive, enough to cover `prefetch_window` of work
  // judged from how long tasks take (none for long tasks), at most `prefetch_max`.
  int prefetch = -1;
  int prefetch_max = 1000;
  std::chrono::milliseconds prefetch_window{2};
  // Handlers' progress reaches the master at most this often (the latest of each task).
  std::chrono::milliseconds progress_interval{500};
  std::vector<std::string> queues = {"default"};
  std::map<std::string, std::string> labels;
  // Empty: one pool named "default" of `threads` threads runs every kind.
  std::vector<PoolOptions> pools;
  // On Stop, how long running tasks may take to finish before the worker leaves anyway.
  std::chrono::milliseconds drain_timeout{30'000};
  // Reconnect backoff while the master is unreachable: doubles from min to max, with jitter.
  std::chrono::milliseconds reconnect_min{100};
  std::chrono::milliseconds reconnect_max{10'000};
  // host:port of the worker's admin listener (/metrics, /healthz, /readyz); empty: off. Off
  // loopback only with admin_allow_plaintext: it has no certificate of its own.
  std::string admin_listen;
  bool admin_allow_plaintext = false;
};

// A worker process's engine: one stream to the master, a pool of threads running handlers.
// Thread-safe.
class Worker {
 public:
  // `registry` must outlive the worker.
  static absl::StatusOr<std::unique_ptr<Worker>> Start(WorkerOptions options,
                                                       const Registry* registry);
  virtual ~Worker() = default;

  // Stops taking tasks, gives back those not started, lets running ones finish within the
  // drain timeout, delivers their results and leaves. Blocks until done.
  virtual void Drain() = 0;
  // Leaves at once: running tasks are abandoned, and the master requeues them.
  virtual void Abort() = 0;
  // True once the worker has left (after Drain or Abort).
  virtual bool Stopped() const = 0;
  // One line for a person (systemd's STATUS=): whether each pool is connected to the master.
  virtual std::string StatusLine() const = 0;
};

}  // namespace taskmaster
