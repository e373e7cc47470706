// Runs a store's callbacks on a thread of its own, in the order they were posted, so the writer
// goes on to its next commit while the broker and the services handle the last one's outcome.
#pragma once

#include <deque>
#include <functional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace taskmaster {

class Completer {
 public:
  using Callback = std::function<void(absl::Status)>;

  Completer();
  ~Completer();  // Close()
  Completer(const Completer&) = delete;
  Completer& operator=(const Completer&) = delete;

  // Queues `callbacks` to run with `status`. False once closed: they are left to the caller to run.
  bool Post(std::vector<Callback>&& callbacks, absl::Status status);
  // Runs `callbacks` on the calling thread when nothing posted before waits or runs (the order
  // holds), sparing the hand-off to this thread; else, or once closed, posts them as Post does.
  // False once closed, as Post.
  bool RunOrPost(std::vector<Callback>&& callbacks, absl::Status status);
  // Runs what is queued, and whatever those callbacks post meanwhile, then stops: no callback
  // runs after it returns. Idempotent.
  void Close();

 private:
  void Loop();

  absl::Mutex mu_;
  std::deque<std::pair<std::vector<Callback>, absl::Status>> queue_ ABSL_GUARDED_BY(mu_);
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;   // the thread ended; Post refuses
  bool running_ ABSL_GUARDED_BY(mu_) = false;  // callbacks run (on whichever thread)
  std::thread thread_;
};

}  // namespace taskmaster
