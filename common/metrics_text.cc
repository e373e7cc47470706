#include "common/metrics_text.h"

#include <sys/resource.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>

#include "prometheus/metric_family.h"
#include "prometheus/text_serializer.h"

namespace taskmaster {

struct MetricsText::Families {
  std::vector<prometheus::MetricFamily> list;
  std::map<std::string, size_t> by_name;  // index into list

  prometheus::ClientMetric& Add(const std::string& name, const std::string& help,
                                prometheus::MetricType type, MetricLabels labels) {
    auto [it, added] = by_name.emplace(name, list.size());
    if (added) list.push_back({name, help, type, {}});
    prometheus::ClientMetric& metric = list[it->second].metric.emplace_back();
    for (auto& [label, value] : labels) metric.label.push_back({label, std::move(value)});
    return metric;
  }
};

MetricsText::MetricsText() : families_(std::make_unique<Families>()) {}
MetricsText::~MetricsText() = default;

void MetricsText::Counter(const std::string& name, const std::string& help, MetricLabels labels,
                          double value) {
  families_->Add(name, help, prometheus::MetricType::Counter, std::move(labels)).counter.value =
      value;
}

void MetricsText::Gauge(const std::string& name, const std::string& help, MetricLabels labels,
                        double value) {
  families_->Add(name, help, prometheus::MetricType::Gauge, std::move(labels)).gauge.value = value;
}

void MetricsText::Histogram(const std::string& name, const std::string& help, MetricLabels labels,
                            const taskmaster::Histogram& histogram) {
  prometheus::ClientMetric::Histogram& h =
      families_->Add(name, help, prometheus::MetricType::Histogram, std::move(labels)).histogram;
  h.sample_count = histogram.count();
  h.sample_sum = histogram.sum();
  uint64_t cumulative = 0;
  for (size_t i = 0; i < histogram.counts().size(); ++i) {
    cumulative += histogram.counts()[i];
    const double bound = i < histogram.bounds().size() ? histogram.bounds()[i]
                                                       : std::numeric_limits<double>::infinity();
    h.bucket.push_back({cumulative, bound});
  }
}

std::string MetricsText::Render() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, families_->list);
  return out.str();
}

void AddProcessMetrics(MetricsText& out) {
  // /proc/self/stat: the command (in parentheses, and it may hold spaces) then fields 3 onwards.
  std::ifstream stat_file("/proc/self/stat");
  std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
  const size_t close = stat.rfind(')');
  if (close == std::string::npos) return;
  std::istringstream fields(stat.substr(close + 2));
  std::vector<std::string> f;
  for (std::string field; fields >> field;) f.push_back(field);
  if (f.size() < 22) return;  // f[0] is field 3 (state)
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
  const double cpu = (std::stod(f[11]) + std::stod(f[12])) / ticks;  // utime + stime
  out.Counter("process_cpu_seconds_total", "User and system CPU time spent, in seconds.", {}, cpu);
  out.Gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", {}, std::stod(f[20]));
  out.Gauge("process_resident_memory_bytes", "Resident memory size in bytes.", {},
            std::stod(f[21]) * page);
  std::ifstream proc_stat("/proc/stat");
  for (std::string key; proc_stat >> key;) {
    if (key == "btime") {
      double boot = 0;
      proc_stat >> boot;
      out.Gauge("process_start_time_seconds", "Start time of the process since the Unix epoch.", {},
                boot + std::stod(f[19]) / ticks);
      break;
    }
  }
  std::error_code error;
  double fds = 0;
  for (auto it = std::filesystem::directory_iterator("/proc/self/fd", error);
       !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
    ++fds;
  }
  out.Gauge("process_open_fds", "Open file descriptors.", {}, fds);
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
    out.Gauge("process_max_fds", "The limit of open file descriptors.", {},
              static_cast<double>(limit.rlim_cur));
  }
}

}  // namespace taskmaster
