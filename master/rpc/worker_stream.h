// The worker service: one bidirectional Connect stream per worker process, carrying its hello,
// credits, results and heartbeats in, and its welcome, tasks, cancels and acknowledgements out.
// Every worker stream runs on a completion queue served by a thread of its own (see
// completion_queue.h): a task's way out and its result's way in cost no hand-off between
// gRPC's threads.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "master/core/broker_set.h"
#include "master/rpc/auth.h"
#include "master/rpc/completion_queue.h"
#include "spdlog/logger.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {

// Thread-safe. Register it on the builder, Start it on the server's queue once the server runs,
// Stop it once the server has shut down and before the queue stops.
class WorkerServiceImpl final : public v1::WorkerService::AsyncService {
 public:
  // `max_buffered_bytes`: what may wait for a worker that does not read its stream before the
  // stream is cut; `stall`: how long a write may wait for it to read (see WorkerOutbox).
  WorkerServiceImpl(const BrokerSet* brokers, const Authorizer* auth,
                    std::shared_ptr<spdlog::logger> log, size_t max_buffered_bytes,
                    std::chrono::milliseconds stall)
      : brokers_(brokers),
        auth_(auth),
        log_(std::move(log)),
        max_buffered_bytes_(max_buffered_bytes),
        stall_(stall) {}

  // Awaits worker streams on `queue` (once per queue the server has).
  void Start(CompletionQueueThread* queue);
  // The server has shut down (its calls are cancelled): waits for the streams to end.
  // Idempotent.
  void Stop();

 private:
  friend class WorkerStream;

  // A stream waits for the next call on `cq` (each call's stream asks for the one after it).
  void AwaitCall(grpc::ServerCompletionQueue* cq);

  const BrokerSet* const brokers_;
  const Authorizer* const auth_;
  const std::shared_ptr<spdlog::logger> log_;
  const size_t max_buffered_bytes_;
  const std::chrono::milliseconds stall_;
  CallTracker calls_{"worker streams"};
};

}  // namespace taskmaster
