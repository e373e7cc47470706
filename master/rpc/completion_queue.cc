// The hot streams' completion queue thread (see completion_queue.h).
#include "master/rpc/completion_queue.h"

namespace taskmaster {

void CompletionQueueThread::Start() {
  thread_ = std::thread([cq = cq_.get()] {
    void* tag = nullptr;
    bool ok = false;
    // Ends once the queue is shut down and every tag on it has come back.
    while (cq->Next(&tag, &ok)) static_cast<CqEvent*>(tag)->Complete(ok);
  });
}

void CompletionQueueThread::Stop() {
  if (stopped_.exchange(true)) return;
  cq_->Shutdown();
  if (thread_.joinable()) {
    thread_.join();
  } else {
    // Never started: drain it here, as gRPC requires before the queue goes.
    void* tag = nullptr;
    bool ok = false;
    while (cq_->Next(&tag, &ok)) static_cast<CqEvent*>(tag)->Complete(ok);
  }
}

bool CallTracker::Begin() {
  absl::MutexLock lock(&mu_);
  if (stopping_) return false;
  ++calls_;
  return true;
}

void CallTracker::End() {
  absl::MutexLock lock(&mu_);
  --calls_;
}

int64_t CallTracker::StopAndWait(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  stopping_ = true;
  auto ended = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return calls_ == 0; };
  mu_.AwaitWithTimeout(absl::Condition(&ended), timeout);
  return calls_;
}

}  // namespace taskmaster
