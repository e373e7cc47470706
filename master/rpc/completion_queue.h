// The master's completion queues, each served by a thread of our own. gRPC's callback API runs its
// reactions on two threads that poll in turn and wake each other for every event (measured: four
// to five context switches and ~40 µs of CPU per ping-pong on a 2-core host); one thread that
// polls its own queue and runs each completion where it lands costs one switch and ~13 µs.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"

namespace taskmaster {

// What an operation started on the queue reports when it completes (`ok`: as gRPC says).
class CqEvent {
 public:
  virtual void Complete(bool ok) = 0;

 protected:
  ~CqEvent() = default;
};

// A tag that completes into a member function of its owner: a stream keeps one per kind of
// operation it has in flight, so no completion allocates.
template <typename Owner, void (Owner::*kOnComplete)(bool)>
class CqTag final : public CqEvent {
 public:
  explicit CqTag(Owner* owner) : owner_(owner) {}
  void Complete(bool ok) override { (owner_->*kOnComplete)(ok); }

 private:
  Owner* const owner_;
};

// One server completion queue and the thread that serves it. Take the queue from the builder
// before the server starts; Start once the server runs; Stop after the server has shut down and
// every call on the queue has ended.
class CompletionQueueThread {
 public:
  explicit CompletionQueueThread(std::unique_ptr<grpc::ServerCompletionQueue> cq)
      : cq_(std::move(cq)) {}
  ~CompletionQueueThread() { Stop(); }

  grpc::ServerCompletionQueue* cq() const { return cq_.get(); }
  void Start();
  // Shuts the queue down and waits for the thread to drain it. Idempotent.
  void Stop();

 private:
  const std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::thread thread_;
  std::atomic<bool> stopped_{false};
};

// The calls of a service on the queue, those awaiting a peer included, so that the queue stops
// only once the last has ended: an operation started on a queue that is shut down aborts the
// process. Thread-safe.
class CallTracker {
 public:
  // `what`: the calls, as a log line names them ("worker streams").
  explicit CallTracker(std::string what) : what_(std::move(what)) {}

  // A call begins awaiting a peer; false once stopping (start no more).
  bool Begin();
  void End();
  // Refuses new calls and waits for those alive to end, logging every 10 s how many remain.
  void StopAndWait();

 private:
  const std::string what_;
  absl::Mutex mu_;
  int64_t calls_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace taskmaster
