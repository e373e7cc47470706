// The worker's pool: threads that take tasks from the slots, run their handlers and hand the
// results back.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "spdlog/logger.h"
#include "worker/handlers.h"
#include "worker/messages.h"
#include "worker/run_metrics.h"
#include "worker/slots.h"

namespace taskmaster::worker {

// What a pool knows of its worker when it turns a handler's return into a result.
struct RunOptions {
  std::string worker_name;  // named in the failure of a kind the worker does not run
  size_t max_output = 0;    // largest output one result message can carry
};

// Runs `task`'s handler from `registry` and says how it went: its output, or why it failed, was
// cancelled or timed out. Handler exceptions are failures. Blocks for as long as the handler runs.
Result RunTask(const Registry& registry, const RunOptions& options, const Task& task,
               const std::shared_ptr<const std::atomic<bool>>& cancelled,
               ProgressSink progress = nullptr);

// Writes a message Slots::Finish gave the pool thread to the master's stream, then calls
// Slots::Sent.
using WriteNow = std::function<void(ToMaster)>;

// The slots a pool's threads take tasks from: one per partition of the queues, each with its own
// stream. A free thread runs whichever task is queued first. Thread-safe.
class Feed {
 public:
  // `slots` (whose on_ready must call Notify) must outlive the feed. With `write_now`, a thread
  // that finishes a task while nobody writes to the stream writes its result itself.
  struct Source {
    Slots* slots;
    WriteNow write_now;
  };
  void Add(Source source);
  // A slots queued tasks or stopped.
  void Notify();
  struct Next {
    Assignment assignment;
    const Source* source;
  };
  // Blocks until a task is queued in some slots, and marks it running; nullopt once every slots
  // stopped.
  std::optional<Next> Wait();

 private:
  absl::Mutex mu_;
  std::deque<Source> sources_ ABSL_GUARDED_BY(mu_);  // a deque: Next points into it
  uint64_t signals_ ABSL_GUARDED_BY(mu_) = 0;        // Notify calls so far
  size_t next_ ABSL_GUARDED_BY(mu_) = 0;             // where the next look starts, in turn
};

// Thread-compatible: Start once, then Join once, after every Slots::Stop.
class Pool {
 public:
  // `feed`, `registry` and `metrics` must outlive the pool.
  Pool(Feed* feed, const Registry* registry, RunMetrics* metrics, RunOptions options,
       std::shared_ptr<spdlog::logger> log)
      : feed_(feed),
        registry_(registry),
        metrics_(metrics),
        options_(std::move(options)),
        log_(std::move(log)) {}

  void Start(int threads);
  void Join();

 private:
  void Loop();

  Feed* const feed_;
  const Registry* const registry_;
  RunMetrics* const metrics_;
  const RunOptions options_;
  const std::shared_ptr<spdlog::logger> log_;
  std::vector<std::thread> threads_;
};

}  // namespace taskmaster::worker
