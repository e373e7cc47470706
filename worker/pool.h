// The worker's pool: threads that take tasks from the slots, run their handlers and hand the
// results back.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

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

// Thread-compatible: Start once, then Join once, after Slots::Stop.
class Pool {
 public:
  // `slots`, `registry` and `metrics` must outlive the pool. With `write_now`, a thread that
  // finishes a task while nobody writes to the stream writes its result itself.
  Pool(Slots* slots, const Registry* registry, RunMetrics* metrics, RunOptions options,
       std::shared_ptr<spdlog::logger> log, WriteNow write_now = nullptr)
      : slots_(slots),
        registry_(registry),
        metrics_(metrics),
        options_(std::move(options)),
        log_(std::move(log)),
        write_now_(std::move(write_now)) {}

  void Start(int threads);
  void Join();

 private:
  void Loop();

  Slots* const slots_;
  const Registry* const registry_;
  RunMetrics* const metrics_;
  const RunOptions options_;
  const std::shared_ptr<spdlog::logger> log_;
  const WriteNow write_now_;
  std::vector<std::thread> threads_;
};

}  // namespace taskmaster::worker
