// The worker service: one bidirectional Connect stream per worker process, carrying its hello,
// credits, results and heartbeats in, and its welcome, tasks, cancels and acknowledgements out.
#pragma once

#include <cstddef>
#include <memory>

#include "master/core/broker.h"
#include "master/rpc/auth.h"
#include "spdlog/logger.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {

// The worker stream: one bidirectional Connect per worker process. Thread-safe.
class WorkerServiceImpl final : public v1::WorkerService::CallbackService {
 public:
  // `max_buffered_bytes`: what may wait for a worker that does not read its stream before the
  // stream is cut; `stall`: how long a write may wait for it to read (see WorkerOutbox).
  WorkerServiceImpl(Broker* broker, const Authorizer* auth, std::shared_ptr<spdlog::logger> log,
                    size_t max_buffered_bytes, std::chrono::milliseconds stall)
      : broker_(broker),
        auth_(auth),
        log_(std::move(log)),
        max_buffered_bytes_(max_buffered_bytes),
        stall_(stall) {}

  grpc::ServerBidiReactor<v1::WorkerMessage, v1::MasterMessage>* Connect(
      grpc::CallbackServerContext* context) override;

 private:
  Broker* const broker_;
  const Authorizer* const auth_;
  const std::shared_ptr<spdlog::logger> log_;
  const size_t max_buffered_bytes_;
  const std::chrono::milliseconds stall_;
};

}  // namespace taskmaster
