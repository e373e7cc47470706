// The master's completion queue threads and call tracking (see completion_queue.h).
#include "master/rpc/completion_queue.h"

#include "absl/time/time.h"
#include "common/logging.h"

namespace taskmaster {
namespace {

// Completes every tag of `cq` until it is shut down and every tag on it has come back.
void Serve(grpc::ServerCompletionQueue* cq) {
  void* tag = nullptr;
  bool ok = false;
  while (cq->Next(&tag, &ok)) static_cast<CqEvent*>(tag)->Complete(ok);
}

}  // namespace

void CompletionQueueThread::Start() {
  thread_ = std::thread([cq = cq_.get()] { Serve(cq); });
}

void CompletionQueueThread::Stop() {
  if (stopped_.exchange(true)) return;
  cq_->Shutdown();
  if (thread_.joinable()) {
    thread_.join();
  } else {
    Serve(cq_.get());  // never started: drained here, as gRPC requires before the queue goes
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

void CallTracker::StopAndWait() {
  absl::MutexLock lock(&mu_);
  stopping_ = true;
  auto ended = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return calls_ == 0; };
  // Unbounded: a call still alive may yet start an operation on the queue (a reply from a slow
  // commit), which aborts the process once the queue is shut down. A stuck stop is told.
  while (!mu_.AwaitWithTimeout(absl::Condition(&ended), absl::Seconds(10))) {
    GetLogger("master")->warn("stopping: {} {} have not ended yet", calls_, what_);
  }
}

}  // namespace taskmaster
