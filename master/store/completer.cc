// Runs a store's callbacks on a thread of its own (see completer.h).
#include "master/store/completer.h"

namespace taskmaster {

Completer::Completer() : thread_([this] { Loop(); }) {}

Completer::~Completer() { Close(); }

bool Completer::Post(std::vector<Callback>&& callbacks, absl::Status status) {
  absl::MutexLock lock(&mu_);
  if (closed_) return false;
  if (!callbacks.empty()) queue_.emplace_back(std::move(callbacks), std::move(status));
  return true;
}

bool Completer::RunOrPost(std::vector<Callback>&& callbacks, absl::Status status) {
  {
    absl::MutexLock lock(&mu_);
    if (closed_) return false;
    if (running_ || !queue_.empty()) {
      if (!callbacks.empty()) queue_.emplace_back(std::move(callbacks), std::move(status));
      return true;
    }
    running_ = true;
  }
  for (Callback& callback : callbacks) callback(status);
  absl::MutexLock lock(&mu_);
  running_ = false;
  return true;
}

void Completer::Close() {
  {
    absl::MutexLock lock(&mu_);
    closing_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void Completer::Loop() {
  while (true) {
    std::pair<std::vector<Callback>, absl::Status> next;
    {
      absl::MutexLock lock(&mu_);
      // Not while RunOrPost runs callbacks elsewhere: those posted after them wait their turn.
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return !running_ && (closing_ || !queue_.empty());
      };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) {
        closed_ = true;
        return;
      }
      next = std::move(queue_.front());
      queue_.pop_front();
      running_ = true;
    }
    for (Callback& callback : next.first) callback(next.second);
    absl::MutexLock lock(&mu_);
    running_ = false;
  }
}

}  // namespace taskmaster
