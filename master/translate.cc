#include "master/translate.h"

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
    broker.Report(worker, std::move(reports), m.draining() ? 0 : m.credits());
  } else if (m.credits() > 0 && !m.draining()) {
    broker.AddCredits(worker, m.credits());
  }
  const bool heard = m.heartbeat() && broker.Heartbeat(worker);
  if (m.draining()) broker.Drain(worker);
  return heard ? std::max<int64_t>(m.heartbeat_at(), 0) : 0;
}

}  // namespace taskmaster
