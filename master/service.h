#pragma once

#include <memory>
#include <optional>

#include "common/auth.h"
#include "master/broker.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {

// Checks the bearer token of a call. Without a token set (the master's --insecure mode) every
// call is allowed. Immutable; thread-safe.
class Authorizer {
 public:
  explicit Authorizer(std::optional<TokenSet> tokens) : tokens_(std::move(tokens)) {}
  // UNAUTHENTICATED without a known token, PERMISSION_DENIED when its role may not do `call`.
  // Every call starts here: it also marks the answer as the master's (kAnsweredByMaster).
  grpc::Status Check(grpc::CallbackServerContext* context, Role need, const char* call) const;

 private:
  const std::optional<TokenSet> tokens_;
};

// The client API: translates protobuf to broker calls and back. Thread-safe.
class TaskQueueService final : public v1::TaskQueue::CallbackService {
 public:
  TaskQueueService(Broker* broker, const Authorizer* auth) : broker_(broker), auth_(auth) {}

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
  Broker* const broker_;
  const Authorizer* const auth_;
};

// The worker stream: one bidirectional Connect per worker process. Thread-safe.
class WorkerServiceImpl final : public v1::WorkerService::CallbackService {
 public:
  // `max_buffered_bytes`: what may wait for a worker that does not read its stream before the
  // stream is cut.
  WorkerServiceImpl(Broker* broker, const Authorizer* auth, std::shared_ptr<spdlog::logger> log,
                    size_t max_buffered_bytes)
      : broker_(broker),
        auth_(auth),
        log_(std::move(log)),
        max_buffered_bytes_(max_buffered_bytes) {}

  grpc::ServerBidiReactor<v1::WorkerMessage, v1::MasterMessage>* Connect(
      grpc::CallbackServerContext* context) override;

 private:
  Broker* const broker_;
  const Authorizer* const auth_;
  const std::shared_ptr<spdlog::logger> log_;
  const size_t max_buffered_bytes_;
};

}  // namespace taskmaster
