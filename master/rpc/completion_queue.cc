// The hot streams' completion queue thread (see completion_queue.h).
#include "master/rpc/completion_queue.h"

#include <functional>

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

void CallTracker::StopAndWait(absl::Duration report_every,
                              const std::function<void(int64_t)>& report) {
  absl::MutexLock lock(&mu_);
  stopping_ = true;
  auto ended = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return calls_ == 0; };
  // Unbounded: a call still alive may yet start an operation on the queue (a reply from a slow
  // commit), which aborts the process once the queue is shut down. A stuck stop is told.
  while (!mu_.AwaitWithTimeout(absl::Condition(&ended), report_every)) report(calls_);
}

}  // namespace taskmaster
