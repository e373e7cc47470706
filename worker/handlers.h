// What a handler is and sees (Handler, TaskContext), the registry of kinds a worker runs, and the
// built-in kinds.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace taskmaster {

// How far a running task has come, as its handler reports it.
struct Progress {
  int64_t done = 0;
  int64_t total = 0;  // 0: unknown
  std::string message;
};
using ProgressSink = std::function<void(Progress)>;

// What a handler sees of the task it runs. Thread-compatible: one handler call uses it.
class TaskContext {
 public:
  TaskContext(uint64_t task_id, int32_t attempt, std::string_view payload,
              std::chrono::steady_clock::time_point deadline,
              std::shared_ptr<const std::atomic<bool>> cancelled, ProgressSink progress = nullptr)
      : task_id_(task_id),
        attempt_(attempt),
        payload_(payload),
        deadline_(deadline),
        cancelled_(std::move(cancelled)),
        progress_(std::move(progress)) {}

  uint64_t task_id() const { return task_id_; }
  int32_t attempt() const { return attempt_; }
  std::string_view payload() const { return payload_; }
  std::chrono::steady_clock::time_point deadline() const { return deadline_; }

  // True once the task was cancelled or its timeout passed: a handler should stop soon.
  bool ShouldStop() const;
  // Sleeps up to `d`, waking early when the handler should stop; returns !ShouldStop().
  bool SleepFor(std::chrono::milliseconds d) const;
  // Cheap to call often: the worker keeps the latest report and sends it rate-limited.
  void ReportProgress(int64_t done, int64_t total, std::string_view message = {}) const {
    if (progress_) progress_({done, total, std::string(message)});
  }

 private:
  uint64_t task_id_;
  int32_t attempt_;
  std::string_view payload_;
  std::chrono::steady_clock::time_point deadline_;
  std::shared_ptr<const std::atomic<bool>> cancelled_;
  ProgressSink progress_;
};

// A handler returns the task's output, or an error that fails this attempt. An
// INVALID_ARGUMENT error (a malformed payload) is permanent: the task is DEAD without retries.
using Handler = std::function<absl::StatusOr<std::string>(const TaskContext&)>;

// Kinds a worker runs, by name. Filled before the worker starts, read-only afterwards.
class Registry {
 public:
  // Fails when `kind` is not a valid name or is registered already.
  absl::Status Register(const std::string& kind, Handler handler);
  const Handler* Find(const std::string& kind) const;
  std::vector<std::string> Kinds() const;

 private:
  std::map<std::string, Handler> handlers_;
};

// The built-in kinds:
//   square  payload a decimal integer n, output "n*n=r" (the seed's workload)
//   echo    output = payload
//   sleep   sleeps payload milliseconds (stops early when cancelled), output "slept N ms"
//   fail    always fails with the payload as its error
absl::Status RegisterBuiltins(Registry& registry);

}  // namespace taskmaster
