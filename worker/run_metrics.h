// What a pool ran, for the worker's /metrics: tasks by kind and outcome, their run times, the
// slots busy now. Plain counters under one mutex, read only when scraped.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "common/histogram.h"
#include "worker/messages.h"

namespace taskmaster::worker {

class RunMetrics {
 public:
  struct Kind {
    std::array<int64_t, 3> outcomes{};  // by Outcome: succeeded, failed, cancelled
    Histogram run_seconds{kTaskSecondsBuckets};
  };

  // `kinds`: those the pool runs; a task of any other kind (the master sent what this worker
  // does not run) counts under "(other)", so the labels stay the pool's own.
  explicit RunMetrics(const std::vector<std::string>& kinds);

  // A task started or ended on a pool thread.
  void Started() { busy_.fetch_add(1, std::memory_order_relaxed); }
  void Ended(const std::string& kind, Outcome outcome, std::chrono::steady_clock::duration took);

  std::map<std::string, Kind> Kinds() const;
  int busy() const { return busy_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int> busy_{0};
  mutable absl::Mutex mu_;
  std::map<std::string, Kind> kinds_ ABSL_GUARDED_BY(mu_);  // fixed keys, set at construction
};

}  // namespace taskmaster::worker
