#include "master/admin/admin.h"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <set>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "common/clock.h"
#include "common/metrics_text.h"
#include "master/admin/web_assets.h"
#include "nlohmann/json.hpp"

namespace taskmaster {
namespace {

using nlohmann::json;

constexpr char kOtherQueues[] = "(other)";

const char* StateName(MasterState s) {
  switch (s) {
    case MasterState::kRecovering:
      return "recovering";
    case MasterState::kServing:
      return "serving";
    case MasterState::kStoreFailing:
      return "store_failing";
    case MasterState::kStopping:
      return "stopping";
  }
  return "unknown";
}

// Label values admitted in the order first seen, up to a cap; later ones share kOtherQueues.
// Admission is for the process's life, so a series never moves between labels. Thread-safe.
class LabelCap {
 public:
  explicit LabelCap(size_t cap) : cap_(cap) {}
  std::string Admit(const std::string& value) {
    absl::MutexLock lock(&mu_);
    if (admitted_.contains(value)) return value;
    if (admitted_.size() >= cap_) return kOtherQueues;
    admitted_.insert(value);
    return value;
  }

 private:
  const size_t cap_;
  absl::Mutex mu_;
  std::set<std::string> admitted_ ABSL_GUARDED_BY(mu_);
};

// Totals across queues and kinds, as one history sample needs them.
struct Totals {
  int64_t submitted = 0;
  int64_t completed = 0;  // succeeded, dead or cancelled
  int64_t failed = 0;     // failed attempts
  Histogram wait{kTaskSecondsBuckets};
  Histogram run{kTaskSecondsBuckets};
};

Totals SumOf(const BrokerMetrics& m) {
  Totals t;
  for (const QueueStatsView& q : m.queues) {
    t.submitted += q.submitted;
    t.completed += q.succeeded + q.dead + q.cancelled;
    t.failed += q.failed;
  }
  for (const KindTimesView& k : m.kinds) {
    t.wait.Merge(k.wait_seconds);
    t.run.Merge(k.run_seconds);
  }
  return t;
}

// Milliseconds at quantile q of what `now` counted beyond `before`; null with nothing counted.
json QuantileMs(const Histogram& now, const Histogram& before, double q) {
  std::vector<uint64_t> delta(now.counts().size());
  for (size_t i = 0; i < delta.size(); ++i) delta[i] = now.counts()[i] - before.counts()[i];
  const double seconds = Quantile(now.bounds(), delta, q);
  return seconds < 0 ? json(nullptr) : json(seconds * 1000);
}

class MasterAdminImpl final : public MasterAdmin {
 public:
  MasterAdminImpl(const MasterAdminOptions& options, AdminSources sources)
      : options_(options), sources_(std::move(sources)), queues_(options.max_metric_queues) {}

  ~MasterAdminImpl() override {
    http_.reset();  // no request runs past here
    {
      std::lock_guard<std::mutex> lock(stop_mu_);
      stop_ = true;
    }
    stop_cv_.notify_all();
    if (sampler_.joinable()) sampler_.join();
  }

  absl::Status Init(std::shared_ptr<spdlog::logger> log) {
    absl::StatusOr<std::unique_ptr<AdminHttpServer>> http =
        AdminHttpServer::Start(options_.http, Routes(), std::move(log));
    if (!http.ok()) return http.status();
    http_ = std::move(*http);
    sampler_ = std::thread([this] { SampleLoop(); });
    return absl::OkStatus();
  }

  int port() const override { return http_->port(); }

  std::string Metrics() const override {
    const MasterHealth health = sources_.health();
    MetricsText out;
    out.Gauge("taskmaster_build_info", "The master's version; always 1.",
              {{"version", TASKMASTER_VERSION}}, 1);
    for (MasterState s : {MasterState::kRecovering, MasterState::kServing,
                          MasterState::kStoreFailing, MasterState::kStopping}) {
      out.Gauge("taskmaster_state", "1 for the state the master is in, 0 for the others.",
                {{"state", StateName(s)}}, health.state == s ? 1 : 0);
    }
    const AuthFailures auth = sources_.auth_failures();
    for (const auto& [reason, count] : {std::pair{"missing_token", auth.missing_token},
                                        {"unknown_token", auth.unknown_token},
                                        {"role_denied", auth.role_denied}}) {
      out.Counter("taskmaster_auth_failures_total", "Calls refused for their token, by reason.",
                  {{"reason", reason}}, static_cast<double>(count));
    }
    if (health.state != MasterState::kRecovering) {
      AddBroker(out);
      AddStore(out);
    }
    AddProcessMetrics(out);
    return out.Render();
  }

  std::string StatusJson() const override {
    const MasterHealth health = sources_.health();
    json status = {{"version", TASKMASTER_VERSION},
                   {"listen", sources_.listen},
                   {"time_ms", SystemClock::Get()->NowMs()},
                   {"state", StateName(health.state)},
                   {"reason", health.reason},
                   {"silent_after_ms", sources_.silent_after_ms}};
    if (health.state == MasterState::kRecovering) return status.dump();
    status["epoch"] = sources_.brokers->epoch();
    if (sources_.brokers->partitions() > 1) {
      // This page counts the partitions served here: the others' masters show theirs.
      const BrokerSet::Snapshot snapshot = sources_.brokers->Take();
      status["partitions"] = snapshot.served;
      status["partition_count"] = sources_.brokers->partitions();
      status["other_masters"] = sources_.brokers->OtherMasters(snapshot);
    }
    const BrokerMetrics m = sources_.brokers->Metrics();
    json queues = json::array();
    for (const QueueStatsView& q : m.queues) {
      queues.push_back({{"queue", q.queue},
                        {"pending", q.pending},
                        {"delayed", q.delayed},
                        {"leased", q.leased},
                        {"oldest_ready_age_ms", q.oldest_ready_age_ms},
                        {"submitted", q.submitted},
                        {"succeeded", q.succeeded},
                        {"failed", q.failed},
                        {"retried", q.retried},
                        {"redelivered", q.redelivered},
                        {"dead", q.dead},
                        {"cancelled", q.cancelled}});
    }
    json workers = json::array();
    for (const WorkerView& w : sources_.brokers->Workers()) {
      workers.push_back({{"worker_id", w.worker_id},
                         {"name", w.name},
                         {"host", w.host},
                         {"kinds", w.kinds},
                         {"queues", w.queues},
                         {"labels", w.labels},
                         {"slots", w.slots},
                         {"running", w.running},
                         {"stuck", w.stuck},
                         {"connected", w.connected},
                         {"draining", w.draining},
                         {"heartbeat_age_ms", w.heartbeat_age_ms},
                         {"silent", w.silent}});
    }
    json failures = json::array();
    for (const FailureView& f : m.failures) {
      failures.push_back({{"time_ms", f.time_ms},
                          {"task_id", f.task_id},
                          {"job_id", f.job_id},
                          {"queue", f.queue},
                          {"kind", f.kind},
                          {"worker", f.worker},
                          {"attempt", f.attempt},
                          {"dead", f.dead},
                          {"error", f.error}});
    }
    status["queues"] = std::move(queues);
    status["workers"] = std::move(workers);
    status["duplicate_results"] = m.duplicate_results;
    status["failures"] = std::move(failures);
    {
      absl::MutexLock lock(&history_mu_);
      status["history"] = {{"interval_ms", options_.history_interval.count()},
                           {"samples", json::array_t(history_.begin(), history_.end())}};
    }
    // Strings from peers (errors, names) may hold anything: invalid UTF-8 becomes U+FFFD
    // rather than failing the page.
    return status.dump(-1, ' ', false, json::error_handler_t::replace);
  }

 private:
  std::vector<HttpRoute> Routes() {
    std::vector<HttpRoute> routes;
    routes.push_back({"/metrics", false, [this] {
                        return HttpReply{200, kMetricsContentType, Metrics()};
                      }});
    routes.push_back({"/api/status", false, [this] {
                        return HttpReply{200, "application/json", StatusJson()};
                      }});
    // Liveness: the process answers and its timers run (recovering counts as alive).
    routes.push_back({"/healthz", true, [this] {
                        const MasterHealth h = sources_.health();
                        if (h.state != MasterState::kRecovering && !sources_.ticking()) {
                          return HttpReply{503, "text/plain; charset=utf-8",
                                           "the master's timers have stalled\n"};
                        }
                        return HttpReply{200, "text/plain; charset=utf-8", "ok\n"};
                      }});
    // Readiness: what the gRPC health service answers.
    routes.push_back({"/readyz", true, [this] {
                        const MasterHealth h = sources_.health();
                        if (h.state == MasterState::kServing) {
                          return HttpReply{200, "text/plain; charset=utf-8", "serving\n"};
                        }
                        // The state only: probes need no token, and the reason may name paths
                        // (the store's error); /api/status has it.
                        return HttpReply{503, "text/plain; charset=utf-8",
                                         absl::StrCat("not serving: ", StateName(h.state), "\n")};
                      }});
    for (const WebAsset& asset : WebAssets()) {
      HttpReply reply{200, asset.content_type, std::string(asset.body)};
      routes.push_back({asset.path, false, [reply] { return reply; }});
    }
    return routes;
  }

  void AddBroker(MetricsText& out) const {
    const BrokerMetrics m = sources_.brokers->Metrics();
    // Queues past the cap are summed into one series each; ages take the oldest.
    std::map<std::string, QueueStatsView> queues;
    for (const QueueStatsView& q : m.queues) {
      AddCounts(queues[queues_.Admit(q.queue)], q);
    }
    for (const auto& [queue, q] : queues) {
      const auto d = [](int64_t v) { return static_cast<double>(v); };
      for (const auto& [state, count] : {std::pair{"ready", q.pending - q.delayed},
                                         {"delayed", q.delayed},
                                         {"leased", q.leased}}) {
        out.Gauge("taskmaster_tasks", "Unfinished tasks by queue and state.",
                  {{"queue", queue}, {"state", state}}, d(count));
      }
      out.Gauge("taskmaster_queue_oldest_ready_age_seconds",
                "How long the oldest ready task of the queue has waited for a worker.",
                {{"queue", queue}}, d(q.oldest_ready_age_ms) / 1000);
      out.Counter("taskmaster_tasks_submitted_total", "Tasks accepted.", {{"queue", queue}},
                  d(q.submitted));
      for (const auto& [outcome, count] :
           {std::pair{"succeeded", q.succeeded}, {"dead", q.dead}, {"cancelled", q.cancelled}}) {
        out.Counter("taskmaster_tasks_completed_total", "Tasks finished, by outcome.",
                    {{"queue", queue}, {"outcome", outcome}}, d(count));
      }
      // Stats' `failed` drops a lapse its worker reclaimed; a counter only grows, so the lapse
      // stays counted here, and the reclaim is counted apart.
      out.Counter("taskmaster_task_attempts_failed_total",
                  "Failed attempts: reported by workers, or leases lost.", {{"queue", queue}},
                  d(q.failed + q.reclaimed));
      out.Counter("taskmaster_task_leases_reclaimed_total",
                  "Lost leases their worker came back with in time to keep.", {{"queue", queue}},
                  d(q.reclaimed));
      out.Counter("taskmaster_tasks_retried_total", "Failed attempts followed by another.",
                  {{"queue", queue}}, d(q.retried));
      out.Counter("taskmaster_tasks_redelivered_total",
                  "Tasks offered again after their worker went silent and lost the lease.",
                  {{"queue", queue}}, d(q.redelivered));
    }
    out.Counter("taskmaster_results_duplicate_dropped_total",
                "Results dropped: a stale attempt's, or a second one for a task.", {},
                static_cast<double>(m.duplicate_results));
    for (const KindTimesView& k : m.kinds) {
      out.Histogram("taskmaster_task_wait_seconds",
                    "From ready to leased to a worker (schedule to start), by kind.",
                    {{"kind", k.kind}}, k.wait_seconds);
      out.Histogram("taskmaster_task_run_seconds",
                    "From leased to its result, as the master sees it, by kind.",
                    {{"kind", k.kind}}, k.run_seconds);
    }
    std::map<std::string, int64_t> workers = {
        {"connected", 0}, {"draining", 0}, {"silent", 0}, {"disconnected", 0}};
    int64_t slots = 0, busy = 0;
    for (const WorkerView& w : sources_.brokers->Workers()) {
      if (!w.connected) {
        workers["disconnected"]++;
        continue;
      }
      workers[w.silent ? "silent" : w.draining ? "draining" : "connected"]++;
      slots += w.slots;
      busy += std::min(w.slots, w.running + w.stuck);
    }
    for (const auto& [state, count] : workers) {
      out.Gauge("taskmaster_workers", "Worker streams the master knows, by state.",
                {{"state", state}}, static_cast<double>(count));
    }
    out.Gauge("taskmaster_slots", "Slots of connected workers, busy or free.", {{"state", "busy"}},
              static_cast<double>(busy));
    out.Gauge("taskmaster_slots", "Slots of connected workers, busy or free.", {{"state", "free"}},
              static_cast<double>(slots - busy));
  }

  void AddStore(MetricsText& out) const {
    const StoreMetrics s = sources_.store_metrics();
    out.Histogram("taskmaster_store_commit_seconds", "How long each store commit took.", {},
                  s.commit_seconds);
    out.Histogram("taskmaster_store_commit_changes", "Changes (rows) written per store commit.", {},
                  s.commit_changes);
  }

  void SampleLoop() {
    std::optional<Totals> before;
    std::unique_lock<std::mutex> lock(stop_mu_);
    while (!stop_cv_.wait_for(lock, options_.history_interval, [this] { return stop_; })) {
      lock.unlock();
      if (sources_.health().state != MasterState::kRecovering) {
        Totals now = SumOf(sources_.brokers->Metrics());
        if (before) AddSample(now, *before);
        before = std::move(now);
      }
      lock.lock();
    }
  }

  void AddSample(const Totals& now, const Totals& before) {
    json sample = {{"time_ms", SystemClock::Get()->NowMs()},
                   {"submitted", now.submitted - before.submitted},
                   {"completed", now.completed - before.completed},
                   {"failed", now.failed - before.failed},
                   {"wait_p50_ms", QuantileMs(now.wait, before.wait, 0.5)},
                   {"wait_p99_ms", QuantileMs(now.wait, before.wait, 0.99)},
                   {"run_p50_ms", QuantileMs(now.run, before.run, 0.5)},
                   {"run_p99_ms", QuantileMs(now.run, before.run, 0.99)}};
    absl::MutexLock lock(&history_mu_);
    history_.push_back(std::move(sample));
    while (history_.size() > options_.history_samples) history_.pop_front();
  }

  const MasterAdminOptions options_;
  const AdminSources sources_;
  mutable LabelCap queues_;
  mutable absl::Mutex history_mu_;
  std::deque<json> history_ ABSL_GUARDED_BY(history_mu_);  // oldest first
  std::mutex stop_mu_;
  bool stop_ = false;  // guarded by stop_mu_
  std::condition_variable stop_cv_;
  std::thread sampler_;
  std::unique_ptr<AdminHttpServer> http_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<MasterAdmin>> MasterAdmin::Start(
    const MasterAdminOptions& options, AdminSources sources, std::shared_ptr<spdlog::logger> log) {
  auto admin = std::make_unique<MasterAdminImpl>(options, std::move(sources));
  if (absl::Status s = admin->Init(std::move(log)); !s.ok()) return s;
  return admin;
}

}  // namespace taskmaster
