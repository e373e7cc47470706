// The master's admin listener: /metrics for Prometheus, /healthz and /readyz for HTTP probes,
// and the status page (/, with its data at /api/status). It reads the broker, the store and the
// authorizer's counts only when asked, and keeps a few minutes of history for the page's charts.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/admin_http.h"
#include "common/auth.h"
#include "master/core/broker_set.h"
#include "master/store/store.h"
#include "spdlog/logger.h"

namespace taskmaster {

enum class MasterState { kRecovering, kServing, kStoreFailing, kStopping };

struct MasterHealth {
  MasterState state = MasterState::kRecovering;
  std::string reason;  // why it does not serve, for a person
};

// What the admin pages read; every function is thread-safe. The brokers and stores are read
// only once the state has left kRecovering.
struct AdminSources {
  const BrokerSet* brokers = nullptr;
  // Of the stores of the partitions served, merged.
  std::function<StoreMetrics()> store_metrics;
  std::function<MasterHealth()> health;
  std::function<AuthFailures()> auth_failures;
  // Whether the master's timers ran lately (see Master::Ticking): /healthz fails without.
  std::function<bool()> ticking;
  std::string listen;           // the gRPC address, for the page
  int64_t silent_after_ms = 0;  // see BrokerOptions::SilentAfterMs
};

struct MasterAdminOptions {
  AdminHttpOptions http;
  // Queues exported as labels of their own, in the order first seen; later ones are summed
  // under "(other)", so that clients cannot grow every scrape without bound.
  size_t max_metric_queues = 100;
  // The page's charts: one sample per interval, this many kept.
  std::chrono::milliseconds history_interval{1000};
  size_t history_samples = 600;
};

class MasterAdmin {
 public:
  static absl::StatusOr<std::unique_ptr<MasterAdmin>> Start(const MasterAdminOptions& options,
                                                            AdminSources sources,
                                                            std::shared_ptr<spdlog::logger> log);
  virtual ~MasterAdmin() = default;

  virtual int port() const = 0;
  // The bodies of /metrics and /api/status.
  virtual std::string Metrics() const = 0;
  virtual std::string StatusJson() const = 0;
};

}  // namespace taskmaster
