// Conversions between the API's protobuf messages and the broker core's plain types.
#include "master/rpc/translate.h"

#include <algorithm>
#include <utility>

namespace taskmaster {
namespace {

Outcome FromProto(v1::TaskResult::Outcome o) {
  switch (o) {
    case v1::TaskResult::SUCCEEDED:
      return Outcome::kSucceeded;
    case v1::TaskResult::CANCELLED:
      return Outcome::kCancelled;
    case v1::TaskResult::RETURNED:
      return Outcome::kReturned;
    default:
      return Outcome::kFailed;
  }
}

}  // namespace

TaskSpec FromProto(v1::TaskSpec& p) {
  TaskSpec s;
  s.queue = std::move(*p.mutable_queue());
  s.kind = std::move(*p.mutable_kind());
  s.payload = std::move(*p.mutable_payload());
  s.priority = p.priority();
  s.delay_ms = p.delay_ms();
  s.timeout_ms = p.timeout_ms();
  s.max_attempts = p.max_attempts();
  s.idempotency_key = std::move(*p.mutable_idempotency_key());
  s.labels = Labels(p.labels().begin(), p.labels().end());
  return s;
}

WorkerHello FromProto(v1::Hello& p) {
  WorkerHello h;
  h.worker_id = std::move(*p.mutable_worker_id());
  h.name = std::move(*p.mutable_name());
  h.host = std::move(*p.mutable_host());
  h.kinds.assign(p.kinds().begin(), p.kinds().end());
  h.queues.assign(p.queues().begin(), p.queues().end());
  h.labels = Labels(p.labels().begin(), p.labels().end());
  h.slots = p.slots();
  for (const auto& ref : p.held()) h.held.push_back({ref.task_id(), ref.attempt()});
  h.master_epoch = std::move(*p.mutable_master_epoch());
  h.secret = std::move(*p.mutable_worker_secret());
  return h;
}

std::vector<TaskSpec> TakeSpecs(const v1::SubmitRequest* request) {
  std::vector<TaskSpec> specs;
  specs.reserve(request->tasks_size());
  for (v1::TaskSpec& p : *const_cast<v1::SubmitRequest*>(request)->mutable_tasks()) {
    specs.push_back(FromProto(p));
  }
  return specs;
}

SubmitTarget TargetOf(const v1::SubmitRequest& request) {
  return {request.job_id(), request.batch(), request.keep_open()};
}

void ToProto(const TaskProgress& v, v1::TaskProgress* p) {
  p->set_task_id(v.id);
  p->set_attempt(v.attempt);
  p->set_done(v.done);
  p->set_total(v.total);
  p->set_message(v.message);
  p->set_updated_ms(v.updated_ms);
}

int64_t ApplyWorkerMessage(Broker& broker, const Broker::WorkerHandle& worker,
                           v1::WorkerMessage& m) {
  if (m.results_size() > 0) {
    std::vector<TaskReport> reports;
    reports.reserve(m.results_size());
    for (v1::TaskResult& r : *m.mutable_results()) {
      reports.push_back({r.task_id(), r.attempt(), FromProto(r.outcome()),
                         std::move(*r.mutable_output()), std::move(*r.mutable_error()),
                         r.permanent()});
    }
    // The credits ride along: one pass through the broker, one message back.
    broker.Report(worker, std::move(reports), m.draining() ? 0 : m.credits(), m.task_us());
  } else if (m.credits() > 0 && !m.draining()) {
    broker.AddCredits(worker, m.credits(), m.task_us());
  }
  if (m.progress_size() > 0) {
    std::vector<TaskProgress> progress;
    progress.reserve(m.progress_size());
    for (v1::TaskProgress& p : *m.mutable_progress()) {
      progress.push_back({.id = p.task_id(),
                          .attempt = p.attempt(),
                          .done = p.done(),
                          .total = p.total(),
                          .message = std::move(*p.mutable_message()),
                          .updated_ms = 0});
    }
    broker.Progress(worker, std::move(progress));
  }
  const bool heard = m.heartbeat() && broker.Heartbeat(worker, m.stuck());
  if (m.draining()) broker.Drain(worker);
  return heard ? std::max<int64_t>(m.heartbeat_at(), 0) : 0;
}

v1::TaskState ToProto(TaskState s) {
  switch (s) {
    case TaskState::kPending:
      return v1::PENDING;
    case TaskState::kDelayed:
      return v1::DELAYED;
    case TaskState::kLeased:
      return v1::LEASED;
    case TaskState::kSucceeded:
      return v1::SUCCEEDED;
    case TaskState::kDead:
      return v1::DEAD;
    case TaskState::kCancelled:
      return v1::CANCELLED;
  }
  return v1::TASK_STATE_UNSPECIFIED;
}

void ToProto(TaskView& v, v1::TaskInfo* p) {
  p->set_id(v.id);
  p->set_job_id(std::move(v.job_id));
  p->set_queue(std::move(v.queue));
  p->set_kind(std::move(v.kind));
  // A task past retention has no kind and no state worth reporting.
  p->set_state(p->kind().empty() ? v1::TASK_STATE_UNSPECIFIED : ToProto(v.state));
  p->set_attempts(v.attempts);
  p->set_max_attempts(v.max_attempts);
  p->set_priority(v.priority);
  p->set_payload(std::move(v.payload));
  p->set_output(std::move(v.output));
  p->set_error(std::move(v.error));
  p->set_worker(std::move(v.worker));
  p->set_waiting_for(std::move(v.waiting_for));
  p->set_created_ms(v.created_ms);
  p->set_finished_ms(v.finished_ms);
  p->set_not_before_ms(v.not_before_ms);
  if (v.progress) ToProto(*v.progress, p->mutable_progress());
}

void ToProto(const JobView& v, v1::JobInfo* p) {
  p->set_job_id(v.job_id);
  p->set_total(v.total);
  p->set_done(v.done);
  p->set_succeeded(v.succeeded);
  p->set_dead(v.dead);
  p->set_cancelled(v.cancelled);
  p->set_created_ms(v.created_ms);
  p->set_open(v.open);
  for (const TaskProgress& progress : v.running) ToProto(progress, p->add_running());
}

void ToProto(const WorkerView& v, v1::WorkerInfo* p) {
  p->set_worker_id(v.worker_id);
  p->set_name(v.name);
  p->set_host(v.host);
  for (const auto& k : v.kinds) p->add_kinds(k);
  for (const auto& q : v.queues) p->add_queues(q);
  p->mutable_labels()->insert(v.labels.begin(), v.labels.end());
  p->set_slots(v.slots);
  p->set_running(v.running);
  p->set_connected(v.connected);
  p->set_draining(v.draining);
  p->set_connected_ms(v.connected_ms);
  p->set_stuck(v.stuck);
  p->set_heartbeat_age_ms(v.heartbeat_age_ms);
  p->set_silent(v.silent);
}

void AddRefs(const std::vector<TaskRef>& refs,
             google::protobuf::RepeatedPtrField<v1::TaskRef>* out) {
  for (const TaskRef& r : refs) {
    v1::TaskRef* p = out->Add();
    p->set_task_id(r.id);
    p->set_attempt(r.attempt);
  }
}

void ToProto(const QueueStatsView& v, v1::QueueStats* p) {
  p->set_queue(v.queue);
  p->set_pending(v.pending);
  p->set_delayed(v.delayed);
  p->set_leased(v.leased);
  p->set_oldest_ready_age_ms(v.oldest_ready_age_ms);
  p->set_submitted(v.submitted);
  p->set_succeeded(v.succeeded);
  p->set_failed(v.failed);
  p->set_retried(v.retried);
  p->set_redelivered(v.redelivered);
  p->set_dead(v.dead);
  p->set_cancelled(v.cancelled);
}

}  // namespace taskmaster
