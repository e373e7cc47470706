// A unary call on the master's completion queue: it awaits its peer, hands the request to its
// handler, and is answered with Reply, at once or later from any thread (a store's commit). The
// next call of the method is awaited as soon as one arrives.
#pragma once

#include <functional>
#include <utility>

#include "grpcpp/grpcpp.h"
#include "master/rpc/completion_queue.h"

namespace taskmaster {

template <typename Service, typename Request, typename Response>
class UnaryCall {
 public:
  // The generated RequestX of the method.
  using RequestFn = void (Service::*)(grpc::ServerContext*, Request*,
                                      grpc::ServerAsyncResponseWriter<Response>*,
                                      grpc::CompletionQueue*, grpc::ServerCompletionQueue*, void*);
  // Decides the answer: calls Reply on `call`, now or later.
  using Handler = std::function<void(UnaryCall* call)>;

  // Awaits the next call of `method` on `cq`, unless `calls` is stopping.
  static void Await(Service* service, RequestFn method, grpc::ServerCompletionQueue* cq,
                    CallTracker* calls, Handler handler) {
    if (!calls->Begin()) return;
    new UnaryCall(service, method, cq, calls, std::move(handler));
  }

  grpc::ServerContext* context() { return &context_; }
  Request* request() { return &request_; }
  Response* response() { return &response_; }
  // Answers the call with the response (when `status` is OK); the call then ends.
  void Reply(const grpc::Status& status) {
    if (status.ok()) {
      writer_.Finish(response_, status, &finish_tag_);
    } else {
      writer_.FinishWithError(status, &finish_tag_);
    }
  }

 private:
  UnaryCall(Service* service, RequestFn method, grpc::ServerCompletionQueue* cq, CallTracker* calls,
            Handler handler)
      : service_(service),
        method_(method),
        cq_(cq),
        calls_(calls),
        handler_(std::move(handler)),
        writer_(&context_) {
    (service->*method)(&context_, &request_, &writer_, cq, cq, &call_tag_);
  }

  void OnCall(bool ok) {
    if (!ok) {  // the server is shutting down: no call came
      End();
      return;
    }
    Await(service_, method_, cq_, calls_, handler_);
    handler_(this);
  }

  void OnFinished(bool) { End(); }

  void End() {
    CallTracker* calls = calls_;
    delete this;
    calls->End();
  }

  Service* const service_;
  const RequestFn method_;
  grpc::ServerCompletionQueue* const cq_;
  CallTracker* const calls_;
  const Handler handler_;
  grpc::ServerContext context_;
  Request request_;
  Response response_;
  grpc::ServerAsyncResponseWriter<Response> writer_;
  CqTag<UnaryCall, &UnaryCall::OnCall> call_tag_{this};
  CqTag<UnaryCall, &UnaryCall::OnFinished> finish_tag_{this};
};

}  // namespace taskmaster
