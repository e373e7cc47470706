// A handle on a gRPC reactor for callers outside gRPC (the broker telling a worker stream to send,
// or a job stream that its job changed), who may call after the reactor is done. No lock is held
// while the call runs: the stream, before it deletes itself, detaches and waits for calls in
// progress.
#pragma once

#include <cstddef>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace taskmaster {

template <typename Reactor>
class ReactorRef {
 public:
  explicit ReactorRef(Reactor* reactor) : reactor_(reactor) {}

  // Runs fn(reactor) unless the reactor has detached.
  template <typename Fn>
  void Call(Fn&& fn) {
    Reactor* reactor;
    {
      absl::MutexLock lock(&mu_);
      reactor = reactor_;
      if (!reactor) return;
      ++calls_;
    }
    fn(*reactor);
    absl::MutexLock lock(&mu_);
    --calls_;
  }

  // Before the stream goes: no call starts afterwards, and those in progress have returned.
  void Detach() {
    absl::MutexLock lock(&mu_);
    reactor_ = nullptr;
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return calls_ == 0; };
    mu_.Await(absl::Condition(&idle));
  }

 private:
  absl::Mutex mu_;
  Reactor* reactor_ ABSL_GUARDED_BY(mu_);
  size_t calls_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace taskmaster
