#include "worker/run_metrics.h"

namespace taskmaster::worker {
namespace {
constexpr char kOtherKinds[] = "(other)";
}  // namespace

RunMetrics::RunMetrics(const std::vector<std::string>& kinds) {
  absl::MutexLock lock(&mu_);
  for (const std::string& kind : kinds) kinds_.try_emplace(kind);
  kinds_.try_emplace(kOtherKinds);
}

void RunMetrics::Ended(const std::string& kind, Outcome outcome,
                       std::chrono::steady_clock::duration took) {
  busy_.fetch_sub(1, std::memory_order_relaxed);
  if (outcome == Outcome::kReturned) return;  // never ran
  absl::MutexLock lock(&mu_);
  auto it = kinds_.find(kind);
  if (it == kinds_.end()) it = kinds_.find(kOtherKinds);
  it->second.outcomes[static_cast<size_t>(outcome)]++;
  it->second.run_seconds.Observe(std::chrono::duration<double>(took).count());
}

std::map<std::string, RunMetrics::Kind> RunMetrics::Kinds() const {
  absl::MutexLock lock(&mu_);
  return kinds_;
}

}  // namespace taskmaster::worker
