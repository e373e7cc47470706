// HealthService: one status for the server and each service it serves.
#include "master/rpc/health_service.h"

#include <string_view>

#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {

namespace health = grpc::health::v1;

grpc::ServerUnaryReactor* HealthService::Check(grpc::CallbackServerContext* context,
                                               const health::HealthCheckRequest* request,
                                               health::HealthCheckResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const std::string& service = request->service();
  const bool known = service.empty() || service == v1::TaskQueue::service_full_name() ||
                     service == v1::WorkerService::service_full_name() ||
                     service == health::Health::service_full_name();
  if (!known) {
    // As the protocol says for a service the server does not know; the name is not repeated
    // back to an unauthenticated peer.
    reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND, "no such service"));
    return reactor;
  }
  response->set_status(serving_() ? health::HealthCheckResponse::SERVING
                                  : health::HealthCheckResponse::NOT_SERVING);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace taskmaster
