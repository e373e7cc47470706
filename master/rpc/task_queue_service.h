// The client API (TaskQueue): submit, status, results, cancel and stats, translated to broker
// calls and back.
#pragma once

#include <cstddef>

#include "master/core/broker.h"
#include "master/rpc/auth.h"
#include "master/rpc/job_stream.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {

// The client API: translates protobuf to broker calls and back. Thread-safe.
class TaskQueueService final : public v1::TaskQueue::CallbackService {
 public:
  // `max_watches_per_token`: WatchJob and SubmitAndWatch streams one token may hold open;
  // `hold_first_event`: SubmitAndWatch's first event waits for results until the next Tick.
  TaskQueueService(Broker* broker, const Authorizer* auth, size_t max_watches_per_token,
                   bool hold_first_event)
      : broker_(broker),
        auth_(auth),
        watches_(max_watches_per_token),
        hold_first_event_(hold_first_event) {}

  // The master's tick: first events held since the last one go out.
  void Tick() { first_events_.ReleaseAll(); }

  grpc::ServerUnaryReactor* Submit(grpc::CallbackServerContext* context,
                                   const v1::SubmitRequest* request,
                                   v1::SubmitResponse* response) override;
  grpc::ServerUnaryReactor* GetTask(grpc::CallbackServerContext* context,
                                    const v1::GetTaskRequest* request,
                                    v1::TaskInfo* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const v1::GetJobRequest* request,
                                   v1::JobInfo* response) override;
  grpc::ServerWriteReactor<v1::JobEvent>* WatchJob(grpc::CallbackServerContext* context,
                                                   const v1::WatchJobRequest* request) override;
  grpc::ServerWriteReactor<v1::JobEvent>* SubmitAndWatch(grpc::CallbackServerContext* context,
                                                         const v1::SubmitRequest* request) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* context,
                                   const v1::CancelRequest* request,
                                   v1::CancelResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* context,
                                  const v1::StatsRequest* request,
                                  v1::StatsResponse* response) override;
  grpc::ServerUnaryReactor* Workers(grpc::CallbackServerContext* context,
                                    const v1::WorkersRequest* request,
                                    v1::WorkersResponse* response) override;

 private:
  // Checks the call and takes a watch stream of the caller's quota; else the stream that refuses.
  grpc::ServerWriteReactor<v1::JobEvent>* RefuseWatch(grpc::CallbackServerContext* context,
                                                      const char* call, Authorized* who);

  Broker* const broker_;
  const Authorizer* const auth_;
  StreamQuota watches_;
  const bool hold_first_event_;
  FirstEventHold first_events_;
};

}  // namespace taskmaster
