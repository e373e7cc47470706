// Submit: a batch's admission (validation, queue and class limits, tenant limits), idempotency
// keys, and the staging of a job until the store has it.
#include <cmath>
#include <set>
#include <tuple>
#include <unordered_set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/partition.h"
#include "common/util.h"
#include "master/core/broker_impl.h"
#include "master/core/validate.h"

namespace taskmaster {

absl::StatusOr<SubmitOutcome> Broker::Impl::SubmitLocked(const Caller& caller,
                                                         const SubmitTarget& target,
                                                         std::vector<TaskSpec>& specs, Effects& fx,
                                                         SubmitRows* rows) {
  const std::string& tenant = caller.tenant;
  Job* open_job = nullptr;  // the job this batch is appended to
  if (!target.job_id.empty() && target.batch < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a batch added to job ", target.job_id, " is numbered from 1; this one is ", target.batch));
  }
  if (specs.empty() && target.keep_open) {
    return absl::InvalidArgumentError(
        "a submit needs at least one task (only the call that closes a job may have none)");
  }
  if (!target.job_id.empty()) {
    bool duplicate = false;
    absl::StatusOr<Job*> found = AppendTarget(caller, target, &duplicate);
    if (!found.ok()) return found.status();
    if (duplicate) {
      SubmitOutcome out;
      out.job_id = target.job_id;
      out.batch = target.batch;
      out.duplicate = true;
      return out;
    }
    open_job = *found;
    open_job->appended_ms = clock_->NowMs();  // its client is alive, whatever the batch's fate
  } else if (target.batch != 0) {
    return absl::InvalidArgumentError(
        "a batch number needs the job id of the open job it belongs to");
  }
  if (specs.empty() && !open_job) {
    return absl::InvalidArgumentError("a submit needs at least one task");
  }
  if (!open_job && target.keep_open) {
    if (open_jobs_ >= options_.max_open_jobs) {
      return absl::ResourceExhaustedError(
          absl::StrCat(open_jobs_, " jobs are open, the limit (--max-open-jobs): close one first"));
    }
    if (auto it = accounts_.find(tenant);
        it != accounts_.end() && it->second.open_jobs >= options_.tenant_max_open_jobs) {
      return absl::ResourceExhaustedError(
          absl::StrCat(it->second.open_jobs,
                       " jobs of this tenant are open, its limit "
                       "(--tenant-max-open-jobs): close one first"));
    }
  }
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
    if (s.queue.empty()) s.queue = core::kDefaultQueue;
    if (s.timeout_ms == 0) s.timeout_ms = options_.default_timeout_ms;
    if (s.max_attempts == 0) s.max_attempts = options_.default_max_attempts;
    if (absl::Status st = core::ValidateSpec(s, options_.max_payload_bytes); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("task ", i, ": ", st.message()));
    }
    if (absl::Status st = CheckKey(tenant, s, batch_keys); !st.ok()) {
      return absl::Status(st.code(), absl::StrCat("task ", i, ": ", st.message()));
    }
    // A batch joins its job's completion order at its end, where a finished task of another job
    // has no place that a restart would keep.
    // (Looked up for keyed tasks of appended batches only: no other submit pays for it.)
    if (open_job && !s.idempotency_key.empty()) {
      auto it = keys_.find(KeyIndex(tenant, s.idempotency_key));
      if (it != keys_.end() && tasks_.at(it->second).job != open_job) {
        return absl::FailedPreconditionError(
            absl::StrCat("task ", i, ": idempotency key '", s.idempotency_key,
                         "' belongs to a task of job ", tasks_.at(it->second).job->id,
                         "; a batch added to an open job can only repeat its own"));
      }
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
    const int64_t pending = it == counters_.end() ? 0 : it->second.ready + it->second.delayed;
    if (pending + added > static_cast<int64_t>(options_.max_queue_length)) {
      return absl::ResourceExhaustedError(
          absl::StrCat("queue '", queue, "' is full: ", pending, " pending, limit ",
                       options_.max_queue_length, "; retry later or raise --max-queue-length"));
    }
  }
  if (classes_.size() + new_classes > options_.max_task_classes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "too many distinct (queue, kind, labels) combinations; limit ", options_.max_task_classes));
  }
  const int64_t now = clock_->NowMs();
  Account& account = accounts_[tenant];
  // A batch adding nothing (its own keys again) still costs a call's worth of the rate.
  if (absl::Status st =
          Charge(tenant, account, open_job ? std::max<int64_t>(new_tasks, 1) : new_tasks, now);
      !st.ok()) {
    return st;
  }

  // Where the new tasks go: a new job; or a staged batch that joins the open job once durable;
  // or, with a memory store, the open job itself.
  Job* job;
  if (open_job && !rows) {
    job = open_job;
  } else {
    auto job_owner = std::make_unique<Job>();
    job = job_owner.get();
    job->id = open_job ? open_job->id : JobIdPrefixOf(options_.partition) + RandomHex(8);
    job->tenant = tenant;
    job->account = &account;
    job->created_ms = open_job ? open_job->created_ms : now;
    job->staged = rows != nullptr;
    job->open = target.keep_open;
    if (open_job) {
      open_job->append = std::move(job_owner);
    } else {
      job->appended_ms = now;
      jobs_[job->id] = std::move(job_owner);
      if (job->open) {
        CountOpen(*job, true);
        ScheduleIdleCheck(*job, now + options_.open_job_timeout_ms);
      }
    }
  }
  // An upper bound while tasks are added (a key repeated in the batch is one task), so a new job
  // cannot look complete before all of them are in.
  const size_t had = open_job && !rows ? job->tasks.size() : 0;
  if (!open_job) job->total = static_cast<int64_t>(specs.size());
  job->tasks.reserve(had + specs.size());
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
        const bool own = tasks_.at(id).job == job || tasks_.at(id).job == open_job;
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
    t.payload = s.payload;
    if (!s.idempotency_key.empty()) t.Notes().idempotency_key = std::move(s.idempotency_key);
    t.created_ms = now;
    t.timeout_ms = s.timeout_ms;
    t.priority = s.priority;
    t.max_attempts = s.max_attempts;
    if (!t.key().empty()) keys_[KeyIndex(t)] = t.id;
    account.unfinished++;
    job->tasks.push_back(t.id);
    out.task_ids.push_back(t.id);
    t.at_ms = now + s.delay_ms;
    cls->counters->submitted++;
    if (s.delay_ms > 0) {
      t.state = TaskState::kDelayed;
      cls->counters->delayed++;
    } else {
      t.seq = next_seq_++;
      cls->counters->ready++;
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
  const auto added = static_cast<int64_t>(job->tasks.size() - had);
  if (open_job) {
    out.batch = target.batch;
    if (rows) {
      job->total = added;
      rows->job = {open_job->id, open_job->total + added, open_job->created_ms,
                   tenant,       target.keep_open,        open_job->batches + 1};
    } else {
      open_job->total += added;
      JoinBatch(*open_job, nullptr, target.keep_open, /*counts=*/true, fx);
      DispatchAll();
    }
    return out;
  }
  // The job is over its distinct tasks: task_ids repeat an id for a repeated key.
  if (added != job->total) {
    job->total = added;
    MaybeJobComplete(job, now);
  }
  if (rows) {
    rows->job = {job->id, job->total, job->created_ms, job->tenant, job->open, job->batches};
  } else {
    DispatchAll();
  }
  return out;
}

absl::StatusOr<core::Job*> Broker::Impl::AppendTarget(const Caller& caller,
                                                      const SubmitTarget& target, bool* duplicate) {
  absl::StatusOr<Job*> found = VisibleJob(caller, target.job_id);
  if (!found.ok()) return found.status();
  Job& job = **found;
  const std::string& id = job.id;
  if (job.tenant != caller.tenant) {
    return absl::PermissionDeniedError(
        absl::StrCat("job ", id, " belongs to another tenant: only its own adds to it"));
  }
  if (job.append) {
    return absl::AbortedError(job.append->batches == 0
                                  ? absl::StrCat("job ", id, " is being closed for idling")
                                  : absl::StrCat("batch ", job.batches, " of job ", id,
                                                 " is still being stored; retry in a moment"));
  }
  if (target.batch == job.batches - 1) {
    *duplicate = true;  // its answer was lost, or the call was retried: applied once only
    return &job;
  }
  if (!job.open) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", id, " is closed: it takes no more tasks"));
  }
  if (target.batch != job.batches) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", id, " takes batch ", job.batches, " next, not batch ", target.batch));
  }
  return &job;
}

void Broker::Impl::JoinBatch(Job& job, std::unique_ptr<Job> batch, bool keep_open, bool counts,
                             Effects& fx) {
  const int64_t now = clock_->NowMs();
  if (batch) {
    for (TaskId id : batch->tasks) tasks_.at(id).job = &job;  // a batch holds only its own
    job.tasks.insert(job.tasks.end(), batch->tasks.begin(), batch->tasks.end());
    job.total += batch->total;
  }
  if (counts) ++job.batches;
  job.appended_ms = now;
  if (keep_open) {
    ScheduleIdleCheck(job, now + options_.open_job_timeout_ms);
    return;
  }
  if (job.open) CountOpen(job, false);
  MaybeJobComplete(&job, now);
  // Its followers learn that it is closed (and maybe complete): the close is durable by now.
  fx.notify.insert(fx.notify.end(), job.watchers.begin(), job.watchers.end());
}

void Broker::Impl::CountOpen(Job& job, bool open) {
  job.open = open;
  const int64_t delta = open ? 1 : -1;
  open_jobs_ += delta;
  job.account->open_jobs += delta;
}

void Broker::Impl::ScheduleIdleCheck(Job& job, int64_t at) {
  if (job.idle_check) return;
  job.idle_check = true;
  idle_checks_.push({at, job.id});
}

std::vector<std::string> Broker::Impl::IdleOpenJobs(int64_t now, Effects& fx) {
  std::vector<std::string> idle;
  while (!idle_checks_.empty() && idle_checks_.top().first <= now) {
    auto it = jobs_.find(idle_checks_.top().second);
    idle_checks_.pop();
    if (it == jobs_.end()) continue;
    Job& job = *it->second;
    job.idle_check = false;
    if (!job.open) continue;
    // A batch on its way to the store (or the job's first) is a sign of life: look again later.
    const int64_t due = job.staged || job.append ? now + options_.open_job_timeout_ms
                                                 : job.appended_ms + options_.open_job_timeout_ms;
    if (now < due) {
      ScheduleIdleCheck(job, due);
      continue;
    }
    Log(fx, spdlog::level::info, "job {} had no batch for {} ms: closing it", job.id,
        now - job.appended_ms);
    idle.push_back(job.id);
  }
  return idle;
}

void Broker::Impl::CloseIdle(const std::string& job_id) {
  SubmitRows rows;
  {
    Section section(*this);
    auto it = jobs_.find(job_id);
    if (it == jobs_.end()) return;
    Job& job = *it->second;
    if (!job.open || job.idle_check || job.append) return;  // closed, or looked at again
    const int64_t now = clock_->NowMs();
    if (now < job.appended_ms + options_.open_job_timeout_ms) {  // a batch came meanwhile
      ScheduleIdleCheck(job, job.appended_ms + options_.open_job_timeout_ms);
      return;
    }
    // Closed without taking a batch number: a client's late batch is refused, never mistaken
    // for one applied before.
    if (!persistent_) {
      JoinBatch(job, nullptr, /*keep_open=*/false, /*counts=*/false, section.fx);
      return;
    }
    job.append = std::make_unique<Job>();
    Job& close = *job.append;
    close.id = job.id;
    close.tenant = job.tenant;
    close.account = job.account;
    close.staged = true;
    close.batches = 0;
    rows.job = {job.id, job.total, job.created_ms, job.tenant, false, job.batches};
  }
  store_->Submit(std::move(rows), [this, job_id](absl::Status status) {
    Staged(job_id, /*append=*/true, status);
    if (!status.ok()) {
      log_->warn("could not close idle job {}: {}", job_id, std::string(status.message()));
    }
  });
}

std::string Broker::Impl::KeyIndex(const std::string& tenant, const std::string& key) {
  return absl::StrCat(tenant, "\n", key);
}

TenantLimits Broker::Impl::LimitsOf(const std::string& tenant) const {
  TenantLimits limits = options_.tenant_limits;
  if (auto it = tenant_limits_.find(tenant); it != tenant_limits_.end()) {
    if (it->second.max_pending >= 0) limits.max_pending = it->second.max_pending;
    if (it->second.submit_rate >= 0) limits.submit_rate = it->second.submit_rate;
  }
  return limits;
}

absl::Status Broker::Impl::Charge(const std::string& tenant, Account& account, int64_t tasks,
                                  int64_t now) {
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

absl::Status Broker::Impl::CheckKey(
    const std::string& tenant, const TaskSpec& s,
    std::unordered_map<std::string_view, const TaskSpec*>& batch_keys) const {
  if (s.idempotency_key.empty()) return absl::OkStatus();
  auto same_work = [&s](const std::string& queue, const std::string& kind, const Labels& labels,
                        std::string_view payload, int32_t priority, int64_t timeout_ms,
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
    return same_work(t.cls->queue, t.cls->kind, t.cls->labels, t.payload.view(), t.priority,
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

void Broker::Impl::Publish(Job& job, size_t from) {
  job.staged = false;
  for (size_t i = from; i < job.tasks.size(); ++i) {
    const TaskId id = job.tasks[i];
    auto it = tasks_.find(id);  // a task it follows may be gone past retention
    if (it != tasks_.end() && it->second.job == &job) Enqueue(it->second);
  }
  DispatchAll();
}

void Broker::Impl::Discard(Job& job) {
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
    // Not from `submitted`: a counter only grows, and the batch was accepted before the store
    // failed it.
    --*(t.state == TaskState::kDelayed ? &t.cls->counters->delayed : &t.cls->counters->ready);
    job.account->unfinished--;
    if (!t.key().empty()) keys_.erase(KeyIndex(t));
    Forget(it);
  }
}

void Broker::Impl::AddExistingToJob(Job* job, TaskId id, Effects& fx, SubmitRows* rows) {
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

core::TaskClass* Broker::Impl::ClassFor(const std::string& queue, const std::string& kind,
                                        const Labels& labels) {
  auto key = std::make_tuple(queue, kind, labels);
  auto it = classes_.find(key);
  if (it != classes_.end()) return it->second.get();
  auto cls = std::make_unique<TaskClass>();
  cls->queue = queue;
  cls->kind = kind;
  cls->labels = labels;
  cls->counters = &counters_[queue];
  cls->times = TimesOf(kind);
  for (auto& [id, w] : workers_) {
    if (CanRun(*w, *cls)) w->eligible.push_back(cls.get());
  }
  return classes_.emplace(key, std::move(cls)).first->second.get();
}

KindTimesView* Broker::Impl::TimesOf(const std::string& kind) {
  auto it = kind_times_.find(kind);
  if (it == kind_times_.end()) {
    const bool room = kind_times_.size() < options_.max_metric_kinds;
    it = kind_times_.find(room ? kind : kOtherKinds);
    if (it == kind_times_.end()) {
      auto times = std::make_unique<KindTimesView>();
      times->kind = room ? kind : kOtherKinds;
      it = kind_times_.emplace(times->kind, std::move(times)).first;
    }
  }
  return it->second.get();
}

bool Broker::Impl::HasWorkerFor(const TaskClass& cls) const {
  for (const auto& [id, w] : workers_) {
    if (w->connected && !w->draining && CanRun(*w, cls)) return true;
  }
  return false;
}

void Broker::Impl::Submit(const Caller& caller, const SubmitTarget& target,
                          std::vector<TaskSpec> specs,
                          std::function<void(absl::StatusOr<SubmitOutcome>)> done) {
  // Refuse new work while the store cannot write; acknowledged work waits in memory meanwhile.
  if (absl::Status writable = store_->Writable(); !writable.ok()) {
    done(absl::UnavailableError(absl::StrCat("the master cannot store new tasks now (",
                                             writable.message(), "); retry later")));
    return;
  }
  SubmitRows rows;
  SubmitRows* staged = persistent_ ? &rows : nullptr;
  absl::StatusOr<SubmitOutcome> outcome;
  {
    Section section(*this);
    outcome = SubmitLocked(caller, target, specs, section.fx, staged);
  }
  if (!outcome.ok() || !staged || outcome->duplicate) {
    done(std::move(outcome));
    return;
  }
  // Workers and clients see the tasks only once they are on disk; a batch the store failed to
  // write is forgotten, so a client told "failed" finds no trace of it, ever.
  const bool append = !target.job_id.empty();
  store_->Submit(std::move(rows), [this, append, done = std::move(done),
                                   outcome = std::move(*outcome)](absl::Status status) mutable {
    Staged(outcome.job_id, append, status);
    if (status.ok()) {
      done(std::move(outcome));
    } else if (absl::IsUnknown(status)) {
      done(absl::UnknownError(
          absl::StrCat("the batch may or may not be stored: ", status.message())));
    } else {
      done(absl::UnavailableError(
          absl::StrCat("the batch could not be stored (", status.message(),
                       "); none of its tasks were kept: submit it again later")));
    }
  });
}

void Broker::Impl::Staged(const std::string& job_id, bool append, const absl::Status& stored) {
  Section section(*this);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return;
  Job& job = *it->second;
  if (!append) {
    if (stored.ok()) {
      Publish(job);
      return;
    }
    if (job.open) CountOpen(job, false);
    Discard(job);
    jobs_.erase(it);
    return;
  }
  std::unique_ptr<Job> batch = std::move(job.append);
  if (!batch) return;
  if (!stored.ok()) {
    Discard(*batch);
    // Still open: its client may retry, or it idles out later (a failed close is tried again).
    ScheduleIdleCheck(job, clock_->NowMs() + options_.open_job_timeout_ms);
    return;
  }
  const size_t from = job.tasks.size();
  const bool keep_open = batch->open;
  const bool counts = batch->batches > 0;
  JoinBatch(job, std::move(batch), keep_open, counts, section.fx);
  Publish(job, from);
}

void Broker::Impl::SetTenantLimits(std::map<std::string, TenantLimits> limits) {
  absl::MutexLock lock(&mu_);
  tenant_limits_ = std::move(limits);
}

}  // namespace taskmaster
