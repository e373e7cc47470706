// The client API (see task_queue_service.h).
#include "master/rpc/task_queue_service.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "master/rpc/translate.h"

namespace taskmaster {

void TaskQueueService::Start(CompletionQueueThread* queue) {
  grpc::ServerCompletionQueue* cq = queue->cq();
  using Service = v1::TaskQueue::AsyncService;
  Call<v1::SubmitRequest, v1::SubmitResponse>::Await(this, &Service::RequestSubmit, cq, &calls_,
                                                     [this](auto* call) { AnswerSubmit(call); });
  Call<v1::GetTaskRequest, v1::TaskInfo>::Await(this, &Service::RequestGetTask, cq, &calls_,
                                                [this](auto* call) { AnswerGetTask(call); });
  Call<v1::GetJobRequest, v1::JobInfo>::Await(this, &Service::RequestGetJob, cq, &calls_,
                                              [this](auto* call) { AnswerGetJob(call); });
  Call<v1::CancelRequest, v1::CancelResponse>::Await(this, &Service::RequestCancel, cq, &calls_,
                                                     [this](auto* call) { AnswerCancel(call); });
  Call<v1::StatsRequest, v1::StatsResponse>::Await(this, &Service::RequestStats, cq, &calls_,
                                                   [this](auto* call) { AnswerStats(call); });
  Call<v1::WorkersRequest, v1::WorkersResponse>::Await(this, &Service::RequestWorkers, cq, &calls_,
                                                       [this](auto* call) { AnswerWorkers(call); });
  JobStream::Await(this, JobStream::Call::kWatchJob, cq);
  JobStream::Await(this, JobStream::Call::kSubmitAndWatch, cq);
}

void TaskQueueService::Stop() { calls_.StopAndWait(); }

void TaskQueueService::AnswerSubmit(Call<v1::SubmitRequest, v1::SubmitResponse>* call) {
  Authorized who;
  if (grpc::Status s = auth_->Check(call->context(), Role::kSubmit, "Submit", &who); !s.ok()) {
    call->Reply(s);
    return;
  }
  const SubmitTarget target = TargetOf(*call->request());
  std::vector<TaskSpec> specs = TakeSpecs(call->request());
  absl::StatusOr<std::shared_ptr<Broker>> broker = brokers_->ForSubmit(who.caller(), target, specs);
  if (!broker.ok()) {
    call->Reply(ToGrpcStatus(broker.status(), call->context()));
    return;
  }
  (*broker)->Submit(
      who.caller(), target, std::move(specs), [call](absl::StatusOr<SubmitOutcome> outcome) {
        if (!outcome.ok()) {
          call->Reply(ToGrpcStatus(outcome.status()));
          return;
        }
        v1::SubmitResponse* response = call->response();
        response->set_job_id(std::move(outcome->job_id));
        response->mutable_task_ids()->Add(outcome->task_ids.begin(), outcome->task_ids.end());
        for (auto& w : outcome->warnings) response->add_warnings(std::move(w));
        response->set_batch(outcome->batch);
        response->set_duplicate(outcome->duplicate);
        call->Reply(grpc::Status::OK);
      });
}

void TaskQueueService::AnswerGetTask(Call<v1::GetTaskRequest, v1::TaskInfo>* call) {
  Authorized who;
  if (grpc::Status s = auth_->Check(call->context(), Role::kSubmit, "GetTask", &who); !s.ok()) {
    call->Reply(s);
    return;
  }
  absl::StatusOr<std::shared_ptr<Broker>> routed = brokers_->ForTask(call->request()->id());
  if (!routed.ok()) {
    call->Reply(ToGrpcStatus(routed.status(), call->context()));
    return;
  }
  std::shared_ptr<Broker> broker = std::move(*routed);
  absl::StatusOr<TaskView> view = broker->GetTask(who.caller(), call->request()->id());
  if (!view.ok() || view->settled) {
    if (view.ok()) ToProto(*view, call->response());
    call->Reply(ToGrpcStatus(view.status()));
    return;
  }
  // Its result is being written: answer once it is on disk, so it cannot be taken back.
  // A raw pointer: the broker runs the store's callbacks before it goes, and the last reference
  // must never be dropped on the store's own thread.
  broker->WhenDurable([broker = broker.get(), call, caller = who.caller()](absl::Status status) {
    absl::StatusOr<TaskView> again = broker->GetTask(caller, call->request()->id());
    if (status.ok() && again.ok()) ToProto(*again, call->response());
    call->Reply(!status.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                            "the task's result is not stored yet; retry")
                             : ToGrpcStatus(again.status()));
  });
}

void TaskQueueService::AnswerGetJob(Call<v1::GetJobRequest, v1::JobInfo>* call) {
  Authorized who;
  if (grpc::Status s = auth_->Check(call->context(), Role::kSubmit, "GetJob", &who); !s.ok()) {
    call->Reply(s);
    return;
  }
  absl::StatusOr<std::shared_ptr<Broker>> broker = brokers_->ForJob(call->request()->job_id());
  if (!broker.ok()) {
    call->Reply(ToGrpcStatus(broker.status(), call->context()));
    return;
  }
  absl::StatusOr<JobView> view = (*broker)->GetJob(who.caller(), call->request()->job_id());
  if (view.ok()) ToProto(*view, call->response());
  call->Reply(ToGrpcStatus(view.status()));
}

void TaskQueueService::AnswerCancel(Call<v1::CancelRequest, v1::CancelResponse>* call) {
  Authorized who;
  if (grpc::Status s = auth_->Check(call->context(), Role::kSubmit, "Cancel", &who); !s.ok()) {
    call->Reply(s);
    return;
  }
  const v1::CancelRequest& request = *call->request();
  if (!request.has_task_id() && !request.has_job_id()) {
    call->Reply(
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "cancel needs a task id or a job id"));
    return;
  }
  absl::StatusOr<std::shared_ptr<Broker>> routed = request.has_task_id()
                                                       ? brokers_->ForTask(request.task_id())
                                                       : brokers_->ForJob(request.job_id());
  if (!routed.ok()) {
    call->Reply(ToGrpcStatus(routed.status(), call->context()));
    return;
  }
  std::shared_ptr<Broker> broker = std::move(*routed);
  absl::StatusOr<int64_t> cancelled = request.has_task_id()
                                          ? broker->CancelTask(who.caller(), request.task_id())
                                          : broker->CancelJob(who.caller(), request.job_id());
  if (!cancelled.ok()) {
    call->Reply(ToGrpcStatus(cancelled.status()));
    return;
  }
  call->response()->set_cancelled(*cancelled);
  // A cancel is acknowledged once it is durable, so a restart cannot forget it.
  broker->WhenDurable([call](absl::Status status) {
    call->Reply(status.ok() ? grpc::Status::OK
                            : grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                           absl::StrCat("the cancel could not be stored: ",
                                                        std::string(status.message()))));
  });
}

namespace {

// Which partitions an answer of Stats or Workers covers, and who serves the others.
template <typename Response>
void AddPartitions(const BrokerSet& brokers, const BrokerSet::Snapshot& snapshot,
                   Response* response) {
  if (brokers.partitions() <= 1) return;
  response->set_partition_count(brokers.partitions());
  for (int32_t p : snapshot.served) response->add_partitions(p);
  for (std::string& address : brokers.OtherMasters(snapshot)) {
    response->add_other_masters(std::move(address));
  }
}

}  // namespace

void TaskQueueService::AnswerStats(Call<v1::StatsRequest, v1::StatsResponse>* call) {
  if (grpc::Status s = auth_->Check(call->context(), Role::kSubmit, "Stats"); !s.ok()) {
    call->Reply(s);
    return;
  }
  v1::StatsResponse* response = call->response();
  const BrokerSet::Snapshot snapshot = brokers_->Take();
  for (const QueueStatsView& q : BrokerSet::QueueStats(snapshot)) {
    ToProto(q, response->add_queues());
  }
  for (const WorkerView& w : BrokerSet::Workers(snapshot)) ToProto(w, response->add_workers());
  response->set_duplicate_results(BrokerSet::DuplicateResults(snapshot));
  AddPartitions(*brokers_, snapshot, response);
  call->Reply(grpc::Status::OK);
}

void TaskQueueService::AnswerWorkers(Call<v1::WorkersRequest, v1::WorkersResponse>* call) {
  if (grpc::Status s = auth_->Check(call->context(), Role::kSubmit, "Workers"); !s.ok()) {
    call->Reply(s);
    return;
  }
  const BrokerSet::Snapshot snapshot = brokers_->Take();
  for (const WorkerView& w : BrokerSet::Workers(snapshot)) {
    ToProto(w, call->response()->add_workers());
  }
  AddPartitions(*brokers_, snapshot, call->response());
  call->Reply(grpc::Status::OK);
}

}  // namespace taskmaster
