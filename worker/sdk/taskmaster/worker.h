// The taskmaster worker SDK: write handlers in C++ and run them in a worker binary of your own
// (RunWorker), or in a plugin that `taskworker --plugin` loads (TASKMASTER_PLUGIN). taskworker
// itself is built on this header. Installed as <taskmaster/worker.h>; link taskmaster::worker.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
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
  // The first Register that failed (OK when none did): a plugin that registers a kind twice is
  // refused even when it ignored what Register returned.
  const absl::Status& refused() const { return refused_; }
  // Registers every kind of `other`, or none when one of them is registered already.
  absl::Status Add(const Registry& other);
  const Handler* Find(const std::string& kind) const;
  std::vector<std::string> Kinds() const;

 private:
  std::map<std::string, Handler> handlers_;
  absl::Status refused_;
};

// Runs a worker process with the kinds of `registry`: taskworker's flags and --config file
// (master, token, queues, pools, exec kinds, plugins...), until SIGTERM or SIGINT, which drain
// it. Returns the process's exit code. See `taskworker --help`.
int RunWorker(int argc, char** argv, Registry registry);

}  // namespace taskmaster

// ---- Plugins ----
// A plugin is a shared object built against this header that registers kinds:
//
//   static void Register(taskmaster::Registry& registry) {
//     registry.Register("reverse", [](const taskmaster::TaskContext& ctx) -> ... );
//   }
//   TASKMASTER_PLUGIN(Register)
//
// The worker refuses, naming the file, a plugin built for another ABI version, one without the
// entry point, and one registering a kind twice.

// Changes whenever this header changes in a way a built plugin cannot follow: the layout of
// TaskContext (its accessors are inline in the plugin), Registry, Handler or TaskmasterPlugin.
#define TASKMASTER_PLUGIN_ABI 1

extern "C" {
struct TaskmasterPlugin {
  uint32_t abi_version;  // TASKMASTER_PLUGIN_ABI of the header the plugin was built with
  void (*register_kinds)(taskmaster::Registry& registry);
};
}

// The plugin's one entry point, looked up by name: taskmaster_plugin.
#define TASKMASTER_PLUGIN(register_function)                                                      \
  extern "C" __attribute__((visibility("default"))) const TaskmasterPlugin* taskmaster_plugin() { \
    static const TaskmasterPlugin plugin{TASKMASTER_PLUGIN_ABI, register_function};               \
    return &plugin;                                                                               \
  }
