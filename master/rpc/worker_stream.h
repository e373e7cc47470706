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

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "master/core/broker.h"
#include "master/rpc/auth.h"
#include "master/rpc/completion_queue.h"
#include "spdlog/logger.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {

// Thread-safe. AddTo the builder, Start once the server runs, Stop once it has shut down.
class WorkerServiceImpl final : public v1::WorkerService::AsyncService {
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
  ~WorkerServiceImpl() override { Stop(); }

  // Registers the service, and its completion queue, before the server is built.
  void AddTo(grpc::ServerBuilder& builder);
  // Waits for worker streams; the server runs.
  void Start();
  // The server has shut down (its calls are cancelled): waits for the streams to end, then stops
  // the queue's thread. Idempotent.
  void Stop();

 private:
  friend class WorkerStream;

  // A stream waits for the next call (each call's stream asks for the one after it).
  void AwaitCall();
  void StreamEnded();

  Broker* const broker_;
  const Authorizer* const auth_;
  const std::shared_ptr<spdlog::logger> log_;
  const size_t max_buffered_bytes_;
  const std::chrono::milliseconds stall_;
  std::unique_ptr<CompletionQueueThread> queue_;
  absl::Mutex mu_;
  int64_t streams_ ABSL_GUARDED_BY(mu_) = 0;  // alive, the one awaiting a call included
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace taskmaster
