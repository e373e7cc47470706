#pragma once

// Fakes of the broker's collaborators, shared by the unit tests.

#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "master/task.h"

namespace taskmaster::testing {

// Records what the broker sends one worker.
class FakeChannel final : public WorkerChannel {
 public:
  void Send(WorkerOutbound m) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (m.welcome) welcome = *m.welcome;
    for (auto& t : m.tasks) tasks.push_back(std::move(t));
    for (TaskId id : m.cancel) cancels.push_back(id);
    for (auto& a : m.acked) acked.push_back(a);
    shutting_down |= m.shutting_down;
  }
  // Tasks received since the last call.
  std::vector<LeasedTask> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(tasks, {});
  }

  std::mutex mu_;
  std::optional<Welcome> welcome;
  std::vector<LeasedTask> tasks;
  std::vector<TaskId> cancels;
  std::vector<TaskRef> acked;
  bool shutting_down = false;
};

class CountingWatcher final : public JobWatcher {
 public:
  void OnJobChanged() override { ++calls; }
  int calls = 0;
};

inline TaskSpec Spec(std::string kind, std::string payload, int32_t priority = 0) {
  TaskSpec s;
  s.kind = std::move(kind);
  s.payload = std::move(payload);
  s.priority = priority;
  return s;
}

}  // namespace taskmaster::testing
