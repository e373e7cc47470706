#include "master/broker.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <queue>
#include <set>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/util.h"

namespace taskmaster {

std::string_view TaskStateName(TaskState state) {
  switch (state) {
    case TaskState::kPending:
      return "PENDING";
    case TaskState::kDelayed:
      return "DELAYED";
    case TaskState::kLeased:
      return "LEASED";
    case TaskState::kSucceeded:
      return "SUCCEEDED";
    case TaskState::kDead:
      return "DEAD";
    case TaskState::kCancelled:
      return "CANCELLED";
  }
  return "?";
}

namespace {

constexpr char kDefaultQueue[] = "default";
constexpr size_t kMaxIdempotencyKey = 256;
// The longest delay or execution timeout: a century, past any real use and far from overflowing
// what is computed from it (not-before times in int64 milliseconds here, deadlines in int64
// nanoseconds in workers, which end 292 years out).
constexpr int64_t kMaxDurationMs = int64_t{100} * 365 * 24 * 3600 * 1000;
constexpr int32_t kMaxAttemptsLimit = 100;
constexpr int32_t kMaxSlots = 100'000;
// Tasks a worker may hold (leases and credits together, see Grant), and so may say it holds when
// it reconnects: each claim costs the master about 185 bytes while the hello is handled.
constexpr size_t kMaxHeld = kMaxSlots;
// A worker's kinds and queues, each.
constexpr size_t kMaxNames = 1'000;
// Labels of a task or a worker: how many, and how long a value.
constexpr size_t kMaxLabels = 64;
constexpr size_t kMaxLabelValue = 256;

absl::Status ValidateLabels(const Labels& labels) {
  if (labels.size() > kMaxLabels) {
    return absl::InvalidArgumentError(absl::StrCat(labels.size(), " labels; at most ", kMaxLabels));
  }
  for (const auto& [key, value] : labels) {
    if (absl::Status s = CheckName("label key", key); !s.ok()) return s;
    if (value.size() > kMaxLabelValue) {
      return absl::InvalidArgumentError(
          absl::StrCat("label '", key, "' has a value over ", kMaxLabelValue, " bytes"));
    }
  }
  return absl::OkStatus();
}

// A worker's id, name and host (its id is stored, and all three are shown and logged).
constexpr size_t kMaxHelloText = 255;

struct Job;
struct Worker;

struct QueueCounters {
  int64_t pending = 0;
  int64_t leased = 0;
  int64_t succeeded = 0;
  int64_t failed = 0;
  int64_t dead = 0;
  int64_t cancelled = 0;
};

struct ReadyEntry {
  uint64_t seq;
  TaskId id;
  bool operator<(const ReadyEntry& o) const { return seq < o.seq; }
};

// Tasks of one (queue, kind, required labels): a worker either can run all of them or none, so
// dispatch looks only at the classes a worker is eligible for.
struct TaskClass {
  std::string queue;
  std::string kind;
  Labels labels;
  QueueCounters* counters;
  // Ready tasks: highest priority first, FIFO within one. Entries of tasks that left PENDING
  // since are skipped when they reach the front (their seq no longer matches).
  std::map<int32_t, std::deque<ReadyEntry>, std::greater<>> ready;
  // Tasks of the class the master knows, finished ones included: with none left it is freed.
  int64_t tasks = 0;
};

struct TaskNotes {
  std::string output;
  std::string error;
  std::string idempotency_key;
  std::string worker;  // name of the last worker that held it
};

const std::string kNone;

struct Task {
  TaskNotes& Notes() {
    if (!notes) notes = std::make_unique<TaskNotes>();
    return *notes;
  }
  const std::string& output() const { return notes ? notes->output : kNone; }
  const std::string& error() const { return notes ? notes->error : kNone; }
  const std::string& key() const { return notes ? notes->idempotency_key : kNone; }
  const std::string& worker() const { return notes ? notes->worker : kNone; }

  TaskId id = 0;
  Job* job = nullptr;
  TaskClass* cls = nullptr;
  Worker* leased_to = nullptr;  // set from lease until the worker reports or the lease is lost
  std::string payload;
  // What most pending tasks lack, kept apart so that a million pending tasks stay small.
  std::unique_ptr<TaskNotes> notes;
  int64_t created_ms = 0;
  int64_t not_before_ms = 0;
  int64_t finished_ms = 0;
  int64_t timeout_ms = 0;
  uint64_t seq = 0;             // position in its ready list
  uint64_t completion_seq = 0;  // order of finishing, across all tasks
  int32_t priority = 0;
  int32_t attempts = 0;
  int32_t max_attempts = 0;
  TaskState state = TaskState::kPending;
  bool dirty = false;  // changed since the store last heard of it
  // Back to waiting because its lease was lost, not because a result came: its worker may still
  // return with it (see Adopt).
  bool lease_lost = false;
};

// One tenant's use of the master, for its limits.
struct Account {
  int64_t unfinished = 0;  // tasks submitted and not finished (pending, delayed, leased)
  // Submit-rate allowance in tasks: refills at the rate up to one second's worth; a batch may
  // overdraw it, and the next waits until it is positive again.
  double allowance = 0;
  int64_t refilled_ms = -1;  // -1: never used (starts full)
};

struct Job {
  std::string id;
  std::string tenant;
  Account* account = nullptr;
  int64_t total = 0;
  int64_t done = 0;
  int64_t succeeded = 0;
  int64_t dead = 0;
  int64_t cancelled = 0;
  int64_t created_ms = 0;
  // Submitted, not yet on disk: invisible to clients and workers until the store has it, and
  // forgotten without a trace if the store fails to write it.
  bool staged = false;
  std::vector<TaskId> tasks;
  std::vector<TaskId> completed;  // completion order
  std::vector<std::shared_ptr<JobWatcher>> watchers;
};

struct Worker {
  std::string id;
  std::string name;
  std::string host;
  std::vector<std::string> kinds;   // sorted
  std::vector<std::string> queues;  // sorted
  Labels labels;
  int32_t slots = 1;
  int32_t credits = 0;
  uint64_t generation = 0;
  bool connected = false;
  bool draining = false;
  int64_t connected_ms = 0;
  int64_t disconnected_ms = 0;
  // Its last heartbeat: all its leases expire together when none came for the lease timeout.
  int64_t heard_ms = 0;
  // Given in its first welcome: a later hello under its id must show it (ids are visible to any
  // client, and must not let another stream take its leases).
  std::string secret;
  std::shared_ptr<WorkerChannel> channel;
  std::unordered_set<TaskId> leases;
  std::vector<TaskClass*> eligible;
  WorkerOutbound outbox;  // collected under the lock, sent after it
  bool dirty = false;
};

// `v` sorted: a worker's kinds and queues, up to kMaxNames each, are looked up for every task
// class at attach and for every worker when a class appears, under the broker's lock.
bool Contains(const std::vector<std::string>& v, const std::string& s) {
  return std::binary_search(v.begin(), v.end(), s);
}

std::vector<std::string> SortedUnique(std::vector<std::string> v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

bool CanRun(const Worker& w, const TaskClass& c) {
  if (!Contains(w.queues, c.queue) || !Contains(w.kinds, c.kind)) return false;
  for (const auto& [key, value] : c.labels) {
    auto it = w.labels.find(key);
    if (it == w.labels.end() || it->second != value) return false;
  }
  return true;
}

std::string DescribeClass(const TaskClass& c) {
  std::string out = absl::StrCat("kind '", c.kind, "' on queue '", c.queue, "'");
  if (!c.labels.empty()) {
    absl::StrAppend(&out, " with labels ", absl::StrJoin(c.labels, ",", absl::PairFormatter("=")));
  }
  return out;
}

// What a locked section leaves to do once the lock is released.
struct Effects {
  std::vector<std::pair<std::shared_ptr<WorkerChannel>, WorkerOutbound>> sends;
  std::vector<std::shared_ptr<JobWatcher>> notify;
  uint64_t finished_through = 0;         // highest completion_seq given out in this section
  std::vector<std::string> reveal_jobs;  // jobs with results to show once they are durable
  std::unordered_set<Job*> touched;
  // Log lines, written once the lock is released.
  std::vector<std::pair<spdlog::level::level_enum, std::string>> logs;
};

template <typename... Args>
void Log(Effects& fx, spdlog::level::level_enum level, fmt::format_string<Args...> format,
         Args&&... args) {
  fx.logs.emplace_back(level, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace

class Broker::Impl {
 public:
  Impl(BrokerOptions options, const Clock* clock, Store* store, std::shared_ptr<spdlog::logger> log)
      : options_(options),
        clock_(clock),
        store_(store),
        log_(std::move(log)),
        epoch_(store->Epoch()),
        persistent_(store->persistent()) {}

  // Runs `fn` under the lock, then sends and notifies what it left to do.
  template <typename Fn>
  auto Locked(Fn&& fn) {
    Effects fx;
    auto deliver = [&] {
      for (auto& [level, line] : fx.logs) log_->log(level, line);
      for (auto& [channel, message] : fx.sends) channel->Send(std::move(message));
      if (fx.finished_through > 0 && persistent_) {
        RevealWhenDurable(fx.finished_through, std::move(fx.reveal_jobs));
      }
      for (auto& watcher : fx.notify) watcher->OnJobChanged();
    };
    if constexpr (std::is_void_v<decltype(fn(fx))>) {
      {
        absl::MutexLock lock(&mu_);
        fn(fx);
        Collect(fx);
      }
      deliver();
    } else {
      decltype(fn(fx)) result;
      {
        absl::MutexLock lock(&mu_);
        result = fn(fx);
        Collect(fx);
      }
      deliver();
      return result;
    }
  }

  // Results become visible (to job watchers, and to GetTask without waiting) only once they are
  // on disk, so no client ever sees a result that a crash could take back.
  void RevealWhenDurable(uint64_t through, std::vector<std::string> job_ids) {
    store_->Flush([this, life = std::weak_ptr<int>(life_), through,
                   job_ids = std::move(job_ids)](absl::Status status) mutable {
      if (life.expired()) return;  // the broker is gone (see ~Broker)
      if (!status.ok()) {          // the store retries the write; look again after its next attempt
        RevealWhenDurable(through, std::move(job_ids));
        return;
      }
      // Watchers as of now: one that started following since the result came in is told too.
      std::vector<std::shared_ptr<JobWatcher>> notify;
      {
        absl::MutexLock lock(&mu_);
        durable_completion_ = std::max(durable_completion_, through);
        for (const std::string& id : job_ids) {
          auto it = jobs_.find(id);
          if (it == jobs_.end()) continue;
          notify.insert(notify.end(), it->second->watchers.begin(), it->second->watchers.end());
        }
      }
      for (auto& watcher : notify) watcher->OnJobChanged();
    });
  }

  // A job or task as `caller` may see it: a staged one (not on disk yet) does not exist for
  // clients, nor does another tenant's (the same answer as for an id never used, so guessing ids
  // tells nothing).
  static bool Sees(const Caller& caller, const Job& job) {
    return !job.staged && (caller.sees_all || job.tenant == caller.tenant);
  }
  absl::StatusOr<Job*> VisibleJob(const Caller& caller, const std::string& job_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = jobs_.find(job_id);
    if (it == jobs_.end() || !Sees(caller, *it->second)) {
      return absl::NotFoundError(
          absl::StrCat("no job ", job_id, " (never submitted, or past retention)"));
    }
    return it->second.get();
  }
  absl::StatusOr<const Task*> VisibleTask(const Caller& caller, TaskId id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = tasks_.find(id);
    if (it == tasks_.end() || !Sees(caller, *it->second.job)) {
      return absl::NotFoundError(
          absl::StrCat("no task ", id, " (never submitted, or past retention)"));
    }
    return &it->second;
  }

  bool Settled(const Task& t) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !persistent_ || t.completion_seq <= durable_completion_;
  }

  // Validates and enqueues a batch as one job. With a persistent store the job stays staged
  // (see Job::staged) and its rows go to `rows`; Publish or Discard ends the staging.
  absl::StatusOr<SubmitOutcome> SubmitLocked(const std::string& tenant,
                                             std::vector<TaskSpec>& specs, Effects& fx,
                                             SubmitRows* rows) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (specs.empty()) return absl::InvalidArgumentError("a submit needs at least one task");
    if (specs.size() > options_.max_batch) {
      return absl::InvalidArgumentError(absl::StrCat("a batch holds at most ", options_.max_batch,
                                                     " tasks; this one has ", specs.size()));
    }
    std::map<std::string, int64_t> added_per_queue;
    size_t new_classes = 0;
    std::set<std::tuple<std::string, std::string, Labels>> seen_new;
    std::unordered_map<std::string_view, const TaskSpec*> batch_keys;
    int64_t new_tasks = 0;
    for (size_t i = 0; i < specs.size(); ++i) {
      TaskSpec& s = specs[i];
      if (s.queue.empty()) s.queue = kDefaultQueue;
      if (s.timeout_ms == 0) s.timeout_ms = options_.default_timeout_ms;
      if (s.max_attempts == 0) s.max_attempts = options_.default_max_attempts;
      if (absl::Status st = Validate(s); !st.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("task ", i, ": ", st.message()));
      }
      if (absl::Status st = CheckKey(tenant, s, batch_keys); !st.ok()) {
        return absl::Status(st.code(), absl::StrCat("task ", i, ": ", st.message()));
      }
      // A key already known, or repeated in the batch, adds no task.
      if (s.idempotency_key.empty() || (!keys_.contains(KeyIndex(tenant, s.idempotency_key)) &&
                                        batch_keys.at(s.idempotency_key) == &s)) {
        ++new_tasks;
      }
      ++added_per_queue[s.queue];
      auto key = std::make_tuple(s.queue, s.kind, s.labels);
      if (!classes_.contains(key) && seen_new.insert(key).second) ++new_classes;
    }
    for (const auto& [queue, added] : added_per_queue) {
      auto it = counters_.find(queue);
      const int64_t pending = it == counters_.end() ? 0 : it->second.pending;
      if (pending + added > static_cast<int64_t>(options_.max_queue_length)) {
        return absl::ResourceExhaustedError(
            absl::StrCat("queue '", queue, "' is full: ", pending, " pending, limit ",
                         options_.max_queue_length, "; retry later or raise --max-queue-length"));
      }
    }
    if (classes_.size() + new_classes > options_.max_task_classes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("too many distinct (queue, kind, labels) combinations; limit ",
                       options_.max_task_classes));
    }
    const int64_t now = clock_->NowMs();
    Account& account = accounts_[tenant];
    if (absl::Status st = Charge(tenant, account, new_tasks, now); !st.ok()) {
      return st;
    }

    auto job_owner = std::make_unique<Job>();
    Job* job = job_owner.get();
    job->id = "job-" + RandomHex(8);
    job->tenant = tenant;
    job->account = &account;
    // An upper bound while tasks are added (a key repeated in the batch is one task), so the
    // job cannot look complete before all of them are in.
    job->total = static_cast<int64_t>(specs.size());
    job->created_ms = now;
    job->staged = rows != nullptr;
    job->tasks.reserve(specs.size());
    jobs_[job->id] = std::move(job_owner);
    if (rows) rows->tasks.reserve(specs.size());
    std::unordered_set<TaskId> in_job;  // tasks the job follows through keys, each once

    SubmitOutcome out;
    out.job_id = job->id;
    out.task_ids.reserve(specs.size());
    std::set<TaskClass*> classes;  // of this batch's new tasks
    for (TaskSpec& s : specs) {
      if (!s.idempotency_key.empty()) {
        if (auto it = keys_.find(KeyIndex(tenant, s.idempotency_key)); it != keys_.end()) {
          const TaskId id = it->second;
          const bool own = tasks_.at(id).job == job;
          if (!own && in_job.insert(id).second) AddExistingToJob(job, id, fx, rows);
          out.task_ids.push_back(id);
          continue;
        }
      }
      TaskClass* cls = ClassFor(s.queue, s.kind, s.labels);
      cls->tasks++;
      auto& t = tasks_[next_id_];
      t.id = next_id_++;
      t.job = job;
      t.cls = cls;
      t.payload = std::move(s.payload);
      if (!s.idempotency_key.empty()) t.Notes().idempotency_key = std::move(s.idempotency_key);
      t.created_ms = now;
      t.timeout_ms = s.timeout_ms;
      t.priority = s.priority;
      t.max_attempts = s.max_attempts;
      if (!t.key().empty()) keys_[KeyIndex(t)] = t.id;
      account.unfinished++;
      job->tasks.push_back(t.id);
      out.task_ids.push_back(t.id);
      cls->counters->pending++;  // PENDING and DELAYED both count as pending
      if (s.delay_ms > 0) {
        t.state = TaskState::kDelayed;
        t.not_before_ms = now + s.delay_ms;
      } else {
        t.seq = next_seq_++;
      }
      if (rows) {
        rows->tasks.push_back(RowOf(t));
      } else {
        Enqueue(t);
      }
      classes.insert(cls);
    }
    for (TaskClass* cls : classes) {
      if (HasWorkerFor(*cls)) continue;
      out.warnings.push_back(absl::StrCat("no connected worker runs ", DescribeClass(*cls),
                                          "; its tasks wait until one does"));
    }
    // The job is over its distinct tasks: task_ids repeat an id for a repeated key.
    const auto total = static_cast<int64_t>(job->tasks.size());
    if (total != job->total) {
      job->total = total;
      MaybeJobComplete(job, now);
    }
    if (rows) rows->job = {job->id, job->total, job->created_ms, job->tenant};
    if (!rows) DispatchAll();
    return out;
  }

  // Where an idempotency key is found: keys of different tenants never meet. A newline cannot be
  // part of a tenant name.
  static std::string KeyIndex(const std::string& tenant, const std::string& key) {
    return absl::StrCat(tenant, "\n", key);
  }
  static std::string KeyIndex(const Task& t) { return KeyIndex(t.job->tenant, t.key()); }

  TenantLimits LimitsOf(const std::string& tenant) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    TenantLimits limits = options_.tenant_limits;
    if (auto it = tenant_limits_.find(tenant); it != tenant_limits_.end()) {
      if (it->second.max_pending >= 0) limits.max_pending = it->second.max_pending;
      if (it->second.submit_rate >= 0) limits.submit_rate = it->second.submit_rate;
    }
    return limits;
  }

  // Admits `tasks` more tasks of `tenant` against its limits, or says which one they cross.
  absl::Status Charge(const std::string& tenant, Account& account, int64_t tasks, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (tasks == 0) return absl::OkStatus();
    const TenantLimits limits = LimitsOf(tenant);
    const std::string who =
        tenant.empty() ? "the default tenant" : absl::StrCat("tenant '", tenant, "'");
    if (limits.max_pending > 0 && account.unfinished + tasks > limits.max_pending) {
      return absl::ResourceExhaustedError(
          absl::StrCat(who, " has ", account.unfinished, " unfinished tasks and may have ",
                       limits.max_pending, "; this batch of ", tasks, " waits until some finish"));
    }
    if (limits.submit_rate > 0) {
      const auto rate = static_cast<double>(limits.submit_rate);
      if (account.refilled_ms < 0) {
        account.allowance = rate;
        account.refilled_ms = now;
      }
      const double elapsed_s =
          static_cast<double>(std::max<int64_t>(0, now - account.refilled_ms)) / 1000;
      account.allowance = std::min(rate, account.allowance + elapsed_s * rate);
      account.refilled_ms = now;
      if (account.allowance <= 0) {
        const auto wait_ms = static_cast<int64_t>(std::ceil(-account.allowance / rate * 1000)) + 1;
        return absl::ResourceExhaustedError(
            absl::StrCat(who, " submits faster than its limit of ", limits.submit_rate,
                         " tasks per second; retry in ", wait_ms, " ms"));
      }
      account.allowance -= static_cast<double>(tasks);
    }
    return absl::OkStatus();
  }

  // A resubmitted idempotency key must come with the same work: the client would otherwise
  // read the first task's result as the answer to a different one.
  absl::Status CheckKey(const std::string& tenant, const TaskSpec& s,
                        std::unordered_map<std::string_view, const TaskSpec*>& batch_keys) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (s.idempotency_key.empty()) return absl::OkStatus();
    auto same_work = [&s](const std::string& queue, const std::string& kind, const Labels& labels,
                          const std::string& payload, int32_t priority, int64_t timeout_ms,
                          int32_t max_attempts) {
      return queue == s.queue && kind == s.kind && labels == s.labels && payload == s.payload &&
             priority == s.priority && timeout_ms == s.timeout_ms && max_attempts == s.max_attempts;
    };
    auto mismatch = [&] {
      return absl::AlreadyExistsError(absl::StrCat(
          "idempotency key '", s.idempotency_key,
          "' was used for a different task (queue, kind, payload, labels, priority, timeout or "
          "attempts differ); use a new key for new work"));
    };
    if (auto it = keys_.find(KeyIndex(tenant, s.idempotency_key)); it != keys_.end()) {
      const Task& t = tasks_.at(it->second);
      if (t.job->staged) {
        return absl::AbortedError(absl::StrCat("a submit with idempotency key '", s.idempotency_key,
                                               "' is still being stored; retry in a moment"));
      }
      return same_work(t.cls->queue, t.cls->kind, t.cls->labels, t.payload, t.priority,
                       t.timeout_ms, t.max_attempts)
                 ? absl::OkStatus()
                 : mismatch();
    }
    auto [it, first] = batch_keys.emplace(s.idempotency_key, &s);
    if (first) return absl::OkStatus();
    const TaskSpec& o = *it->second;
    return same_work(o.queue, o.kind, o.labels, o.payload, o.priority, o.timeout_ms, o.max_attempts)
               ? absl::OkStatus()
               : mismatch();
  }

  // The store has a staged job: it becomes visible and its tasks ready.
  void Publish(Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    job.staged = false;
    for (TaskId id : job.tasks) {
      auto it = tasks_.find(id);  // a task it follows may be gone past retention
      if (it != tasks_.end() && it->second.job == &job) Enqueue(it->second);
    }
    DispatchAll();
  }

  // The store failed to write a staged job: it leaves no trace.
  void Discard(Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (TaskId id : job.tasks) {
      auto it = tasks_.find(id);
      if (it == tasks_.end()) continue;
      Task& t = it->second;
      if (t.job != &job) {  // followed through a key
        auto [begin, end] = extra_jobs_.equal_range(id);
        for (auto e = begin; e != end; ++e) {
          if (e->second == &job) {
            extra_jobs_.erase(e);
            break;
          }
        }
        continue;
      }
      t.cls->counters->pending--;
      job.account->unfinished--;
      if (!t.key().empty()) keys_.erase(KeyIndex(t));
      Forget(it);
    }
    jobs_.erase(job.id);
  }

  absl::Status Validate(const TaskSpec& s) const {
    if (absl::Status st = CheckName("queue name", s.queue); !st.ok()) return st;
    if (s.kind.empty()) return absl::InvalidArgumentError("kind is empty");
    if (absl::Status st = CheckName("kind", s.kind); !st.ok()) return st;
    // Labels travel and stay with the task like its payload, and count with it.
    size_t bytes = s.payload.size();
    for (const auto& [key, value] : s.labels) bytes += key.size() + value.size();
    if (bytes > options_.max_payload_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "payload of ", s.payload.size(), " bytes", s.labels.empty() ? "" : " with its labels",
          " exceeds the limit of ", options_.max_payload_bytes));
    }
    for (const auto& [what, ms] :
         {std::pair<const char*, int64_t>{"delay", s.delay_ms}, {"timeout", s.timeout_ms}}) {
      if (ms < 0) return absl::InvalidArgumentError(absl::StrCat(what, " is negative"));
      if (ms > kMaxDurationMs) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, " of ", ms, " ms is over 100 years (", kMaxDurationMs, " ms)"));
      }
    }
    if (s.max_attempts < 0 || s.max_attempts > kMaxAttemptsLimit) {
      return absl::InvalidArgumentError(
          absl::StrCat("max attempts must be between 1 and ", kMaxAttemptsLimit));
    }
    if (s.idempotency_key.size() > kMaxIdempotencyKey) {
      return absl::InvalidArgumentError(
          absl::StrCat("idempotency key longer than ", kMaxIdempotencyKey, " bytes"));
    }
    return ValidateLabels(s.labels);
  }

  // A resubmitted idempotency key: the new job follows the original task.
  void AddExistingToJob(Job* job, TaskId id, Effects& fx, SubmitRows* rows)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    job->tasks.push_back(id);
    Task& t = tasks_.at(id);
    const bool finished = IsFinished(t.state);
    if (rows) {
      rows->members.push_back(
          {job->id, id, finished ? static_cast<int64_t>(job->completed.size()) : int64_t{-1}});
    }
    if (finished) {
      CountDone(job, t, fx);
    } else {
      extra_jobs_.emplace(id, job);
    }
  }

  TaskClass* ClassFor(const std::string& queue, const std::string& kind, const Labels& labels)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto key = std::make_tuple(queue, kind, labels);
    auto it = classes_.find(key);
    if (it != classes_.end()) return it->second.get();
    auto cls = std::make_unique<TaskClass>();
    cls->queue = queue;
    cls->kind = kind;
    cls->labels = labels;
    cls->counters = &counters_[queue];
    for (auto& [id, w] : workers_) {
      if (CanRun(*w, *cls)) w->eligible.push_back(cls.get());
    }
    return classes_.emplace(key, std::move(cls)).first->second.get();
  }

  bool HasWorkerFor(const TaskClass& cls) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const auto& [id, w] : workers_) {
      if (w->connected && !w->draining && CanRun(*w, cls)) return true;
    }
    return false;
  }

  // ---- State transitions. Counters follow every one of them. ----

  // Marks `t` for the store; Collect sends its status once per locked section.
  void Touch(Task& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!persistent_ || t.dirty) return;
    t.dirty = true;
    dirty_.push_back(t.id);
  }

  // Moves `t` to `state`; the queue's pending (PENDING and DELAYED) and leased counts follow.
  void SetState(Task& t, TaskState state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Touch(t);
    QueueCounters& c = *t.cls->counters;
    auto live = [&c](TaskState s) -> int64_t* {
      if (s == TaskState::kPending || s == TaskState::kDelayed) return &c.pending;
      if (s == TaskState::kLeased) return &c.leased;
      return nullptr;
    };
    if (int64_t* was = live(t.state)) --*was;
    t.state = state;
    if (int64_t* now = live(state)) ++*now;
  }

  // The worker holding `t` holds it no more (its slot is free).
  void Unlease(Task& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (t.leased_to) t.leased_to->leases.erase(t.id);
    t.leased_to = nullptr;
  }

  void MakeReady(Task& t, bool front) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    SetState(t, TaskState::kPending);
    t.not_before_ms = 0;
    auto& lane = t.cls->ready[t.priority];
    if (front) {
      lane.push_front({t.seq, t.id});  // a task given back keeps its place
    } else {
      t.seq = next_seq_++;
      lane.push_back({t.seq, t.id});
    }
  }

  // A new task takes its place: ready at the back of its lane, or delayed.
  void Enqueue(Task& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (t.state == TaskState::kDelayed) {
      delayed_.push({t.not_before_ms, t.id});
    } else {
      t.cls->ready[t.priority].push_back({t.seq, t.id});
    }
  }

  void Delay(Task& t, int64_t not_before) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    SetState(t, TaskState::kDelayed);
    t.not_before_ms = not_before;
    delayed_.push({not_before, t.id});
  }

  // `w` holds `t` at `attempt`.
  void LeaseTo(Task& t, Worker& w, int32_t attempt) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    SetState(t, TaskState::kLeased);
    t.lease_lost = false;
    t.attempts = attempt;
    t.leased_to = &w;
    t.Notes().worker = w.name;
    w.leases.insert(t.id);
  }

  void Lease(Task& t, Worker& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    LeaseTo(t, w, t.attempts + 1);
    w.credits--;
    w.outbox.tasks.push_back(
        {t.id, t.attempts, t.cls->kind, t.payload, t.timeout_ms, t.cls->queue});
    MarkDirty(w);
  }

  // The worker no longer holds `t`; a leased task is counted as a failed attempt.
  void LoseLease(Task& t, const std::string& reason, Effects& fx)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Unlease(t);
    if (t.state != TaskState::kLeased) return;
    t.cls->counters->failed++;
    t.Notes().error = reason;
    if (t.attempts >= t.max_attempts) {
      Finish(t, TaskState::kDead, fx);
    } else {
      MakeReady(t, /*front=*/false);
      t.lease_lost = true;
    }
  }

  // A reconnecting worker holds `t` (running it, or with its result on the way), but the master
  // has it waiting to be run: its lease was lost with a master crash before it was stored, or
  // expired while the worker was away. The worker keeps it, so it is not run a second time.
  // Returns whether it did.
  // `awaited`: the master, restarted, waits for this worker (it was attached before).
  bool Adopt(Task& t, const TaskRef& ref, Worker& w, bool awaited)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const bool waiting = t.state == TaskState::kPending || t.state == TaskState::kDelayed;
    // Its lease expired here while this very worker was away (not a result: that one counted).
    const bool expired_away = t.lease_lost && ref.attempt == t.attempts && t.worker() == w.name;
    // Granted just before the master's crash, never on disk: the next attempt.
    const bool lost_in_crash = awaited && ref.attempt == t.attempts + 1;
    if (!waiting || t.job->staged || !(expired_away || lost_in_crash) || ref.attempt < 1 ||
        ref.attempt > t.max_attempts || !CanRun(w, *t.cls)) {
      return false;
    }
    if (expired_away) t.cls->counters->failed--;  // the expiry was no failed attempt after all
    LeaseTo(t, w, ref.attempt);
    return true;
  }

  // A leased task goes back without using its attempt (it never started).
  void GiveBack(Task& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Unlease(t);
    t.attempts--;
    MakeReady(t, /*front=*/true);
  }

  void Finish(Task& t, TaskState state, Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    SetState(t, state);
    t.job->account->unfinished--;
    QueueCounters& c = *t.cls->counters;
    t.finished_ms = clock_->NowMs();
    t.completion_seq = next_completion_++;
    fx.finished_through = t.completion_seq;
    if (state == TaskState::kSucceeded) c.succeeded++;
    if (state == TaskState::kDead) c.dead++;
    if (state == TaskState::kCancelled) c.cancelled++;
    CountDone(t.job, t, fx);
    if (!extra_jobs_.empty()) {
      auto [begin, end] = extra_jobs_.equal_range(t.id);
      for (auto it = begin; it != end; ++it) CountDone(it->second, t, fx);
      extra_jobs_.erase(t.id);
    }
  }

  void CountDone(Job* job, const Task& t, Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    job->done++;
    if (t.state == TaskState::kSucceeded) job->succeeded++;
    if (t.state == TaskState::kDead) job->dead++;
    if (t.state == TaskState::kCancelled) job->cancelled++;
    job->completed.push_back(t.id);
    MaybeJobComplete(job, t.finished_ms);
    if (!fx.touched.insert(job).second) return;
    if (persistent_) {
      fx.reveal_jobs.push_back(job->id);  // its watchers are told once the result is on disk
    } else {
      fx.notify.insert(fx.notify.end(), job->watchers.begin(), job->watchers.end());
    }
  }

  // A complete job and its results are kept for the retention time, then forgotten together.
  void MaybeJobComplete(Job* job, int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (job->done == job->total) {
      job_expiry_.push_back({now + options_.result_retention_ms, job->id});
    }
  }

  // Forgets a job with its own tasks (tasks it follows through idempotency keys stay).
  void DeleteJob(Job& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (TaskId id : job.tasks) {
      auto it = tasks_.find(id);
      if (it == tasks_.end() || it->second.job != &job) continue;
      if (!it->second.key().empty()) keys_.erase(KeyIndex(it->second));
      if (persistent_) store_->DeleteTask(id);
      Forget(it);
    }
    if (persistent_) store_->DeleteJob(job.id);
    jobs_.erase(job.id);
  }

  // Erases a task; its class goes with its last task, so that combinations nobody uses any more
  // do not count against --max-task-classes for good.
  void Forget(std::unordered_map<TaskId, Task>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    TaskClass* cls = it->second.cls;
    tasks_.erase(it);
    if (--cls->tasks > 0) return;
    for (auto& [id, w] : workers_) std::erase(w->eligible, cls);
    classes_.erase(std::make_tuple(cls->queue, cls->kind, cls->labels));
  }

  TaskStatusRow StatusOf(const Task& t) const {
    TaskStatusRow s;
    s.state = t.state;
    s.attempts = t.attempts;
    s.not_before_ms = t.not_before_ms;
    s.finished_ms = t.finished_ms;
    s.seq = t.seq;
    s.completion_seq = t.completion_seq;
    s.output = t.output();
    s.error = t.error();
    s.worker = t.worker();
    if (t.state == TaskState::kLeased && t.leased_to) s.worker_id = t.leased_to->id;
    return s;
  }

  TaskRow RowOf(const Task& t) const {
    TaskRow r;
    r.id = t.id;
    r.job_id = t.job->id;
    r.queue = t.cls->queue;
    r.kind = t.cls->kind;
    r.labels = t.cls->labels;
    r.payload = t.payload;
    r.priority = t.priority;
    r.max_attempts = t.max_attempts;
    r.timeout_ms = t.timeout_ms;
    r.created_ms = t.created_ms;
    r.idempotency_key = t.key();
    r.status = StatusOf(t);
    return r;
  }

  // Returns whether the task was cancelled (false when it had finished already).
  bool CancelLocked(Task& t, Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (IsFinished(t.state)) return false;
    if (t.state == TaskState::kLeased && t.leased_to) {
      // Its slot stays taken until the worker reports the task stopped.
      t.leased_to->outbox.cancel.push_back(t.id);
      MarkDirty(*t.leased_to);
    }
    t.Notes().error = "cancelled by a client";
    Finish(t, TaskState::kCancelled, fx);
    return true;
  }

  // ---- Recovery ----

  // Rebuilds the state from the store's rows. Runs before any call, so the order of rows within
  // a table does not matter: ready lists and completion orders are sorted afterwards.
  class Loader final : public RecoveryVisitor {
   public:
    explicit Loader(Impl& b) : b_(b), now_(b.clock_->NowMs()) {}

    void OnJob(JobRow row) override ABSL_NO_THREAD_SAFETY_ANALYSIS {
      auto job = std::make_unique<Job>();
      job->id = std::move(row.job_id);
      job->tenant = std::move(row.tenant);
      job->account = &b_.accounts_[job->tenant];
      job->total = row.total;
      job->created_ms = row.created_ms;
      b_.jobs_[job->id] = std::move(job);
    }

    void OnTask(TaskRow row) override ABSL_NO_THREAD_SAFETY_ANALYSIS {
      auto job = b_.jobs_.find(row.job_id);
      if (job == b_.jobs_.end()) {
        ++orphans_;
        return;
      }
      Task& t = b_.tasks_[row.id];
      t.id = row.id;
      t.job = job->second.get();
      t.cls = b_.ClassFor(row.queue, row.kind, row.labels);
      t.cls->tasks++;
      t.payload = std::move(row.payload);
      if (!row.status.output.empty() || !row.status.error.empty() || !row.idempotency_key.empty() ||
          !row.status.worker.empty()) {
        t.notes = std::make_unique<TaskNotes>(
            TaskNotes{std::move(row.status.output), std::move(row.status.error),
                      std::move(row.idempotency_key), std::move(row.status.worker)});
      }
      t.created_ms = row.created_ms;
      t.not_before_ms = row.status.not_before_ms;
      t.finished_ms = row.status.finished_ms;
      t.timeout_ms = row.timeout_ms;
      t.seq = row.status.seq;
      t.completion_seq = row.status.completion_seq;
      t.priority = row.priority;
      t.attempts = row.status.attempts;
      t.max_attempts = row.max_attempts;
      t.state = row.status.state;
      t.job->tasks.push_back(t.id);
      if (!t.key().empty()) b_.keys_[KeyIndex(t)] = t.id;
      if (!IsFinished(t.state)) t.job->account->unfinished++;
      b_.next_id_ = std::max(b_.next_id_, t.id + 1);
      b_.next_seq_ = std::max(b_.next_seq_, t.seq + 1);
      b_.next_completion_ = std::max(b_.next_completion_, t.completion_seq + 1);
      QueueCounters& c = *t.cls->counters;
      switch (t.state) {
        case TaskState::kPending:
          c.pending++;
          ready_.push_back({t.seq, t.id});
          break;
        case TaskState::kDelayed:
          c.pending++;
          // A system clock set back while the master was down must not stretch a delay beyond
          // what it was when it was set.
          t.not_before_ms = std::min(t.not_before_ms, now_ + (t.not_before_ms - t.created_ms));
          b_.delayed_.push({t.not_before_ms, t.id});
          break;
        case TaskState::kLeased:
          c.leased++;
          Relet(t, row.status.worker_id);
          break;
        default:
          finished_.push_back({static_cast<int64_t>(t.completion_seq), t.job, t.id});
      }
    }

    void OnJobMember(JobMemberRow row) override ABSL_NO_THREAD_SAFETY_ANALYSIS {
      auto job = b_.jobs_.find(row.job_id);
      auto task = b_.tasks_.find(row.task_id);
      if (job == b_.jobs_.end() || task == b_.tasks_.end()) return;
      Job* j = job->second.get();
      j->tasks.push_back(row.task_id);
      if (!IsFinished(task->second.state)) {
        b_.extra_jobs_.emplace(row.task_id, j);
      } else if (row.position >= 0) {
        early_.push_back({row.position, j, row.task_id});
      } else {
        finished_.push_back({static_cast<int64_t>(task->second.completion_seq), j, row.task_id});
      }
    }

    void OnHighestTaskId(TaskId id) override ABSL_NO_THREAD_SAFETY_ANALYSIS {
      b_.next_id_ = std::max(b_.next_id_, id + 1);
    }

    // Attached when the master stopped: known as disconnected, so it is awaited after the
    // restart and forgotten (with its stored row) once its grace has passed.
    void OnWorker(WorkerRow row) override ABSL_NO_THREAD_SAFETY_ANALYSIS {
      WorkerNamed(row.worker_id, row.worker_id).secret = std::move(row.secret);
    }

    // Everything loaded was on disk.
    void Settle() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      b_.durable_completion_ = b_.next_completion_ - 1;
    }

    // Ready lists and completion orders, sorted as they were.
    void Finish() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      std::sort(ready_.begin(), ready_.end());
      for (const ReadyEntry& e : ready_) {
        const Task& t = b_.tasks_.at(e.id);
        t.cls->ready[t.priority].push_back(e);
      }
      // Tasks a job followed that had finished before it was created come first.
      std::sort(early_.begin(), early_.end());
      std::sort(finished_.begin(), finished_.end());
      for (const auto* list : {&early_, &finished_}) {
        for (const auto& [order, job, id] : *list) {
          const Task& t = b_.tasks_.at(id);
          job->done++;
          job->succeeded += t.state == TaskState::kSucceeded;
          job->dead += t.state == TaskState::kDead;
          job->cancelled += t.state == TaskState::kCancelled;
          job->completed.push_back(id);
        }
      }
      std::vector<std::pair<int64_t, std::string>> expiries;
      for (const auto& [id, job] : b_.jobs_) {
        if (job->done != job->total) continue;
        int64_t last = job->created_ms;
        for (TaskId t : job->completed) last = std::max(last, b_.tasks_.at(t).finished_ms);
        expiries.push_back({last + b_.options_.result_retention_ms, id});
      }
      std::sort(expiries.begin(), expiries.end());
      b_.job_expiry_.assign(expiries.begin(), expiries.end());
    }

    size_t orphans() const { return orphans_; }

   private:
    // A task leased when the master stopped stays with its worker for the reconnect grace: a
    // worker that comes back still holding it keeps it, and otherwise it is requeued then.
    void Relet(Task& t, const std::string& worker_id) ABSL_NO_THREAD_SAFETY_ANALYSIS {
      Worker& w = WorkerNamed(worker_id, t.worker().empty() ? worker_id : t.worker());
      t.leased_to = &w;
      w.leases.insert(t.id);
    }

    // The worker `worker_id`, disconnected as of the restart (its lease period starts now).
    Worker& WorkerNamed(const std::string& worker_id,
                        const std::string& name) ABSL_NO_THREAD_SAFETY_ANALYSIS {
      auto& w = b_.workers_[worker_id];
      if (!w) {
        w = std::make_unique<Worker>();
        w->id = worker_id;
        w->name = name;
        w->generation = b_.next_generation_++;
        w->disconnected_ms = now_;
        w->heard_ms = now_;
      }
      return *w;
    }

    Impl& b_;
    const int64_t now_;
    std::vector<ReadyEntry> ready_;
    std::vector<std::tuple<int64_t, Job*, TaskId>> finished_;
    std::vector<std::tuple<int64_t, Job*, TaskId>> early_;
    size_t orphans_ = 0;
  };

  // A master that did not run (SIGSTOP, a starved host) heard nothing meanwhile: that silence is
  // its own, so every worker's lease and reconnect grace get the missed time back before anything
  // expires, and the heartbeats that waited in the sockets arrive in time.
  void ForgivePause(int64_t now, Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int64_t gap = now - last_tick_ms_;
    last_tick_ms_ = now;
    if (gap <= options_.pause_threshold_ms) return;
    for (auto& [id, w] : workers_) {
      w->heard_ms = std::min(now, w->heard_ms + gap);
      if (!w->connected) w->disconnected_ms = std::min(now, w->disconnected_ms + gap);
    }
    Log(fx, spdlog::level::warn,
        "the master did not run for {} ms (paused or starved): workers' leases and reconnect "
        "graces are extended by that much",
        gap);
  }

  // ---- Dispatch ----

  // The best ready task `w` can run: highest priority, then oldest. Drops stale entries.
  Task* PopBest(Worker& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    TaskClass* best = nullptr;
    int32_t best_priority = 0;
    uint64_t best_seq = 0;
    for (TaskClass* cls : w.eligible) {
      const ReadyEntry* head = nullptr;
      while (!cls->ready.empty()) {
        auto lane = cls->ready.begin();
        while (!lane->second.empty() && IsStale(lane->second.front())) lane->second.pop_front();
        if (lane->second.empty()) {
          cls->ready.erase(lane);
          continue;
        }
        head = &lane->second.front();
        if (!best || lane->first > best_priority ||
            (lane->first == best_priority && head->seq < best_seq)) {
          best = cls;
          best_priority = lane->first;
          best_seq = head->seq;
        }
        break;
      }
    }
    if (!best) return nullptr;
    auto lane = best->ready.begin();
    const TaskId id = lane->second.front().id;
    lane->second.pop_front();
    if (lane->second.empty()) best->ready.erase(lane);
    return &tasks_.at(id);
  }

  bool IsStale(const ReadyEntry& e) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = tasks_.find(e.id);
    return it == tasks_.end() || it->second.state != TaskState::kPending || it->second.seq != e.seq;
  }

  bool CanTake(const Worker& w) const {
    return w.connected && !w.draining && w.credits > 0 && !w.eligible.empty();
  }

  // Nothing is handed out while the master stops, or while it waits after a restart for workers
  // to claim what they hold.
  bool Dispatching() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !shutting_down_ && awaited_.empty();
  }

  // Stops waiting for workers after a restart once the hold has passed.
  void EndHoldIfDue(int64_t now, Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (awaited_.empty() || now < hold_until_ms_) return;
    Log(fx, spdlog::level::warn,
        "dispatching without {} workers attached before the restart ({}...)", awaited_.size(),
        Printable(*awaited_.begin()));
    awaited_.clear();
  }

  void DispatchTo(Worker& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!Dispatching()) return;
    while (CanTake(w)) {
      Task* t = PopBest(w);
      if (!t) break;
      Lease(*t, w);
    }
  }

  // Hands ready tasks to every worker with credit, one at a time round robin: first to workers
  // with an idle slot, then into prefetch, so no task waits behind a busy worker while another
  // worker has a slot free.
  void DispatchAll() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!Dispatching()) return;
    std::vector<Worker*> hungry;
    for (auto& [id, w] : workers_) {
      if (CanTake(*w)) hungry.push_back(w.get());
    }
    for (bool slots_only : {true, false}) {
      bool progress = true;
      while (progress) {
        progress = false;
        for (Worker* w : hungry) {
          if (!CanTake(*w)) continue;
          if (slots_only && static_cast<int32_t>(w->leases.size()) >= w->slots) continue;
          Task* t = PopBest(*w);
          if (!t) continue;
          Lease(*t, *w);
          progress = true;
        }
      }
    }
  }

  void Collect(Effects& fx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (TaskId id : dirty_) {
      auto it = tasks_.find(id);
      if (it == tasks_.end() || !it->second.dirty) continue;
      it->second.dirty = false;
      store_->UpdateTask(id, StatusOf(it->second));
    }
    dirty_.clear();
    for (Worker* w : dirty_workers_) {
      w->dirty = false;
      if (w->channel && !w->outbox.empty()) {
        fx.sends.emplace_back(w->channel, std::move(w->outbox));
      }
      w->outbox = WorkerOutbound{};
    }
    dirty_workers_.clear();
  }

  void Grant(Worker& w, int32_t credits) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // Never more tasks out with a worker than it could plausibly run or queue, however many
    // credits it sends while holding its leases. In 64 bits: a peer's count must not overflow ours.
    if (credits > 0) {
      const int64_t room = static_cast<int64_t>(kMaxHeld) - static_cast<int64_t>(w.leases.size());
      w.credits = static_cast<int32_t>(
          std::max<int64_t>(0, std::min<int64_t>(int64_t{w.credits} + credits, room)));
    }
  }

  // `w` has something to send; Collect sends it once the section ends.
  void MarkDirty(Worker& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (w.dirty) return;
    w.dirty = true;
    dirty_workers_.push_back(&w);
  }

  Worker* FindWorker(const WorkerHandle& h) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = workers_.find(h.worker_id);
    if (it == workers_.end() || it->second->generation != h.generation) return nullptr;
    return it->second.get();
  }

  // Returns every lease of `w` (counting the attempt) and forgets the worker.
  void RemoveWorker(Worker& w, const std::string& reason, Effects& fx)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const std::vector<TaskId> leases(w.leases.begin(), w.leases.end());
    for (TaskId id : leases) {
      auto it = tasks_.find(id);
      if (it != tasks_.end() && it->second.leased_to == &w) LoseLease(it->second, reason, fx);
    }
    std::erase(dirty_workers_, &w);
    if (persistent_) store_->DeleteWorker(w.id);
    workers_.erase(w.id);
  }

  WorkerView ViewOf(const Worker& w) const {
    return {w.id,        w.name,     w.host,        w.kinds,
            w.queues,    w.labels,   w.slots,       static_cast<int32_t>(w.leases.size()),
            w.connected, w.draining, w.connected_ms};
  }

  TaskView ViewOf(const Task& t, bool with_payload = true) const {
    TaskView v;
    v.id = t.id;
    v.job_id = t.job->id;
    v.queue = t.cls->queue;
    v.kind = t.cls->kind;
    v.state = t.state;
    v.attempts = t.attempts;
    v.max_attempts = t.max_attempts;
    v.priority = t.priority;
    if (with_payload) v.payload = t.payload;
    v.output = t.output();
    v.error = t.error();
    v.worker = t.worker();
    v.created_ms = t.created_ms;
    v.finished_ms = t.finished_ms;
    v.not_before_ms = t.not_before_ms;
    return v;
  }

  // Progress as the disk has it: results still being written do not count yet.
  JobView ViewOf(const Job& j) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    JobView v{j.id, j.total, j.done, j.succeeded, j.dead, j.cancelled, j.created_ms};
    for (auto id = j.completed.rbegin(); id != j.completed.rend(); ++id) {
      auto t = tasks_.find(*id);
      if (t == tasks_.end() || Settled(t->second)) break;  // durability follows completion order
      v.done--;
      v.succeeded -= t->second.state == TaskState::kSucceeded;
      v.dead -= t->second.state == TaskState::kDead;
      v.cancelled -= t->second.state == TaskState::kCancelled;
    }
    return v;
  }

  std::string WaitingFor(const Task& t) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (t.state == TaskState::kDelayed) {
      return absl::StrCat(t.attempts > 0 ? "retry backoff" : "delay", ": due in ",
                          std::max<int64_t>(0, t.not_before_ms - clock_->NowMs()), " ms");
    }
    if (t.state != TaskState::kPending) return "";
    int capable = 0;
    for (const auto& [id, w] : workers_) {
      if (w->connected && !w->draining && CanRun(*w, *t.cls)) ++capable;
    }
    if (capable == 0) return absl::StrCat("no connected worker runs ", DescribeClass(*t.cls));
    return absl::StrCat("all ", capable, " workers that run ", DescribeClass(*t.cls), " are busy");
  }

  const BrokerOptions options_;
  const Clock* const clock_;
  Store* const store_;
  const std::shared_ptr<spdlog::logger> log_;
  const std::string epoch_;
  const bool persistent_;
  // Store callbacks hold a weak reference: one that runs after the broker is gone does nothing.
  const std::shared_ptr<int> life_ = std::make_shared<int>(0);

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
  std::vector<TaskId> dirty_ ABSL_GUARDED_BY(mu_);           // tasks to send to the store
  std::vector<Worker*> dirty_workers_ ABSL_GUARDED_BY(mu_);  // workers with an outbox
  TaskId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_completion_ ABSL_GUARDED_BY(mu_) = 1;
  // Finished tasks up to this completion_seq are on disk (persistent stores only).
  uint64_t durable_completion_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_generation_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t duplicates_ ABSL_GUARDED_BY(mu_) = 0;
  // The last Tick, or the broker's start: a pause before the first tick counts too.
  int64_t last_tick_ms_ ABSL_GUARDED_BY(mu_) = clock_->NowMs();
  // After a restart: workers attached before it, not back yet; dispatch waits while there are any,
  // until hold_until_ms_ (see BrokerOptions::recovery_hold_ms).
  std::set<std::string> awaited_ ABSL_GUARDED_BY(mu_);
  int64_t hold_until_ms_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;

  friend class Broker;
};

Broker::Broker(BrokerOptions options, const Clock* clock, Store* store,
               std::shared_ptr<spdlog::logger> log)
    : impl_(std::make_unique<Impl>(options, clock, store, std::move(log))) {}

Broker::~Broker() {
  // Let the store's pending callbacks into the broker run first (bounded: a store that cannot
  // write keeps them, and they find the broker gone).
  auto flushed = std::make_shared<std::promise<void>>();
  std::future<void> done = flushed->get_future();
  impl_->store_->Flush([flushed](absl::Status) { flushed->set_value(); });
  done.wait_for(std::chrono::seconds(10));
}

std::string Broker::epoch() const { return impl_->epoch_; }

absl::Status Broker::Recover() {
  const auto start = std::chrono::steady_clock::now();
  Impl::Loader loader(*impl_);
  absl::Status status = impl_->store_->Load(&loader);
  if (!status.ok()) return status;
  std::map<TaskState, int64_t> by_state;
  size_t jobs, tasks;
  {
    absl::MutexLock lock(&impl_->mu_);
    loader.Finish();
    loader.Settle();
    // Every worker attached at the stop, and every one that held a lease then.
    for (const auto& [id, w] : impl_->workers_) impl_->awaited_.insert(id);
    impl_->hold_until_ms_ = impl_->clock_->NowMs() + impl_->options_.recovery_hold_ms;
    for (const auto& [id, t] : impl_->tasks_) by_state[t.state]++;
    jobs = impl_->jobs_.size();
    tasks = impl_->tasks_.size();
  }
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::steady_clock::now() - start)
                      .count();
  impl_->log_->info(
      "recovered {} jobs and {} tasks ({} pending, {} delayed, {} leased, {} finished) in {} ms",
      jobs, tasks, by_state[TaskState::kPending], by_state[TaskState::kDelayed],
      by_state[TaskState::kLeased],
      by_state[TaskState::kSucceeded] + by_state[TaskState::kDead] +
          by_state[TaskState::kCancelled],
      ms);
  if (loader.orphans() > 0) {  // a store must check this itself (see Store::Load)
    return absl::DataLossError(
        absl::StrCat("the store holds ", loader.orphans(), " tasks whose job is missing"));
  }
  return absl::OkStatus();
}

void Broker::WhenDurable(std::function<void(absl::Status)> done) {
  impl_->store_->Flush(std::move(done));
}

void Broker::Submit(const Caller& caller, std::vector<TaskSpec> specs,
                    std::function<void(absl::StatusOr<SubmitOutcome>)> done) {
  // Refuse new work while the store cannot write; acknowledged work waits in memory meanwhile.
  if (absl::Status writable = impl_->store_->Writable(); !writable.ok()) {
    done(absl::UnavailableError(absl::StrCat("the master cannot store new tasks now (",
                                             writable.message(), "); retry later")));
    return;
  }
  SubmitRows rows;
  SubmitRows* staged = impl_->persistent_ ? &rows : nullptr;
  absl::StatusOr<SubmitOutcome> outcome =
      impl_->Locked([&](Effects& fx) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return impl_->SubmitLocked(caller.tenant, specs, fx, staged);
      });
  if (!outcome.ok() || !staged) {
    done(std::move(outcome));
    return;
  }
  // Workers and clients see the job only once it is on disk; a job the store failed to write
  // is forgotten, so a client told "failed" finds no trace of it, ever.
  impl_->store_->Submit(
      std::move(rows),
      [impl = impl_.get(), life = std::weak_ptr<int>(impl_->life_), done = std::move(done),
       outcome = std::move(*outcome)](absl::Status status) mutable {
        if (life.expired()) {  // the master is stopping; the store's answer still holds
          if (status.ok()) {
            done(std::move(outcome));
          } else {
            done(absl::UnavailableError("the master stopped before the batch was stored"));
          }
          return;
        }
        impl->Locked([&](Effects& fx) ABSL_NO_THREAD_SAFETY_ANALYSIS {
          auto it = impl->jobs_.find(outcome.job_id);
          if (it == impl->jobs_.end()) return;
          if (status.ok()) {
            impl->Publish(*it->second);
          } else {
            impl->Discard(*it->second);
          }
        });
        if (status.ok()) {
          done(std::move(outcome));
        } else {
          done(absl::UnavailableError(
              absl::StrCat("the batch could not be stored (", status.message(),
                           "); none of its tasks were kept: submit it again later")));
        }
      });
}

absl::StatusOr<TaskView> Broker::GetTask(const Caller& caller, TaskId id) const {
  absl::MutexLock lock(&impl_->mu_);
  absl::StatusOr<const Task*> t = impl_->VisibleTask(caller, id);
  if (!t.ok()) return t.status();
  TaskView view = impl_->ViewOf(**t);
  view.waiting_for = impl_->WaitingFor(**t);
  view.settled = impl_->Settled(**t);
  return view;
}

absl::StatusOr<JobView> Broker::GetJob(const Caller& caller, const std::string& job_id) const {
  absl::MutexLock lock(&impl_->mu_);
  absl::StatusOr<Job*> job = impl_->VisibleJob(caller, job_id);
  if (!job.ok()) return job.status();
  return impl_->ViewOf(**job);
}

absl::StatusOr<int64_t> Broker::CancelTask(const Caller& caller, TaskId id) {
  return impl_->Locked([&](Effects& fx) ABSL_NO_THREAD_SAFETY_ANALYSIS -> absl::StatusOr<int64_t> {
    absl::StatusOr<const Task*> t = impl_->VisibleTask(caller, id);
    if (!t.ok()) return t.status();
    return impl_->CancelLocked(impl_->tasks_.at(id), fx) ? 1 : 0;
  });
}

absl::StatusOr<int64_t> Broker::CancelJob(const Caller& caller, const std::string& job_id) {
  return impl_->Locked([&](Effects& fx) ABSL_NO_THREAD_SAFETY_ANALYSIS -> absl::StatusOr<int64_t> {
    absl::StatusOr<Job*> job = impl_->VisibleJob(caller, job_id);
    if (!job.ok()) return job.status();
    int64_t cancelled = 0;
    for (TaskId id : (*job)->tasks) {
      auto t = impl_->tasks_.find(id);
      if (t != impl_->tasks_.end() && impl_->CancelLocked(t->second, fx)) ++cancelled;
    }
    return cancelled;
  });
}

absl::StatusOr<JobEvents> Broker::ReadJob(const Caller& caller, const std::string& job_id,
                                          int64_t after, size_t max, size_t max_bytes) const {
  absl::MutexLock lock(&impl_->mu_);
  absl::StatusOr<Job*> found = impl_->VisibleJob(caller, job_id);
  if (!found.ok()) return found.status();
  const Job& job = **found;
  JobEvents events;
  events.progress = impl_->ViewOf(job);
  const auto total = static_cast<int64_t>(job.completed.size());
  size_t bytes = 0;
  for (int64_t i = std::max<int64_t>(0, after);
       i < total && events.results.size() < max && bytes < max_bytes; ++i) {
    auto t = impl_->tasks_.find(job.completed[i]);
    if (t != impl_->tasks_.end() && !impl_->Settled(t->second)) break;  // not on disk yet
    if (t == impl_->tasks_.end()) {
      // Past retention: keep the position so the cursor stays right.
      TaskView gone;
      gone.id = job.completed[i];
      gone.job_id = job.id;
      gone.error = "result expired";
      events.results.push_back(std::move(gone));
    } else {
      TaskView view = impl_->ViewOf(t->second, /*with_payload=*/false);
      bytes += view.output.size() + view.error.size() + 64;
      events.results.push_back(std::move(view));
    }
  }
  return events;
}

absl::Status Broker::Watch(const Caller& caller, const std::string& job_id,
                           std::shared_ptr<JobWatcher> watcher) {
  absl::MutexLock lock(&impl_->mu_);
  absl::StatusOr<Job*> job = impl_->VisibleJob(caller, job_id);
  if (!job.ok()) return job.status();
  (*job)->watchers.push_back(std::move(watcher));
  return absl::OkStatus();
}

void Broker::Unwatch(const std::string& job_id, const JobWatcher* watcher) {
  absl::MutexLock lock(&impl_->mu_);
  auto it = impl_->jobs_.find(job_id);
  if (it == impl_->jobs_.end()) return;
  std::erase_if(it->second->watchers, [&](const auto& w) { return w.get() == watcher; });
}

void Broker::SetTenantLimits(std::map<std::string, TenantLimits> limits) {
  absl::MutexLock lock(&impl_->mu_);
  impl_->tenant_limits_ = std::move(limits);
}

std::vector<QueueStatsView> Broker::QueueStats() const {
  absl::MutexLock lock(&impl_->mu_);
  std::vector<QueueStatsView> out;
  for (const auto& [queue, c] : impl_->counters_) {
    out.push_back({queue, c.pending, c.leased, c.succeeded, c.failed, c.dead, c.cancelled});
  }
  return out;
}

std::vector<WorkerView> Broker::Workers() const {
  absl::MutexLock lock(&impl_->mu_);
  std::vector<WorkerView> out;
  for (const auto& [id, w] : impl_->workers_) out.push_back(impl_->ViewOf(*w));
  std::sort(out.begin(), out.end(),
            [](const WorkerView& a, const WorkerView& b) { return a.name < b.name; });
  return out;
}

int64_t Broker::DuplicateResults() const {
  absl::MutexLock lock(&impl_->mu_);
  return impl_->duplicates_;
}

absl::StatusOr<Broker::WorkerHandle> Broker::Attach(WorkerHello hello,
                                                    std::shared_ptr<WorkerChannel> channel) {
  if (hello.worker_id.empty()) return absl::InvalidArgumentError("hello: worker_id is empty");
  for (const auto& [field, value] :
       {std::pair<const char*, const std::string*>{"worker_id", &hello.worker_id},
        {"name", &hello.name},
        {"host", &hello.host}}) {
    if (value->size() > kMaxHelloText) {
      return absl::InvalidArgumentError(
          absl::StrCat("hello: ", field, " is longer than ", kMaxHelloText, " bytes"));
    }
  }
  if (hello.slots < 1 || hello.slots > kMaxSlots) {
    return absl::InvalidArgumentError(
        absl::StrCat("hello: slots must be between 1 and ", kMaxSlots));
  }
  if (hello.kinds.empty()) return absl::InvalidArgumentError("hello: the worker runs no kind");
  if (hello.held.size() > kMaxHeld) {
    return absl::InvalidArgumentError(absl::StrCat("hello: a worker holds at most ", kMaxHeld,
                                                   " tasks, not ", hello.held.size()));
  }
  if (hello.queues.empty()) hello.queues = {kDefaultQueue};
  if (hello.kinds.size() > kMaxNames || hello.queues.size() > kMaxNames) {
    return absl::InvalidArgumentError(
        absl::StrCat("hello: at most ", kMaxNames, " kinds and ", kMaxNames, " queues"));
  }
  if (absl::Status s = ValidateLabels(hello.labels); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("hello: ", s.message()));
  }
  for (const auto& names : {hello.kinds, hello.queues}) {
    for (const std::string& name : names) {
      if (absl::Status s = CheckName("kind or queue", name); !s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("hello: ", s.message()));
      }
    }
  }
  return impl_->Locked([&](Effects& fx) ABSL_NO_THREAD_SAFETY_ANALYSIS
                       -> absl::StatusOr<WorkerHandle> {
    Impl& b = *impl_;
    const int64_t now = b.clock_->NowMs();
    auto& slot = b.workers_[hello.worker_id];
    if (!slot) {
      slot = std::make_unique<Worker>();
      slot->id = hello.worker_id;
    } else if (!slot->secret.empty() && !ConstantTimeEquals(slot->secret, hello.secret)) {
      Log(fx, spdlog::level::warn,
          "refused a hello for worker id {}: it is in use, and the hello did not show its secret",
          Quote(hello.worker_id));
      return absl::PermissionDeniedError(
          absl::StrCat("worker id ", Quote(hello.worker_id),
                       " belongs to another worker stream; a worker picks a fresh id at start"));
    }
    // New, or known only from a lease stored before the restart.
    if (slot->secret.empty()) slot->secret = RandomHex(16);
    Worker& w = *slot;
    // Keep the leases the worker still holds; requeue those lost on the way (never started).
    std::unordered_map<TaskId, int32_t> held;  // task → attempt
    if (hello.master_epoch == b.epoch_) {
      for (const TaskRef& ref : hello.held) held[ref.id] = ref.attempt;
    }
    const std::vector<TaskId> leases(w.leases.begin(), w.leases.end());
    for (TaskId id : leases) {
      auto it = b.tasks_.find(id);
      if (it == b.tasks_.end() || it->second.leased_to != &w) {
        w.leases.erase(id);
        continue;
      }
      Task& t = it->second;
      if (auto h = held.find(id); h != held.end() && h->second == t.attempts) continue;
      if (t.state == TaskState::kLeased) {
        b.GiveBack(t);
      } else {
        b.Unlease(t);
      }
    }
    // Shown in logs, in `taskctl workers` and on every task it ran: printable from here on.
    w.name = Printable(hello.name.empty() ? hello.worker_id : hello.name);
    w.host = Printable(hello.host);
    w.kinds = SortedUnique(std::move(hello.kinds));
    w.queues = SortedUnique(std::move(hello.queues));
    w.labels = std::move(hello.labels);
    w.slots = hello.slots;
    w.credits = 0;
    w.generation = b.next_generation_++;
    w.connected = true;
    w.draining = false;
    w.connected_ms = now;
    w.heard_ms = now;
    w.channel = std::move(channel);
    w.eligible.clear();
    for (auto& [key, cls] : b.classes_) {
      if (CanRun(w, *cls)) w.eligible.push_back(cls.get());
    }
    Welcome welcome{
        b.epoch_, b.options_.heartbeat_interval_ms, b.options_.lease_timeout_ms, {}, w.secret};
    size_t adopted = 0;
    const bool awaited = b.awaited_.contains(w.id);
    for (const auto& [id, attempt] : held) {
      auto it = b.tasks_.find(id);
      if (it != b.tasks_.end() && !w.leases.contains(id) &&
          b.Adopt(it->second, {id, attempt}, w, awaited)) {
        ++adopted;
      }
    }
    for (const TaskRef& ref : hello.held) {
      if (!w.leases.contains(ref.id) || b.tasks_.at(ref.id).attempts != ref.attempt) {
        welcome.revoked.push_back(ref);
      }
    }
    w.outbox = WorkerOutbound{};
    w.outbox.welcome = std::move(welcome);
    b.MarkDirty(w);
    if (b.persistent_) b.store_->PutWorker({w.id, w.secret});
    if (b.awaited_.erase(w.id) > 0 && b.awaited_.empty()) {
      Log(fx, spdlog::level::info, "every worker attached before the restart is back: dispatching");
    }
    Log(fx, spdlog::level::info,
        "worker {} ({}) attached: {} slots, kinds [{}], queues [{}], {} leases kept ({} taken "
        "back from the queue), {} revoked",
        w.name, w.host, w.slots, absl::StrJoin(w.kinds, ","), absl::StrJoin(w.queues, ","),
        w.leases.size(), adopted, welcome.revoked.size());
    b.DispatchAll();  // tasks it gave back may go to others
    return WorkerHandle{w.id, w.generation};
  });
}

void Broker::AddCredits(const WorkerHandle& handle, int32_t credits) {
  impl_->Locked([&](Effects& fx) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    Worker* w = impl_->FindWorker(handle);
    if (!w || credits <= 0) return;
    impl_->Grant(*w, credits);
    impl_->DispatchTo(*w);
  });
}

void Broker::Report(const WorkerHandle& handle, std::vector<TaskReport> reports, int32_t credits) {
  std::shared_ptr<WorkerChannel> channel;
  std::vector<TaskRef> acked;
  acked.reserve(reports.size());
  impl_->Locked([&](Effects& fx) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    Impl& b = *impl_;
    Worker* w = b.FindWorker(handle);
    if (!w) return;
    channel = w->channel;
    bool gave_back = false;
    for (TaskReport& r : reports) {
      acked.push_back({r.id, r.attempt});
      // An untrusted worker's: cut where a character may end, since clients parse it too.
      if (r.error.size() > kMaxErrorBytes) r.error = ValidUtf8(r.error, kMaxErrorBytes);
      auto it = b.tasks_.find(r.id);
      if (it == b.tasks_.end()) continue;
      Task& t = it->second;
      if (t.leased_to != w || t.attempts != r.attempt) {
        ++b.duplicates_;  // a stale attempt, or a result already recorded
        continue;
      }
      if (r.outcome == Outcome::kReturned && t.state == TaskState::kLeased) {
        b.GiveBack(t);
        gave_back = true;
        continue;
      }
      b.Unlease(t);
      if (t.state != TaskState::kLeased) continue;  // cancelled while it ran: its slot is free
      switch (r.outcome) {
        case Outcome::kSucceeded:
          t.Notes().output = std::move(r.output);
          t.Notes().error.clear();
          b.Finish(t, TaskState::kSucceeded, fx);
          break;
        case Outcome::kFailed:
          t.Notes().error = std::move(r.error);
          t.cls->counters->failed++;
          if (r.permanent || t.attempts >= t.max_attempts) {
            b.Finish(t, TaskState::kDead, fx);
          } else {
            const int shift = std::min(t.attempts - 1, 30);
            const int64_t backoff =
                std::min(b.options_.retry_backoff_max_ms, b.options_.retry_backoff_ms << shift);
            b.Delay(t, b.clock_->NowMs() + backoff);
          }
          break;
        case Outcome::kCancelled:
          t.Notes().error = r.error.empty() ? "cancelled" : std::move(r.error);
          b.Finish(t, TaskState::kCancelled, fx);
          break;
        case Outcome::kReturned:  // handled above
          break;
      }
    }
    b.Grant(*w, credits);
    if (!b.persistent_) {
      // Nothing to wait for: the acks leave with the next tasks, in one message.
      w->outbox.acked = std::move(acked);
      acked.clear();
      b.MarkDirty(*w);
    }
    if (gave_back) {
      b.DispatchAll();
    } else {
      b.DispatchTo(*w);
    }
  });
  if (!channel || acked.empty()) return;
  impl_->store_->Flush([channel, acked = std::move(acked)](absl::Status status) mutable {
    // Unacknowledged results stay with the worker, which sends them again after reconnecting.
    if (!status.ok()) return;
    WorkerOutbound message;
    message.acked = std::move(acked);
    channel->Send(std::move(message));
  });
}

bool Broker::Heartbeat(const WorkerHandle& handle) {
  absl::MutexLock lock(&impl_->mu_);
  Worker* w = impl_->FindWorker(handle);
  if (w) w->heard_ms = impl_->clock_->NowMs();
  return w != nullptr;
}

void Broker::Drain(const WorkerHandle& handle) {
  impl_->Locked([&](Effects& fx) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    Worker* w = impl_->FindWorker(handle);
    if (!w) return;
    w->draining = true;
    w->credits = 0;
    Log(fx, spdlog::level::info, "worker {} is draining with {} tasks", w->name, w->leases.size());
  });
}

void Broker::Detach(const WorkerHandle& handle, bool bye) {
  impl_->Locked([&](Effects& fx) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    Impl& b = *impl_;
    Worker* w = b.FindWorker(handle);
    if (!w) return;
    if (bye) {
      Log(fx, spdlog::level::info, "worker {} left with {} unfinished tasks", w->name,
          w->leases.size());
      b.RemoveWorker(*w, absl::StrCat("worker ", w->name, " stopped while running it"), fx);
    } else {
      Log(fx, spdlog::level::warn,
          "worker {} disconnected with {} tasks; they wait {} ms for it to come back", w->name,
          w->leases.size(), b.options_.reconnect_grace_ms);
      w->connected = false;
      w->channel.reset();
      w->credits = 0;
      w->disconnected_ms = b.clock_->NowMs();
    }
    b.DispatchAll();
  });
}

void Broker::Tick() {
  impl_->Locked([&](Effects& fx) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    Impl& b = *impl_;
    const int64_t now = b.clock_->NowMs();
    b.ForgivePause(now, fx);
    b.EndHoldIfDue(now, fx);
    while (!b.delayed_.empty() && b.delayed_.top().first <= now) {
      auto [due, id] = b.delayed_.top();
      b.delayed_.pop();
      auto it = b.tasks_.find(id);
      if (it != b.tasks_.end() && it->second.state == TaskState::kDelayed &&
          it->second.not_before_ms == due) {
        b.MakeReady(it->second, /*front=*/false);
      }
    }
    std::vector<Worker*> gone;
    for (auto& [worker_id, w] : b.workers_) {
      // Gone once its grace has passed, and never sooner than a lease after its last heartbeat:
      // until then it may still be running its tasks (it stops them only then, see
      // docs/lifecycle.md), and they must not run in two places.
      if (!w->connected && now - w->disconnected_ms >= b.options_.reconnect_grace_ms &&
          now - w->heard_ms >= b.options_.lease_timeout_ms) {
        gone.push_back(w.get());
        continue;
      }
      // A disconnected worker has the reconnect grace instead.
      if (!w->connected || w->leases.empty() || now - w->heard_ms < b.options_.lease_timeout_ms) {
        continue;
      }
      Log(fx, spdlog::level::warn, "no heartbeat from worker {} for {} ms: its {} leases expire",
          w->name, now - w->heard_ms, w->leases.size());
      const std::vector<TaskId> expired(w->leases.begin(), w->leases.end());
      for (TaskId id : expired) {
        auto it = b.tasks_.find(id);
        if (it == b.tasks_.end()) {
          w->leases.erase(id);
          continue;
        }
        w->outbox.cancel.push_back(id);
        b.MarkDirty(*w);
        b.LoseLease(it->second,
                    absl::StrCat("lease expired: no heartbeat from worker ", w->name, " for ",
                                 b.options_.lease_timeout_ms, " ms"),
                    fx);
      }
    }
    for (Worker* w : gone) {
      Log(fx, spdlog::level::warn, "worker {} did not come back in time; its {} tasks are requeued",
          w->name, w->leases.size());
      b.RemoveWorker(*w, absl::StrCat("worker ", w->name, " disconnected while running it"), fx);
    }
    while (!b.job_expiry_.empty() && b.job_expiry_.front().first <= now) {
      auto it = b.jobs_.find(b.job_expiry_.front().second);
      b.job_expiry_.pop_front();
      if (it != b.jobs_.end()) b.DeleteJob(*it->second);
    }
    b.DispatchAll();
  });
}

void Broker::Shutdown() {
  impl_->Locked([&](Effects& fx) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    impl_->shutting_down_ = true;
    for (auto& [id, w] : impl_->workers_) {
      if (!w->connected) continue;
      w->outbox.shutting_down = true;
      impl_->MarkDirty(*w);
    }
    // Followers of jobs end their streams (see stopping()) and reconnect to the next master.
    for (auto& [id, job] : impl_->jobs_) {
      fx.notify.insert(fx.notify.end(), job->watchers.begin(), job->watchers.end());
    }
  });
}

bool Broker::stopping() const {
  absl::MutexLock lock(&impl_->mu_);
  return impl_->shutting_down_;
}

}  // namespace taskmaster
