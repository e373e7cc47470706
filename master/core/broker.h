#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/auth.h"
#include "common/clock.h"
#include "master/core/task.h"
#include "master/store/store.h"
#include "spdlog/logger.h"

namespace taskmaster {

struct BrokerOptions {
  // The partition of the queues this broker serves, of how many (see common/partition.h): its
  // task and job ids carry it, and its workers' welcomes say how many there are.
  int32_t partition = 0;
  int32_t partitions = 1;
  // A leased task returns to pending when no heartbeat of its worker came for this long.
  int64_t lease_timeout_ms = 30'000;
  // How often workers send heartbeats; told to them in the Welcome.
  int64_t heartbeat_interval_ms = 5'000;
  // How long a worker whose stream broke may reconnect and keep its leases.
  int64_t reconnect_grace_ms = 10'000;
  // After a restart, dispatch waits this long for the workers that held leases to come back
  // and claim what they hold (a lease granted just before a crash may not be on disk), or less
  // once they are all back.
  int64_t recovery_hold_ms = 3'000;
  // Ticks further apart than this mean the master itself did not run (paused, starved): the
  // time it missed is not counted against workers' leases and grace periods.
  int64_t pause_threshold_ms = 1'000;
  // Execution timeout of a task that does not set one.
  int64_t default_timeout_ms = 300'000;
  // Attempts of a task that does not set them.
  int32_t default_max_attempts = 3;
  // Backoff before retry k (k = 1, 2 ...): base * 2^(k-1), capped.
  int64_t retry_backoff_ms = 1'000;
  int64_t retry_backoff_max_ms = 60'000;
  // A job whose tasks have all finished is kept this long with their results, then forgotten.
  int64_t result_retention_ms = 24 * 3600 * 1000;
  // Input limits: each answers INVALID_ARGUMENT or RESOURCE_EXHAUSTED when crossed.
  size_t max_payload_bytes = 1 << 20;
  size_t max_batch = 100'000;
  size_t max_queue_length = 1'000'000;  // PENDING + DELAYED per queue
  // Distinct (queue, kind, labels) combinations; each keeps a small index for good.
  size_t max_task_classes = 10'000;
  // Dispatch holds tasks back from a worker while this many bytes of tasks sent to it wait to be
  // read (0: no limit): credits count tasks, and a worker that asks for many large ones must not
  // be sent more than its stream may buffer (the service cuts off a worker past that).
  size_t max_worker_backlog_bytes = 0;
  // A worker that keeps up may take new tasks beyond its idle slots, before other workers' idle
  // slots are filled, as long as it is expected to start them within this (0: never). Spread
  // one task per worker in turn, a batch costs a message to every idle worker; sent where it
  // starts as soon, it costs a message per credit window.
  int64_t pack_wait_ms = 2;
  // Jobs built from several submits (SubmitTarget) that are open at once, in all and per
  // tenant; one that gets no batch for open_job_timeout_ms is closed by the master.
  size_t max_open_jobs = 10'000;
  int64_t tenant_max_open_jobs = 1'000;
  int64_t open_job_timeout_ms = 600'000;
  // Of every tenant that no SetTenantLimits names.
  TenantLimits tenant_limits;
  // Metrics keep the times of this many distinct kinds apart; later ones share kOtherKinds, so
  // that clients cannot grow what every scrape exports.
  size_t max_metric_kinds = 50;
  // Failed attempts kept for the status page, newest first.
  size_t recent_failures = 50;

  // A connected worker unheard for this long is shown as silent: three heartbeats missed, or its
  // lease timeout if that comes first.
  int64_t SilentAfterMs() const { return std::min(3 * heartbeat_interval_ms, lease_timeout_ms); }
};

// What the master's metrics and status page read, in one locked pass.
struct BrokerMetrics {
  std::vector<QueueStatsView> queues;
  std::vector<KindTimesView> kinds;
  std::vector<FailureView> failures;  // newest first
  int64_t duplicate_results = 0;
};

// The broker core: queues, leases, retries, results and jobs, in memory, with no gRPC or SQLite
// types. Services translate their protocols to these calls; the store persists changes.
//
// Thread-safe: every call takes one internal mutex and releases it before it sends anything to
// a WorkerChannel, notifies a JobWatcher or waits for the store. Time comes only from the Clock,
// and timers advance only in Tick(), so tests drive it with a FakeClock.
class Broker {
 public:
  // A worker stream as the broker knows it: a reconnect of the same worker id makes a new
  // generation, and calls that carry an older generation are ignored.
  struct WorkerHandle {
    std::string worker_id;
    uint64_t generation = 0;
  };

  Broker(BrokerOptions options, const Clock* clock, Store* store,
         std::shared_ptr<spdlog::logger> log);
  ~Broker();
  Broker(const Broker&) = delete;
  Broker& operator=(const Broker&) = delete;

  // Loads the store's state. Call once, before anything else.
  absl::Status Recover();

  // Runs `done` once every change made so far is durable (see Store::Flush).
  void WhenDurable(std::function<void(absl::Status)> done);

  // ---- Clients ----

  // Every call of a client names its Caller: jobs, tasks and idempotency keys belong to the
  // caller's tenant, and are NOT_FOUND for others (unless the caller sees all).

  // Validates and enqueues a batch as one job of the caller's tenant. `done` runs once the batch is
  // durable (inline for the memory store); the batch is visible to workers at once, as a store
  // never loses what it was given unless the process dies, and then the client was not
  // acknowledged.
  void Submit(const Caller& caller, std::vector<TaskSpec> specs,
              std::function<void(absl::StatusOr<SubmitOutcome>)> done);
  // The same into `target`: a new job, possibly left open, or the next batch of an open job of
  // the caller's tenant (batches are applied in order, each once; an empty one may close it).
  void Submit(const Caller& caller, const SubmitTarget& target, std::vector<TaskSpec> specs,
              std::function<void(absl::StatusOr<SubmitOutcome>)> done);

  absl::StatusOr<TaskView> GetTask(const Caller& caller, TaskId id) const;
  absl::StatusOr<JobView> GetJob(const Caller& caller, const std::string& job_id) const;

  // Cancels one task, or every unfinished task of a job; returns how many were cancelled.
  // A leased task's worker is told to stop it.
  absl::StatusOr<int64_t> CancelTask(const Caller& caller, TaskId id);
  absl::StatusOr<int64_t> CancelJob(const Caller& caller, const std::string& job_id);

  // Results of a job after the first `after` in completion order, at most `max` of them,
  // without their payloads (GetTask has those).
  // Stops after `max` results, or once their outputs and errors reach `max_bytes` (at least one).
  absl::StatusOr<JobEvents> ReadJob(const Caller& caller, const std::string& job_id, int64_t after,
                                    size_t max, size_t max_bytes) const;
  // `watcher` is told after every change of the job until Unwatch.
  absl::Status Watch(const Caller& caller, const std::string& job_id,
                     std::shared_ptr<JobWatcher> watcher);
  void Unwatch(const std::string& job_id, const JobWatcher* watcher);

  // Limits of named tenants, replacing earlier ones; fields of -1 take BrokerOptions'.
  void SetTenantLimits(std::map<std::string, TenantLimits> limits);

  std::vector<QueueStatsView> QueueStats() const;
  std::vector<WorkerView> Workers() const;
  // Results dropped since start: from a stale attempt, or for a task already recorded.
  int64_t DuplicateResults() const;
  BrokerMetrics Metrics() const;

  // ---- Workers ----

  // A worker stream opened. The Welcome (with the tasks it must drop) goes to `channel`.
  absl::StatusOr<WorkerHandle> Attach(WorkerHello hello, std::shared_ptr<WorkerChannel> channel);
  // The worker can take `credits` more tasks; `task_us` > 0: its tasks take that long on average
  // (see BrokerOptions::pack_wait_ms).
  void AddCredits(const WorkerHandle& worker, int32_t credits, int64_t task_us = 0);
  // Results and give-backs, with the credits (and task time) that came with them. Each report is
  // acknowledged on the channel once durable.
  void Report(const WorkerHandle& worker, std::vector<TaskReport> reports, int32_t credits = 0,
              int64_t task_us = 0);
  // Extends every lease of the worker; false when the handle is no longer current.
  // Progress of tasks leased to the worker (others are ignored): the latest is kept while the
  // lease lasts, for GetTask and GetJob.
  void Progress(const WorkerHandle& worker, std::vector<TaskProgress> reports);
  // `stuck`: its handlers past their deadline, shown in the workers list.
  bool Heartbeat(const WorkerHandle& worker, int32_t stuck = 0);
  // The worker takes no more tasks.
  void Drain(const WorkerHandle& worker);
  // The stream ended. With `bye` the worker left for good and its leases return now; otherwise
  // they wait out the reconnect grace.
  void Detach(const WorkerHandle& worker, bool bye);

  // ---- Timers and life cycle ----

  // Promotes due delayed tasks, expires leases and absent workers, drops results past retention.
  // Call it every few hundred milliseconds (and far more often than pause_threshold_ms).
  void Tick();
  // Tells every connected worker and job watcher that the master is stopping, and stops
  // dispatching.
  void Shutdown();
  bool stopping() const;

  std::string epoch() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace taskmaster
