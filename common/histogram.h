// Counts of observations in fixed buckets, for metrics: a Prometheus histogram without
// Prometheus' types or locks, so that the broker core and the stores keep one under the mutex
// they already hold (an observation costs a short search and two additions).
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

namespace taskmaster {

class Histogram {
 public:
  // `bounds`: the buckets' upper bounds, ascending; one more bucket takes what lies above.
  explicit Histogram(std::span<const double> bounds)
      : bounds_(bounds.begin(), bounds.end()), counts_(bounds.size() + 1, 0) {}

  void Observe(double value) {
    const auto at = std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin();
    ++counts_[static_cast<size_t>(at)];
    sum_ += value;
    ++count_;
  }

  // Adds `other`'s observations; its bounds must be these.
  void Merge(const Histogram& other) {
    for (size_t i = 0; i < counts_.size() && i < other.counts_.size(); ++i) {
      counts_[i] += other.counts_[i];
    }
    sum_ += other.sum_;
    count_ += other.count_;
  }

  const std::vector<double>& bounds() const { return bounds_; }
  // Per bucket, not cumulative: counts()[i] lies in (bounds()[i-1], bounds()[i]].
  const std::vector<uint64_t>& counts() const { return counts_; }
  double sum() const { return sum_; }
  uint64_t count() const { return count_; }

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;
  double sum_ = 0;
  uint64_t count_ = 0;
};

// The value below which a fraction `q` of the observations counted in `counts` (as
// Histogram::counts, over `bounds`) lie, interpolated within its bucket as Prometheus'
// histogram_quantile does; the top bucket answers its lower bound. -1 with no observations.
inline double Quantile(const std::vector<double>& bounds, const std::vector<uint64_t>& counts,
                       double q) {
  uint64_t total = 0;
  for (uint64_t c : counts) total += c;
  if (total == 0) return -1;
  const double rank = q * static_cast<double>(total);
  uint64_t below = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (static_cast<double>(below + counts[i]) >= rank && counts[i] > 0) {
      if (i == bounds.size()) return bounds.empty() ? 0 : bounds.back();
      const double lower = i == 0 ? 0 : bounds[i - 1];
      return lower + (bounds[i] - lower) * (rank - static_cast<double>(below)) /
                         static_cast<double>(counts[i]);
    }
    below += counts[i];
  }
  return bounds.empty() ? 0 : bounds.back();
}

// Seconds, from 1 ms (the broker's clock ticks in milliseconds) to an hour: task waits and run
// times.
inline constexpr double kTaskSecondsBuckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                 0.25,  0.5,    1,     2.5,  5,     10,   30,
                                                 60,    120,    300,   600,  1800,  3600};
// Seconds, from 50 µs to 5 s: store commits.
inline constexpr double kCommitSecondsBuckets[] = {0.00005, 0.0001, 0.00025, 0.0005, 0.001,
                                                   0.0025,  0.005,  0.01,    0.025,  0.05,
                                                   0.1,     0.25,   0.5,     1,      5};
// Rows per store commit.
inline constexpr double kBatchSizeBuckets[] = {1,   2,    5,    10,   25,    50,    100,   250,
                                               500, 1000, 2500, 5000, 10000, 25000, 100000};

}  // namespace taskmaster
