// The client API (see task_queue_service.h).
#include "master/rpc/task_queue_service.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "master/rpc/job_stream.h"
#include "master/rpc/translate.h"

namespace taskmaster {
namespace {

// Finishes a unary call with a broker status.
grpc::ServerUnaryReactor* Reply(grpc::CallbackServerContext* context, const grpc::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

}  // namespace

grpc::ServerUnaryReactor* TaskQueueService::Submit(grpc::CallbackServerContext* context,
                                                   const v1::SubmitRequest* request,
                                                   v1::SubmitResponse* response) {
  Authorized who;
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, "Submit", &who); !s.ok()) {
    return Reply(context, s);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  broker_->Submit(who.caller(), TargetOf(*request), TakeSpecs(request),
                  [reactor, response](absl::StatusOr<SubmitOutcome> outcome) {
                    if (!outcome.ok()) {
                      reactor->Finish(ToGrpcStatus(outcome.status()));
                      return;
                    }
                    response->set_job_id(std::move(outcome->job_id));
                    response->mutable_task_ids()->Add(outcome->task_ids.begin(),
                                                      outcome->task_ids.end());
                    for (auto& w : outcome->warnings) response->add_warnings(std::move(w));
                    response->set_batch(outcome->batch);
                    response->set_duplicate(outcome->duplicate);
                    reactor->Finish(grpc::Status::OK);
                  });
  return reactor;
}

grpc::ServerUnaryReactor* TaskQueueService::GetTask(grpc::CallbackServerContext* context,
                                                    const v1::GetTaskRequest* request,
                                                    v1::TaskInfo* response) {
  Authorized who;
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, "GetTask", &who); !s.ok()) {
    return Reply(context, s);
  }
  absl::StatusOr<TaskView> view = broker_->GetTask(who.caller(), request->id());
  if (!view.ok() || view->settled) {
    if (view.ok()) ToProto(*view, response);
    return Reply(context, ToGrpcStatus(view.status()));
  }
  // Its result is being written: answer once it is on disk, so it cannot be taken back.
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  broker_->WhenDurable(
      [this, reactor, request, response, caller = who.caller()](absl::Status status) {
        absl::StatusOr<TaskView> again = broker_->GetTask(caller, request->id());
        if (status.ok() && again.ok()) ToProto(*again, response);
        reactor->Finish(!status.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                                    "the task's result is not stored yet; retry")
                                     : ToGrpcStatus(again.status()));
      });
  return reactor;
}

grpc::ServerUnaryReactor* TaskQueueService::GetJob(grpc::CallbackServerContext* context,
                                                   const v1::GetJobRequest* request,
                                                   v1::JobInfo* response) {
  Authorized who;
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, "GetJob", &who); !s.ok()) {
    return Reply(context, s);
  }
  absl::StatusOr<JobView> view = broker_->GetJob(who.caller(), request->job_id());
  if (view.ok()) ToProto(*view, response);
  return Reply(context, ToGrpcStatus(view.status()));
}

grpc::ServerWriteReactor<v1::JobEvent>* TaskQueueService::RefuseWatch(
    grpc::CallbackServerContext* context, const char* call, Authorized* who) {
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, call, who); !s.ok())
    return RefusedJobStream(s);
  if (!watches_.Acquire(who->token)) {
    return RefusedJobStream(grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("this token has ", watches_.per_token(),
                     " job streams open, its limit (--max-watches-per-token); close some first")));
  }
  return nullptr;
}

grpc::ServerWriteReactor<v1::JobEvent>* TaskQueueService::WatchJob(
    grpc::CallbackServerContext* context, const v1::WatchJobRequest* request) {
  Authorized who;
  if (auto* refused = RefuseWatch(context, "WatchJob", &who)) return refused;
  auto* stream = new JobStream(broker_, std::move(who), &watches_, /*submitting=*/false);
  stream->Follow(request->job_id(), request->after());
  return stream;
}

grpc::ServerWriteReactor<v1::JobEvent>* TaskQueueService::SubmitAndWatch(
    grpc::CallbackServerContext* context, const v1::SubmitRequest* request) {
  Authorized who;
  if (auto* refused = RefuseWatch(context, "SubmitAndWatch", &who)) return refused;
  const Caller caller = who.caller();
  auto* stream = new JobStream(broker_, std::move(who), &watches_, /*submitting=*/true);
  // Appending to an open job and following it from here would skip what it already finished.
  if (!request->job_id().empty()) {
    stream->Fail(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                              "SubmitAndWatch opens a new job; add batches with Submit and "
                              "follow the job with WatchJob"));
    return stream;
  }
  broker_->Submit(caller, TargetOf(*request), TakeSpecs(request),
                  [stream, hold = hold_first_event_ ? &first_events_ : nullptr](
                      absl::StatusOr<SubmitOutcome> outcome) {
                    if (outcome.ok()) {
                      stream->Follow(outcome->job_id, 0, hold);
                    } else {
                      stream->Fail(ToGrpcStatus(outcome.status()));
                    }
                  });
  return stream;
}

grpc::ServerUnaryReactor* TaskQueueService::Cancel(grpc::CallbackServerContext* context,
                                                   const v1::CancelRequest* request,
                                                   v1::CancelResponse* response) {
  Authorized who;
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, "Cancel", &who); !s.ok()) {
    return Reply(context, s);
  }
  absl::StatusOr<int64_t> cancelled =
      request->has_task_id()  ? broker_->CancelTask(who.caller(), request->task_id())
      : request->has_job_id() ? broker_->CancelJob(who.caller(), request->job_id())
                              : absl::InvalidArgumentError("cancel needs a task id or a job id");
  if (!cancelled.ok()) return Reply(context, ToGrpcStatus(cancelled.status()));
  response->set_cancelled(*cancelled);
  // A cancel is acknowledged once it is durable, so a restart cannot forget it.
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  broker_->WhenDurable([reactor](absl::Status status) {
    reactor->Finish(status.ok() ? grpc::Status::OK
                                : grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                               absl::StrCat("the cancel could not be stored: ",
                                                            std::string(status.message()))));
  });
  return reactor;
}

grpc::ServerUnaryReactor* TaskQueueService::Stats(grpc::CallbackServerContext* context,
                                                  const v1::StatsRequest* request,
                                                  v1::StatsResponse* response) {
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, "Stats"); !s.ok()) {
    return Reply(context, s);
  }
  for (const QueueStatsView& q : broker_->QueueStats()) ToProto(q, response->add_queues());
  for (const WorkerView& w : broker_->Workers()) ToProto(w, response->add_workers());
  response->set_duplicate_results(broker_->DuplicateResults());
  return Reply(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* TaskQueueService::Workers(grpc::CallbackServerContext* context,
                                                    const v1::WorkersRequest* request,
                                                    v1::WorkersResponse* response) {
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, "Workers"); !s.ok()) {
    return Reply(context, s);
  }
  for (const WorkerView& w : broker_->Workers()) ToProto(w, response->add_workers());
  return Reply(context, grpc::Status::OK);
}

}  // namespace taskmaster
