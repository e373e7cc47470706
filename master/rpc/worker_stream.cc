// The worker service (see worker_stream.h).
#include "master/rpc/worker_stream.h"

#include <atomic>
#include <utility>

#include "common/grpc_util.h"
#include "master/rpc/reactor_ref.h"
#include "master/rpc/translate.h"
#include "master/rpc/worker_outbox.h"

namespace taskmaster {
namespace {

// One worker's stream. Reads are handled one at a time; what the broker sends goes through the
// WorkerOutbox, under mu_, and the write or finish it decides is made after mu_ is released.
class WorkerStream final : public grpc::ServerBidiReactor<v1::WorkerMessage, v1::MasterMessage> {
 public:
  WorkerStream(Broker* broker, std::shared_ptr<spdlog::logger> log, const grpc::Status& auth,
               grpc::CallbackServerContext* context, size_t max_buffered_bytes,
               std::chrono::milliseconds stall)
      : broker_(broker),
        log_(std::move(log)),
        context_(context),
        peer_(context->peer()),
        channel_(std::make_shared<Channel>(this)),
        outbox_(max_buffered_bytes, stall) {
    if (!auth.ok()) {
      log_->warn("refused a worker stream from {}: {}", peer_, auth.error_message());
      End(auth);
      return;
    }
    StartRead(&in_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // The worker closed its side, the connection broke, or a message could not be parsed:
      // gRPC does not say which. A stream that ends before its hello was read is refused.
      if (attached_) broker_->Detach(handle_, bye_);
      End(attached_ ? grpc::Status::OK
                    : grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                   "the stream ended before a hello could be read (a hello with "
                                   "a text field that is not UTF-8 cannot be parsed)"));
      return;
    }
    if (!attached_) {
      if (!in_.has_hello()) {
        End(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                         "the first message of a worker stream must carry a hello"));
        return;
      }
      absl::StatusOr<Broker::WorkerHandle> handle =
          broker_->Attach(FromProto(*in_.mutable_hello()), channel_);
      if (!handle.ok()) {
        log_->warn("refused a worker stream from {}: {}", peer_, handle.status().ToString());
        End(ToGrpcStatus(handle.status()));
        return;
      }
      handle_ = *handle;
      attached_ = true;
    }
    Handle(in_);
    StartRead(&in_);
  }

  void OnWriteDone(bool ok) override {
    StreamStep step;
    {
      absl::MutexLock lock(&mu_);
      step = outbox_.WriteDone(ok);
      channel_->backlog.store(outbox_.buffered_bytes(), std::memory_order_relaxed);
    }
    Take(step);
  }

  void OnDone() override {
    channel_->ref.Detach();
    delete this;
  }

 private:
  // The broker's handle on this stream; it outlives the stream.
  struct Channel final : WorkerChannel {
    explicit Channel(WorkerStream* s) : ref(s) {}
    void Send(WorkerOutbound message) override {
      ref.Call([&](WorkerStream& stream) { stream.Enqueue(std::move(message)); });
    }
    size_t Backlog() const override { return backlog.load(std::memory_order_relaxed); }
    ReactorRef<WorkerStream> ref;
    std::atomic<size_t> backlog{0};  // the outbox's buffered bytes, as of its latest change
  };

  void Handle(v1::WorkerMessage& m) {
    if (const int64_t echo_at = ApplyWorkerMessage(*broker_, handle_, m); echo_at > 0) {
      WorkerOutbound echo;
      echo.heartbeat_echo = echo_at;
      Enqueue(std::move(echo));
    }
    if (m.bye()) bye_ = true;
  }

  void Enqueue(WorkerOutbound message) {
    StreamStep step;
    size_t buffered;
    {
      absl::MutexLock lock(&mu_);
      step = outbox_.Add(std::move(message));
      buffered = outbox_.buffered_bytes();
      channel_->backlog.store(buffered, std::memory_order_relaxed);
    }
    if (step.cut_off) {
      log_->warn("cut off worker stream from {}: {} bytes wait for it to read", peer_, buffered);
      context_->TryCancel();
    }
    Take(step);
  }

  void End(const grpc::Status& status) {
    StreamStep step;
    {
      absl::MutexLock lock(&mu_);
      step = outbox_.Finish(status);
    }
    Take(step);
  }

  // The outbox decided it under mu_, so no two writes or finishes overlap.
  void Take(const StreamStep& step) {
    if (step.write) StartWrite(step.write);
    if (step.finish) Finish(*step.finish);
  }

  Broker* const broker_;
  const std::shared_ptr<spdlog::logger> log_;
  grpc::CallbackServerContext* const context_;  // the call's, valid until OnDone
  const std::string peer_;
  const std::shared_ptr<Channel> channel_;

  // Used only by the reactions on the read side, which gRPC runs one at a time.
  v1::WorkerMessage in_;
  Broker::WorkerHandle handle_;
  bool attached_ = false;
  bool bye_ = false;

  absl::Mutex mu_;
  WorkerOutbox outbox_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

grpc::ServerBidiReactor<v1::WorkerMessage, v1::MasterMessage>* WorkerServiceImpl::Connect(
    grpc::CallbackServerContext* context) {
  return new WorkerStream(broker_, log_, auth_->Check(context, Role::kWork, "Connect"), context,
                          max_buffered_bytes_, stall_);
}

}  // namespace taskmaster
