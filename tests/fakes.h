#pragma once

// Fakes of the broker's collaborators, shared by the unit tests.

#include <algorithm>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "master/core/broker.h"
#include "master/core/task.h"

namespace taskmaster::testing {

// A client of the default tenant.
inline const Caller kClient;

// Records what the broker sends one worker.
class FakeChannel final : public WorkerChannel {
 public:
  void Send(WorkerOutbound m) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (m.welcome) welcome = *m.welcome;
    if (!m.tasks.empty()) ++task_messages;
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
  int task_messages = 0;  // sends that carried tasks
  std::vector<TaskId> cancels;
  std::vector<TaskRef> acked;
  bool shutting_down = false;
};

class CountingWatcher final : public JobWatcher {
 public:
  void OnJobChanged() override { ++calls; }
  int calls = 0;
};

// Lets `ms` pass as a running master does: ticking every 100 ms (a longer silence between ticks
// would look like a paused master).
inline void PassTime(FakeClock& clock, Broker& broker, int64_t ms) {
  for (int64_t passed = 0; passed < ms; passed += 100) {
    clock.Advance(std::min<int64_t>(100, ms - passed));
    broker.Tick();
  }
}

inline TaskSpec Spec(std::string kind, std::string payload, int32_t priority = 0) {
  TaskSpec s;
  s.kind = std::move(kind);
  s.payload = std::move(payload);
  s.priority = priority;
  return s;
}

}  // namespace taskmaster::testing
