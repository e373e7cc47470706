// HealthService: one status for the server and each service it serves.
#include "master/rpc/health_service.h"

#include <string_view>

#include "master/rpc/unary_call.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {
namespace {

namespace health = grpc::health::v1;

// A Watch call, refused as soon as it arrives.
class RefusedWatch {
 public:
  static void Await(health::Health::AsyncService* service, grpc::ServerCompletionQueue* cq,
                    CallTracker* calls) {
    if (calls->Begin()) new RefusedWatch(service, cq, calls);
  }

 private:
  RefusedWatch(health::Health::AsyncService* service, grpc::ServerCompletionQueue* cq,
               CallTracker* calls)
      : service_(service), cq_(cq), calls_(calls), writer_(&context_) {
    service->RequestWatch(&context_, &request_, &writer_, cq, cq, &call_tag_);
  }

  void OnCall(bool ok) {
    if (!ok) {  // the server is shutting down: no call came
      End();
      return;
    }
    Await(service_, cq_, calls_);
    writer_.Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "poll Check instead"),
                   &finish_tag_);
  }

  void OnFinished(bool) { End(); }

  void End() {
    CallTracker* calls = calls_;
    delete this;
    calls->End();
  }

  health::Health::AsyncService* const service_;
  grpc::ServerCompletionQueue* const cq_;
  CallTracker* const calls_;
  grpc::ServerContext context_;
  health::HealthCheckRequest request_;
  grpc::ServerAsyncWriter<health::HealthCheckResponse> writer_;
  CqTag<RefusedWatch, &RefusedWatch::OnCall> call_tag_{this};
  CqTag<RefusedWatch, &RefusedWatch::OnFinished> finish_tag_{this};
};

}  // namespace

void HealthService::Start(CompletionQueueThread* queue) {
  using Check = UnaryCall<health::Health::AsyncService, health::HealthCheckRequest,
                          health::HealthCheckResponse>;
  Check::Await(
      this, &health::Health::AsyncService::RequestCheck, queue->cq(), &calls_, [this](Check* call) {
        const std::string& service = call->request()->service();
        const bool known = service.empty() || service == v1::TaskQueue::service_full_name() ||
                           service == v1::WorkerService::service_full_name() ||
                           service == health::Health::service_full_name();
        if (!known) {
          // As the protocol says for a service the server does not know; the name is
          // not repeated back to an unauthenticated peer.
          call->Reply(grpc::Status(grpc::StatusCode::NOT_FOUND, "no such service"));
          return;
        }
        call->response()->set_status(serving_() ? health::HealthCheckResponse::SERVING
                                                : health::HealthCheckResponse::NOT_SERVING);
        call->Reply(grpc::Status::OK);
      });
  RefusedWatch::Await(this, queue->cq(), &calls_);
}

void HealthService::Stop() { calls_.StopAndWait(); }

}  // namespace taskmaster
