// Metrics in the Prometheus text format, built from values read at scrape time: the master and
// the worker keep plain counters and Histograms under their own locks, and turn them into
// families here only when scraped (through prometheus-cpp's types and serializer).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/histogram.h"

namespace prometheus {
struct MetricFamily;
}

namespace taskmaster {

using MetricLabels = std::vector<std::pair<std::string, std::string>>;

class MetricsText {
 public:
  MetricsText();
  ~MetricsText();
  MetricsText(const MetricsText&) = delete;
  MetricsText& operator=(const MetricsText&) = delete;

  // A sample of the family `name` (its help and type given by its first sample). Label values
  // may be anything: the serializer escapes them.
  void Counter(const std::string& name, const std::string& help, MetricLabels labels, double value);
  void Gauge(const std::string& name, const std::string& help, MetricLabels labels, double value);
  void Histogram(const std::string& name, const std::string& help, MetricLabels labels,
                 const taskmaster::Histogram& histogram);

  // Families in the order of their first sample.
  std::string Render() const;

 private:
  struct Families;
  std::unique_ptr<Families> families_;
};

// The process's own, under the names Prometheus' client libraries use (process_cpu_seconds_total,
// process_resident_memory_bytes, process_open_fds ...), read from /proc.
void AddProcessMetrics(MetricsText& out);

// The content type of Render()'s text, for the HTTP reply.
inline constexpr char kMetricsContentType[] = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace taskmaster
