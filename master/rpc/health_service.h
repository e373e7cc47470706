// The standard health service (grpc.health.v1) of the master: what probes ask (taskctl health,
// grpc_health_probe, Kubernetes, a container's HEALTHCHECK).
#pragma once

#include <functional>

#include "grpc/health/v1/health.grpc.pb.h"
#include "master/rpc/completion_queue.h"

namespace taskmaster {

// SERVING while `serving` says so, NOT_SERVING otherwise, for the server ("") and for each of its
// services. Open to every peer, since probes carry no token: it tells only that status, and its
// request is bounded. Watch is answered UNIMPLEMENTED at once (a probe polls Check), so no peer
// can hold a stream open here. Thread-safe; Start and Stop as TaskQueueService.
class HealthService final : public grpc::health::v1::Health::AsyncService {
 public:
  explicit HealthService(std::function<bool()> serving) : serving_(std::move(serving)) {}

  void Start(CompletionQueueThread* queue);
  void Stop();

 private:
  const std::function<bool()> serving_;
  CallTracker calls_{"health checks"};
};

}  // namespace taskmaster
