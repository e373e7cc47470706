// The worker service (see worker_stream.h).
#include "master/rpc/worker_stream.h"

#include <atomic>
#include <utility>

#include "common/grpc_util.h"
#include "master/rpc/reactor_ref.h"
#include "master/rpc/translate.h"
#include "master/rpc/worker_outbox.h"

namespace taskmaster {

// One worker's stream, from waiting for its call to its end. Its completions run on the queue's
// thread, one at a time; what the broker sends comes from any thread, through the WorkerOutbox
// under mu_, and the write or finish it decides is started after mu_ is released. It deletes
// itself once every operation it started has completed.
class WorkerStream {
 public:
  WorkerStream(WorkerServiceImpl* service, grpc::ServerCompletionQueue* cq)
      : service_(service),
        cq_(cq),
        log_(service->log_),
        stream_(&context_),
        channel_(std::make_shared<Channel>(this)),
        outbox_(service->max_buffered_bytes_, service->stall_) {
    // Delivered only if a call arrives (counted then, in OnCall).
    context_.AsyncNotifyWhenDone(&done_tag_);
    {
      absl::MutexLock lock(&mu_);
      ops_ = 1;
    }
    service->RequestConnect(&context_, &stream_, cq, cq, &call_tag_);
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

  void OnCall(bool ok) {
    if (ok) {
      {
        absl::MutexLock lock(&mu_);
        ++ops_;  // the done tag
      }
      service_->AwaitCall(cq_);
      peer_ = context_.peer();
      const grpc::Status auth = service_->auth_->Check(&context_, Role::kWork, "Connect");
      if (auth.ok()) {
        StartRead();
      } else {
        log_->warn("refused a worker stream from {}: {}", peer_, auth.error_message());
        End(auth);
      }
    }  // else the server is shutting down: no call came
    Completed();
  }

  void OnReadDone(bool ok) {
    Read(ok);
    Completed();
  }

  void Read(bool ok) {
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
      // The stream serves one partition, with the broker that serves it here for its life.
      absl::StatusOr<std::shared_ptr<Broker>> broker =
          service_->brokers_->ForPartition(in_.hello().partition());
      if (!broker.ok()) {
        End(ToGrpcStatus(broker.status(), &context_));
        return;
      }
      broker_ = std::move(*broker);
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
    StartRead();
  }

  void OnWriteDone(bool ok) {
    StreamStep step;
    {
      absl::MutexLock lock(&mu_);
      step = outbox_.WriteDone(ok);
      channel_->backlog.store(outbox_.buffered_bytes(), std::memory_order_relaxed);
      CountLocked(step);
    }
    Take(step);
    Completed();
  }

  void OnFinishDone(bool) { Completed(); }
  void OnDone(bool) { Completed(); }

  void StartRead() {
    {
      absl::MutexLock lock(&mu_);
      ++ops_;
    }
    stream_.Read(&in_, &read_tag_);
  }

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
      CountLocked(step);
    }
    if (step.cut_off) {
      log_->warn("cut off worker stream from {}: {} bytes wait for it to read", peer_, buffered);
      context_.TryCancel();
    }
    Take(step);
  }

  void End(const grpc::Status& status) {
    StreamStep step;
    {
      absl::MutexLock lock(&mu_);
      step = outbox_.Finish(status);
      CountLocked(step);
    }
    Take(step);
  }

  // The operations `step` starts, counted under the same lock that decided them.
  void CountLocked(const StreamStep& step) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ops_ += (step.write ? 1 : 0) + (step.finish ? 1 : 0);
  }

  // The outbox decided it under mu_, so no two writes or finishes overlap.
  void Take(const StreamStep& step) {
    if (step.write) stream_.Write(*step.write, &write_tag_);
    if (step.finish) stream_.Finish(*step.finish, &finish_tag_);
  }

  // An operation completed; the last one deletes the stream.
  void Completed() {
    {
      absl::MutexLock lock(&mu_);
      if (--ops_ > 0) return;
    }
    // No broker call starts after this; one in progress may have started a write meanwhile,
    // whose completion comes back here.
    channel_->ref.Detach();
    {
      absl::MutexLock lock(&mu_);
      if (ops_ > 0) return;
    }
    CallTracker* calls = &service_->calls_;
    delete this;
    calls->End();
  }

  WorkerServiceImpl* const service_;
  grpc::ServerCompletionQueue* const cq_;  // where it and the next call are awaited
  const std::shared_ptr<spdlog::logger> log_;
  grpc::ServerContext context_;
  grpc::ServerAsyncReaderWriter<v1::MasterMessage, v1::WorkerMessage> stream_;
  const std::shared_ptr<Channel> channel_;
  CqTag<WorkerStream, &WorkerStream::OnCall> call_tag_{this};
  CqTag<WorkerStream, &WorkerStream::OnReadDone> read_tag_{this};
  CqTag<WorkerStream, &WorkerStream::OnWriteDone> write_tag_{this};
  CqTag<WorkerStream, &WorkerStream::OnFinishDone> finish_tag_{this};
  CqTag<WorkerStream, &WorkerStream::OnDone> done_tag_{this};

  // Used only by the completions of the call and of reads, which come one at a time.
  std::string peer_;
  v1::WorkerMessage in_;
  std::shared_ptr<Broker> broker_;  // once the hello named its partition
  Broker::WorkerHandle handle_;
  bool attached_ = false;
  bool bye_ = false;

  absl::Mutex mu_;
  WorkerOutbox outbox_ ABSL_GUARDED_BY(mu_);
  int ops_ ABSL_GUARDED_BY(mu_) = 0;  // started and not completed
};

void WorkerServiceImpl::Start(CompletionQueueThread* queue) { AwaitCall(queue->cq()); }

void WorkerServiceImpl::AwaitCall(grpc::ServerCompletionQueue* cq) {
  if (calls_.Begin()) new WorkerStream(this, cq);
}

void WorkerServiceImpl::Stop() { calls_.StopAndWait(); }

}  // namespace taskmaster
