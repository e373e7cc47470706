// Broker::Impl, the broker core's state and every operation on it, declared in one place and
// defined by concern: submit.cc, dispatch.cc, transitions.cc, jobs.cc, workers.cc, timers.cc,
// recovery.cc (broker.cc forwards the public calls). Internal to master/core.
//
// Every field is guarded by mu_, and every helper that touches them says so with
// ABSL_EXCLUSIVE_LOCKS_REQUIRED; the clang build (scripts/thread_safety.sh) checks it. A public
// operation holds mu_ through a Section, which sends, notifies and logs what the operation left
// to do only after releasing it: nothing leaves the broker under its lock.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <queue>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "master/core/broker.h"
#include "master/core/state.h"

namespace taskmaster {

// Of each failed attempt's error, what the status page keeps (GetTask has it whole).
inline constexpr size_t kMaxFailureErrorBytes = 512;

class Broker::Impl {
 public:
  using Account = core::Account;
  using Effects = core::Effects;
  using Job = core::Job;
  using QueueCounters = core::QueueCounters;
  using ReadyEntry = core::ReadyEntry;
  using Task = core::Task;
  using TaskClass = core::TaskClass;
  using TaskNotes = core::TaskNotes;
  using Worker = core::Worker;

  Impl(BrokerOptions options, const Clock* clock, Store* store,
       std::shared_ptr<spdlog::logger> log);

  // A locked section: holds mu_ from construction; at its end, collects what the section changed
  // for the store and the workers, releases mu_, and only then logs, sends and notifies.
  class ABSL_SCOPED_LOCKABLE Section {
   public:
    explicit Section(Impl& b) ABSL_EXCLUSIVE_LOCK_FUNCTION(b.mu_);
    ~Section() ABSL_UNLOCK_FUNCTION();
    Section(const Section&) = delete;
    Section& operator=(const Section&) = delete;

    Effects fx;

   private:
    Impl& b_;
  };

  // ---- The operations behind Broker's public calls (see broker.h) ----
  absl::Status Recover();
  void Submit(const Caller& caller, const SubmitTarget& target, std::vector<TaskSpec> specs,
              std::function<void(absl::StatusOr<SubmitOutcome>)> done);
  absl::StatusOr<TaskView> GetTask(const Caller& caller, TaskId id) const;
  absl::StatusOr<JobView> GetJob(const Caller& caller, const std::string& job_id) const;
  absl::StatusOr<int64_t> CancelTask(const Caller& caller, TaskId id);
  absl::StatusOr<int64_t> CancelJob(const Caller& caller, const std::string& job_id);
  absl::StatusOr<JobEvents> ReadJob(const Caller& caller, const std::string& job_id, int64_t after,
                                    size_t max, size_t max_bytes) const;
  absl::Status Watch(const Caller& caller, const std::string& job_id,
                     std::shared_ptr<JobWatcher> watcher);
  void Unwatch(const std::string& job_id, const JobWatcher* watcher);
  void SetTenantLimits(std::map<std::string, TenantLimits> limits);
  std::vector<QueueStatsView> QueueStats() const;
  std::vector<WorkerView> Workers() const;
  int64_t DuplicateResults() const;
  BrokerMetrics Metrics() const;
  absl::StatusOr<WorkerHandle> Attach(WorkerHello hello, std::shared_ptr<WorkerChannel> channel);
  void AddCredits(const WorkerHandle& worker, int32_t credits, int64_t task_us);
  void Report(const WorkerHandle& worker, std::vector<TaskReport> reports, int32_t credits,
              int64_t task_us);
  void Progress(const WorkerHandle& worker, std::vector<TaskProgress> reports);
  bool Heartbeat(const WorkerHandle& worker, int32_t stuck);
  void Drain(const WorkerHandle& worker);
  void Detach(const WorkerHandle& worker, bool bye);
  void Tick();
  void Shutdown();
  bool stopping() const;
  // Lets the store finish: no store callback into the broker runs after it returns.
  void CloseStore();
  const std::string& epoch() const { return epoch_; }
  Store* store() const { return store_; }

 private:
  class Loader;

  // ---- Jobs: what clients see, completion, retention, cancel ----
  // Results become visible (to job watchers, and to GetTask without waiting) only once they are
  // on disk, so no client ever sees a result that a crash could take back.
  void RevealWhenDurable(uint64_t through, std::vector<std::string> job_ids);
  // A job or task as `caller` may see it: a staged one (not on disk yet) does not exist for
  // clients, nor does another tenant's (the same answer as for an id never used, so guessing ids
  // tells nothing).
  static bool Sees(const Caller& caller, const Job& job);
  absl::StatusOr<Job*> VisibleJob(const Caller& caller, const std::string& job_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<const Task*> VisibleTask(const Caller& caller, TaskId id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool Settled(const Task& t) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CountDone(Job* job, const Task& t, Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A complete job and its results are kept for the retention time, then forgotten together.
  void MaybeJobComplete(Job* job, int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Forgets a job with its own tasks (tasks it follows through idempotency keys stay).
  void DeleteJob(Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Returns whether the task was cancelled (false when it had finished already).
  bool CancelLocked(Task& t, Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  WorkerView ViewOf(const Worker& w) const;
  TaskView ViewOf(const Task& t, bool with_payload = true) const;
  // Progress as the disk has it: results still being written do not count yet.
  JobView ViewOf(const Job& j) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string WaitingFor(const Task& t) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // ---- Submit: admission, idempotency keys, tenant limits, staging ----
  // Validates and enqueues a batch as a new job or into an open one (`target`). With a
  // persistent store the new tasks stay staged (see Job::staged and Job::append) and their rows
  // go to `rows`; Publish or Discard ends the staging.
  absl::StatusOr<SubmitOutcome> SubmitLocked(const Caller& caller, const SubmitTarget& target,
                                             std::vector<TaskSpec>& specs, Effects& fx,
                                             SubmitRows* rows) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The open job a batch goes to, when it may: the caller's, open, with no batch on its way to
  // the store, and this batch the next one. Sets `duplicate` for a batch applied before.
  absl::StatusOr<Job*> AppendTarget(const Caller& caller, const SubmitTarget& target,
                                    bool* duplicate) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A batch joins its open job: its tasks (staged in `batch`, or already in `job` with a memory
  // store) count, and the job takes the batch's open flag. A closed job may complete now.
  // `counts`: a client's batch, which takes the next batch number.
  void JoinBatch(Job& job, std::unique_ptr<Job> batch, bool keep_open, bool counts, Effects& fx)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Where an idempotency key is found: keys of different tenants never meet. A newline cannot be
  // part of a tenant name.
  static std::string KeyIndex(const std::string& tenant, const std::string& key);
  static std::string KeyIndex(const Task& t) { return KeyIndex(t.job->tenant, t.key()); }

  TenantLimits LimitsOf(const std::string& tenant) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Admits `tasks` more tasks of `tenant` against its limits, or says which one they cross.
  absl::Status Charge(const std::string& tenant, Account& account, int64_t tasks, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A resubmitted idempotency key must come with the same work: the client would otherwise
  // read the first task's result as the answer to a different one.
  absl::Status CheckKey(const std::string& tenant, const TaskSpec& s,
                        std::unordered_map<std::string_view, const TaskSpec*>& batch_keys) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The store has a staged job (or batch): its tasks become visible and ready.
  // `from`: the first of job.tasks that was staged (a batch joined the job at that index).
  void Publish(Job& job, size_t from = 0) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The store failed to write a staged job (or batch): its tasks leave no trace. The caller
  // erases the job itself.
  void Discard(Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A resubmitted idempotency key: the new job follows the original task.
  void AddExistingToJob(Job* job, TaskId id, Effects& fx, SubmitRows* rows)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  TaskClass* ClassFor(const std::string& queue, const std::string& kind, const Labels& labels)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool HasWorkerFor(const TaskClass& cls) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // ---- State transitions: counters follow every one of them ----
  // Marks `t` for the store; Collect sends its status once per locked section.
  void Touch(Task& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves `t` to `state`; the queue's pending (PENDING and DELAYED) and leased counts follow.
  void SetState(Task& t, TaskState state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The worker holding `t` holds it no more (its slot is free).
  void Unlease(Task& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MakeReady(Task& t, bool front) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A new task takes its place: ready at the back of its lane, or delayed.
  void Enqueue(Task& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Delay(Task& t, int64_t not_before) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `w` holds `t` at `attempt`.
  void LeaseTo(Task& t, Worker& w, int32_t attempt) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Lease(Task& t, Worker& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A failed attempt of `t` (its error set): counted, retried unless `dead`, and kept for the
  // status page's list.
  void CountFailure(const Task& t, bool dead) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The counters of every queue, with the age of its oldest ready task.
  std::vector<QueueStatsView> QueueStatsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  KindTimesView* TimesOf(const std::string& kind) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The worker no longer holds `t`; a leased task is counted as a failed attempt.
  void LoseLease(Task& t, const std::string& reason, Effects& fx)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A reconnecting worker holds `t` (running it, or with its result on the way), but the master
  // has it waiting to be run: its lease was lost with a master crash before it was stored, or
  // expired while the worker was away. The worker keeps it, so it is not run a second time.
  // Returns whether it did.
  // `awaited`: the master, restarted, waits for this worker (it was attached before).
  bool Adopt(Task& t, const TaskRef& ref, Worker& w, bool awaited)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A leased task goes back without using its attempt (it never started).
  void GiveBack(Task& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Finish(Task& t, TaskState state, Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Erases a task; its class goes with its last task, so that combinations nobody uses any more
  // do not count against --max-task-classes for good.
  void Forget(std::unordered_map<TaskId, Task>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  TaskStatusRow StatusOf(const Task& t) const;
  TaskRow RowOf(const Task& t) const;
  void Collect(Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `w` has something to send; Collect sends it once the section ends.
  void MarkDirty(Worker& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // ---- Dispatch ----
  // The best ready task `w` can run: highest priority, then oldest. Drops stale entries.
  Task* PopBest(Worker& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool IsStale(const ReadyEntry& e) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool CanTake(const Worker& w) const;
  // Nothing is handed out while the master stops, or while it waits after a restart for workers
  // to claim what they hold.
  bool Dispatching() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Stops waiting for workers after a restart once the hold has passed.
  void EndHoldIfDue(int64_t now, Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Hands `w` ready tasks while it has credit, until it holds `max_leases`.
  void DispatchTo(Worker& w, size_t max_leases = SIZE_MAX) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Hands ready tasks to every worker with credit: first to the workers that keep up, each filled
  // up to its PackDepth in one message; then one at a time round robin to workers with an idle
  // slot; then into prefetch. No task waits behind a busy worker longer than pack_wait_ms while
  // another worker has a slot free.
  void DispatchAll() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Adds credits, and records how long `w` says its tasks take (task_us > 0).
  void Grant(Worker& w, int32_t credits, int64_t task_us) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // How many tasks `w` may hold beyond its slots and still start each within pack_wait_ms.
  int32_t PackDepth(const Worker& w) const;

  // ---- Workers ----
  Worker* FindWorker(const WorkerHandle& h) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Returns every lease of `w` (counting the attempt) and forgets the worker.
  void RemoveWorker(Worker& w, const std::string& reason, Effects& fx)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // ---- Timers ----
  // A master that did not run (SIGSTOP, a starved host) heard nothing meanwhile: that silence is
  // its own, so every worker's lease and reconnect grace get the missed time back before anything
  // expires, and the heartbeats that waited in the sockets arrive in time.
  void ForgivePause(int64_t now, Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // The outcome of storing a staged job or batch: published, or discarded without a trace.
  void Staged(const std::string& job_id, bool append, const absl::Status& stored);
  // Tick's work under the lock; returns the open jobs to close for idling.
  std::vector<std::string> TickLocked(Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Open jobs that had no batch for the open-job timeout.
  std::vector<std::string> IdleOpenJobs(int64_t now, Effects& fx)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Closes an idle open job (durably, with a persistent store), unless a batch came meanwhile.
  void CloseIdle(const std::string& job_id);
  // Looks at `job` (open) again at `at`, unless a look is due already.
  void ScheduleIdleCheck(Job& job, int64_t at) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A job opens or closes: the master's and its tenant's counts of open jobs follow.
  void CountOpen(Job& job, bool open) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const BrokerOptions options_;
  const Clock* const clock_;
  Store* const store_;
  const std::shared_ptr<spdlog::logger> log_;
  const std::string epoch_;
  const bool persistent_;

  mutable absl::Mutex mu_;
  std::unordered_map<TaskId, Task> tasks_ ABSL_GUARDED_BY(mu_);
  std::unordered_map<std::string, std::unique_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);
  // Idempotency keys, by KeyIndex: each tenant has its own.
  std::unordered_map<std::string, TaskId> keys_ ABSL_GUARDED_BY(mu_);
  // By tenant; never erased, and a node map, so jobs keep pointers to their tenant's.
  std::unordered_map<std::string, Account> accounts_ ABSL_GUARDED_BY(mu_);
  // Limits of named tenants (TokenSet's `limit` lines): fields of -1 take options_'s.
  std::map<std::string, TenantLimits> tenant_limits_ ABSL_GUARDED_BY(mu_);
  // Jobs that follow a task of another job through a resubmitted idempotency key.
  std::unordered_multimap<TaskId, Job*> extra_jobs_ ABSL_GUARDED_BY(mu_);
  std::map<std::tuple<std::string, std::string, Labels>, std::unique_ptr<TaskClass>> classes_
      ABSL_GUARDED_BY(mu_);
  std::map<std::string, QueueCounters> counters_ ABSL_GUARDED_BY(mu_);  // by queue name
  std::unordered_map<std::string, std::unique_ptr<Worker>> workers_ ABSL_GUARDED_BY(mu_);
  // Delayed tasks by due time; entries whose task moved on are skipped when due.
  using Due = std::pair<int64_t, TaskId>;
  std::priority_queue<Due, std::vector<Due>, std::greater<>> delayed_ ABSL_GUARDED_BY(mu_);
  // Complete jobs by expiry; retention is one constant, so it stays sorted.
  std::deque<std::pair<int64_t, std::string>> job_expiry_ ABSL_GUARDED_BY(mu_);
  // When to look whether an open job idled out: one entry per open job (Job::idle_check), so
  // bounded by max_open_jobs; an entry that comes due early is put back for the job's due time.
  using IdleCheck = std::pair<int64_t, std::string>;
  std::priority_queue<IdleCheck, std::vector<IdleCheck>, std::greater<>> idle_checks_
      ABSL_GUARDED_BY(mu_);
  size_t open_jobs_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<TaskId> dirty_ ABSL_GUARDED_BY(mu_);           // tasks to send to the store
  std::vector<Worker*> dirty_workers_ ABSL_GUARDED_BY(mu_);  // workers with an outbox
  TaskId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_completion_ ABSL_GUARDED_BY(mu_) = 1;
  // Finished tasks up to this completion_seq are on disk (persistent stores only).
  uint64_t durable_completion_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_generation_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t duplicates_ ABSL_GUARDED_BY(mu_) = 0;
  // The clock when the current Section began: one reading per operation for the times tasks keep.
  int64_t now_ms_ ABSL_GUARDED_BY(mu_) = 0;
  // By kind, at most options_.max_metric_kinds of them and kOtherKinds; never erased, so classes
  // keep pointers.
  std::map<std::string, std::unique_ptr<KindTimesView>> kind_times_ ABSL_GUARDED_BY(mu_);
  std::deque<FailureView> failures_ ABSL_GUARDED_BY(mu_);  // newest first
  // The latest progress of leased tasks that reported any; an entry goes with its lease. Apart
  // from the tasks: it is kept only for the few running ones.
  std::unordered_map<TaskId, TaskProgress> progress_ ABSL_GUARDED_BY(mu_);
  // The last Tick, or the broker's start: a pause before the first tick counts too.
  int64_t last_tick_ms_ ABSL_GUARDED_BY(mu_);
  // After a restart: workers attached before it, not back yet; dispatch waits while there are any,
  // until hold_until_ms_ (see BrokerOptions::recovery_hold_ms).
  std::set<std::string> awaited_ ABSL_GUARDED_BY(mu_);
  int64_t hold_until_ms_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  // The broker is going and its store closing: what is not durable by now stays unrevealed.
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace taskmaster
