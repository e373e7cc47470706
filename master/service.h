#pragma once

#include <memory>
#include <optional>
#include <string>
#include <unordered_map>

#include "absl/synchronization/mutex.h"
#include "common/auth.h"
#include "master/broker.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {

// Who made a call, once its token checked out.
struct Authorized {
  Identity identity;
  std::string token;  // as presented ("" without authentication): keys per-token limits

  Caller caller() const { return {identity.tenant, identity.role == Role::kAdmin}; }
};

// Checks the bearer token of a call. Without a token set (the master's --insecure mode) every
// call is allowed, as an admin of the default tenant. Thread-safe.
class Authorizer {
 public:
  explicit Authorizer(std::optional<TokenSet> tokens);
  // UNAUTHENTICATED without a known token, PERMISSION_DENIED when its role may not do `call`;
  // otherwise fills `who`. Every call starts here: it also marks the answer as the master's
  // (kAnsweredByMaster).
  grpc::Status Check(grpc::CallbackServerContext* context, Role need, const char* call,
                     Authorized* who = nullptr) const;
  // New tokens for calls from now on (streams already open keep going).
  void Replace(TokenSet tokens);

 private:
  const bool open_;  // --insecure
  mutable absl::Mutex mu_;
  std::shared_ptr<const TokenSet> tokens_ ABSL_GUARDED_BY(mu_);
};

// Open streams per token, so that one token cannot hold the master's memory with streams that
// never read. Thread-safe.
class StreamQuota {
 public:
  explicit StreamQuota(size_t per_token) : per_token_(per_token) {}
  // False when `token` has its limit open already; else counts one more until Release.
  bool Acquire(const std::string& token);
  void Release(const std::string& token);
  size_t per_token() const { return per_token_; }

 private:
  const size_t per_token_;
  absl::Mutex mu_;
  std::unordered_map<std::string, size_t> open_ ABSL_GUARDED_BY(mu_);
};

// The client API: translates protobuf to broker calls and back. Thread-safe.
class TaskQueueService final : public v1::TaskQueue::CallbackService {
 public:
  // `max_watches_per_token`: WatchJob and SubmitAndWatch streams one token may hold open.
  TaskQueueService(Broker* broker, const Authorizer* auth, size_t max_watches_per_token)
      : broker_(broker), auth_(auth), watches_(max_watches_per_token) {}

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
