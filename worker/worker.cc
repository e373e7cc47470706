// The worker engine: wires the slots, the pool and the session together, and drains or aborts them.
#include "worker/worker.h"

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/admin_http.h"
#include "common/logging.h"
#include "common/metrics_text.h"
#include "common/partition.h"
#include "common/util.h"
#include "worker/pool.h"
#include "worker/session.h"
#include "worker/slots.h"

namespace taskmaster {
namespace {

// Room in a message for what comes with a result's output: its other fields and the framing take
// a few dozen bytes; a page leaves a wide margin.
constexpr size_t kResultOverhead = 4'096;

// Random bytes in a worker's id after its name: two processes of one name never share an id.
constexpr size_t kWorkerIdRandomBytes = 6;

// An outcome as a metric label.
const char* OutcomeLabel(worker::Outcome outcome) {
  switch (outcome) {
    case worker::Outcome::kSucceeded:
      return "succeeded";
    case worker::Outcome::kFailed:
      return "failed";
    case worker::Outcome::kCancelled:
      return "cancelled";
    case worker::Outcome::kReturned:
      return "returned";
  }
  return "unknown";
}

// One partition's share of a pool: its slots and credits, and its own stream to whichever master
// serves the partition.
struct Member {
  Member(const WorkerOptions* options, worker::SlotsOptions slots_options,
         worker::SessionIdentity identity, std::shared_ptr<spdlog::logger> log)
      : slots(std::move(slots_options)), session(options, std::move(identity), &slots, log) {}
  worker::Slots slots;
  worker::Session session;
};

// One pool of the worker: its threads, and a member per partition of the queues, each a stream
// to the master, where it shows as a worker of its own ("name/pool") serving only its kinds.
// Separate streams keep each pool's credits and prefetch apart without the master knowing of
// pools. The threads run the tasks of every partition.
struct Lane {
  Lane(const WorkerOptions* options, const Registry* registry, const PoolOptions& pool_options,
       std::string worker_id, const std::string& name, std::string host,
       std::vector<std::string> kinds, std::shared_ptr<spdlog::logger> log)
      : options(options),
        name(name),
        pool_name(pool_options.name),
        worker_id(std::move(worker_id)),
        host(std::move(host)),
        log(log),
        threads(pool_options.threads > 0
                    ? pool_options.threads
                    : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()))),
        prefetch(pool_options.prefetch.value_or(options->prefetch)),
        kinds(std::move(kinds)),
        metrics(this->kinds),
        pool(&feed, registry, &metrics,
             {.worker_name = name,
              .max_output = static_cast<size_t>(std::max<int64_t>(
                  0, int64_t{options->master.max_message_bytes} - int64_t{kResultOverhead}))},
             log) {}

  void Start() {
    pool.Start(threads);
    EnsurePartitions(1);
  }

  // The queues have `partitions` partitions (as a welcome said): a member for each it lacks.
  void EnsurePartitions(int32_t partitions) {
    absl::MutexLock lock(&mu);
    if (stopped) return;
    const auto count = static_cast<int32_t>(std::min<size_t>(partitions, kMaxPartitions));
    for (auto p = static_cast<int32_t>(members.size()); p < count; ++p) {
      auto member = std::make_unique<Member>(
          options,
          worker::SlotsOptions{.threads = threads,
                               .prefetch = prefetch,
                               .prefetch_max = options->prefetch_max,
                               .prefetch_window = options->prefetch_window,
                               .batch_bytes = kBatchBytes,
                               .progress_interval = options->progress_interval,
                               .on_ready = [this] { feed.Notify(); },
                               .shared_credits = credits,
                               .member = static_cast<size_t>(p),
                               .on_room =
                                   [this] {
                                     for (Member* m : Members()) m->slots.TopUp();
                                   }},
          worker::SessionIdentity{.worker_id = worker_id,
                                  .name = name,
                                  .host = host,
                                  .slots = threads,
                                  .kinds = kinds,
                                  .partition = p,
                                  .on_partitions = [this](int32_t n) { EnsurePartitions(n); }},
          log);
      Member* m = member.get();
      feed.Add({&m->slots, [m](worker::ToMaster out) { m->session.WriteNow(std::move(out)); }});
      m->session.Start();
      members.push_back(std::move(member));
    }
  }

  // Members are never removed, so the pointers stay valid for the lane's life.
  std::vector<Member*> Members() const {
    absl::MutexLock lock(&mu);
    std::vector<Member*> out;
    for (const auto& m : members) out.push_back(m.get());
    return out;
  }

  // No member is added after this.
  std::vector<Member*> StopMembers() {
    {
      absl::MutexLock lock(&mu);
      stopped = true;
    }
    std::vector<Member*> all = Members();
    for (Member* m : all) m->slots.Stop();
    return all;
  }

  bool Connected() const {
    const std::vector<Member*> all = Members();
    return std::all_of(all.begin(), all.end(), [](Member* m) { return m->session.connected(); });
  }

  const WorkerOptions* const options;
  const std::string name;
  const std::string pool_name;
  const std::string worker_id;
  const std::string host;
  const std::shared_ptr<spdlog::logger> log;
  const int threads;
  const int prefetch;
  const std::vector<std::string> kinds;
  // Each is thread-safe or used by one thread at a time (see their headers).
  worker::Feed feed;
  const std::shared_ptr<worker::SharedCredits> credits = std::make_shared<worker::SharedCredits>();
  worker::RunMetrics metrics;
  worker::Pool pool;
  mutable absl::Mutex mu;
  std::vector<std::unique_ptr<Member>> members ABSL_GUARDED_BY(mu);  // [partition]
  bool stopped ABSL_GUARDED_BY(mu) = false;
};

// Which pool runs each kind: a pool's own `kinds`, or else the one pool that lists none. Fails on
// a kind in two pools, a pool's kind the worker does not run, and a kind no pool runs.
absl::StatusOr<std::map<std::string, std::vector<std::string>>> KindsByPool(
    const std::vector<PoolOptions>& pools, const Registry& registry) {
  std::map<std::string, std::vector<std::string>> by_pool;
  std::map<std::string, std::string> pool_of;
  std::string catch_all;
  for (const PoolOptions& p : pools) {
    if (absl::Status s = CheckName("pool name", p.name); !s.ok()) return s;
    if (!by_pool.try_emplace(p.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("pool '", p.name, "' is declared twice"));
    }
    if (p.kinds.empty()) {
      if (!catch_all.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("pools '", catch_all, "' and '", p.name,
                                                       "' both list no kinds: one pool at most "
                                                       "takes every kind no other pool lists"));
      }
      catch_all = p.name;
    }
    for (const std::string& kind : p.kinds) {
      if (!registry.Find(kind)) {
        return absl::InvalidArgumentError(absl::StrCat("pool '", p.name, "' lists kind '", kind,
                                                       "', which this worker does not run"));
      }
      if (auto [it, fresh] = pool_of.emplace(kind, p.name); !fresh) {
        return absl::InvalidArgumentError(absl::StrCat("kind '", kind, "' is in two pools, '",
                                                       it->second, "' and '", p.name, "'"));
      }
      by_pool[p.name].push_back(kind);
    }
  }
  for (const std::string& kind : registry.Kinds()) {
    if (pool_of.count(kind)) continue;
    if (catch_all.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "kind '", kind, "' is in no pool: list it in one, or leave one pool's kinds unset"));
    }
    by_pool[catch_all].push_back(kind);
  }
  for (const auto& [pool, kinds] : by_pool) {
    if (kinds.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("pool '", pool, "' runs no kind"));
    }
  }
  return by_pool;
}

class WorkerImpl final : public Worker {
 public:
  WorkerImpl(WorkerOptions options, const Registry* registry,
             const std::map<std::string, std::vector<std::string>>& kinds_by_pool)
      : options_(std::move(options)),
        registry_(registry),
        log_(GetLogger("worker")),
        host_(HostName()),
        name_(options_.name.empty() ? absl::StrCat(host_, "-", getpid()) : options_.name) {
    const std::string id = absl::StrCat(name_, "-", RandomHex(kWorkerIdRandomBytes));
    const bool one = options_.pools.size() <= 1;
    for (const PoolOptions& p : options_.pools) {
      const std::string lane_name = one ? name_ : absl::StrCat(name_, "/", p.name);
      lanes_.push_back(std::make_unique<Lane>(
          &options_, registry_, p, one ? id : absl::StrCat(id, "/", p.name), lane_name, host_,
          kinds_by_pool.at(p.name), one ? log_ : GetLogger(absl::StrCat("worker/", p.name))));
    }
  }

  absl::Status StartAdmin() {
    if (options_.admin_listen.empty()) return absl::OkStatus();
    std::vector<HttpRoute> routes;
    routes.push_back({"/metrics", false, [this] {
                        return HttpReply{200, kMetricsContentType, Metrics()};
                      }});
    routes.push_back({"/healthz", true, [] { return HttpReply{200, "text/plain", "ok\n"}; }});
    // Ready while every pool has its stream to the master.
    routes.push_back({"/readyz", true, [this] {
                        const bool all = std::all_of(lanes_.begin(), lanes_.end(),
                                                     [](auto& l) { return l->Connected(); });
                        return all ? HttpReply{200, "text/plain", "connected\n"}
                                   : HttpReply{503, "text/plain", StatusLine() + "\n"};
                      }});
    AdminHttpOptions http;
    http.listen = options_.admin_listen;
    http.allow_plaintext = options_.admin_allow_plaintext;
    absl::StatusOr<std::unique_ptr<AdminHttpServer>> admin =
        AdminHttpServer::Start(http, std::move(routes), log_);
    if (!admin.ok()) return admin.status();
    admin_ = std::move(*admin);
    return absl::OkStatus();
  }

  std::string Metrics() const {
    MetricsText out;
    for (const auto& lane : lanes_) {
      const std::string& pool = lane->pool_name;
      for (const auto& [kind, k] : lane->metrics.Kinds()) {
        for (worker::Outcome o :
             {worker::Outcome::kSucceeded, worker::Outcome::kFailed, worker::Outcome::kCancelled}) {
          out.Counter("taskmaster_worker_tasks_total", "Tasks run, by pool, kind and outcome.",
                      {{"pool", pool}, {"kind", kind}, {"outcome", OutcomeLabel(o)}},
                      static_cast<double>(k.outcomes[static_cast<size_t>(o)]));
        }
        out.Histogram("taskmaster_worker_task_run_seconds", "How long handlers ran, by kind.",
                      {{"pool", pool}, {"kind", kind}}, k.run_seconds);
      }
      const int busy = std::min(lane->metrics.busy(), lane->threads);
      out.Gauge("taskmaster_worker_pool_threads", "The pool's threads, running a task or free.",
                {{"pool", pool}, {"state", "busy"}}, busy);
      out.Gauge("taskmaster_worker_pool_threads", "The pool's threads, running a task or free.",
                {{"pool", pool}, {"state", "free"}}, lane->threads - busy);
      out.Gauge("taskmaster_worker_connected",
                "1 while the pool's streams to the masters (one per partition) are up.",
                {{"pool", pool}}, lane->Connected() ? 1 : 0);
      int64_t reconnects = 0;
      for (Member* m : lane->Members()) {
        reconnects += std::max<int64_t>(0, m->session.connections() - 1);
      }
      out.Counter("taskmaster_worker_reconnects_total",
                  "Streams the masters welcomed after each of the pool's first.", {{"pool", pool}},
                  static_cast<double>(reconnects));
    }
    AddProcessMetrics(out);
    return out.Render();
  }

  void Run() {
    for (auto& lane : lanes_) {
      lane->Start();
      log_->info("worker {} started: {} threads, prefetch {}, kinds [{}], master {}", lane->name,
                 lane->threads,
                 lane->prefetch >= 0 ? std::to_string(lane->prefetch)
                                     : absl::StrCat("adaptive up to ", options_.prefetch_max),
                 absl::StrJoin(lane->kinds, ","), options_.master.address);
    }
  }

  ~WorkerImpl() override { Abort(); }

  void Drain() override {
    const worker::Time deadline = std::chrono::steady_clock::now() + options_.drain_timeout;
    // Every pool and partition drains at once, so that the drain takes the timeout once.
    std::vector<std::thread> drains;
    for (auto& lane : lanes_) {
      for (Member* m : lane->Members()) {
        drains.emplace_back([&, l = lane.get(), m] { DrainMember(*l, *m, deadline); });
      }
    }
    for (std::thread& t : drains) t.join();
    Abort();
  }

  void Abort() override {
    // Only the first caller joins the threads.
    if (aborted_.exchange(true)) return;
    std::vector<std::vector<Member*>> members;
    for (auto& lane : lanes_) members.push_back(lane->StopMembers());
    for (size_t i = 0; i < lanes_.size(); ++i) {
      for (Member* m : members[i]) {
        m->session.Cancel();
        m->session.Join();
      }
      lanes_[i]->pool.Join();
    }
    log_->info("worker {} stopped", name_);
  }

  bool Stopped() const override {
    return std::all_of(lanes_.begin(), lanes_.end(), [](const auto& lane) {
      const std::vector<Member*> all = lane->Members();
      return std::all_of(all.begin(), all.end(), [](Member* m) { return m->slots.Stopped(); });
    });
  }

  std::string StatusLine() const override {
    size_t connected = 0;
    for (const auto& lane : lanes_) connected += lane->Connected() ? 1 : 0;
    const std::string state = connected == lanes_.size()
                                  ? "connected to"
                                  : (connected == 0 ? "connecting to"
                                                    : absl::StrCat(connected, " of ", lanes_.size(),
                                                                   " pools connected to"));
    return absl::StrCat(name_, ": ", state, " master ", options_.master.address);
  }

 private:
  void DrainMember(const Lane& lane, Member& member, worker::Time deadline) {
    const std::optional<worker::Slots::DrainStart> start = member.slots.StartDrain();
    if (!start) return;
    log_->info("{} draining: {} tasks given back, {} running (up to {} ms)", lane.name,
               start->returned, start->running, options_.drain_timeout.count());
    const worker::Slots::DrainEnd end = member.slots.FinishDrain(deadline);
    if (end.unfinished > 0) {
      log_->warn("{}: drain timeout: left {} tasks unfinished for the master to requeue", lane.name,
                 end.unfinished);
    }
    if (end.unacked > 0) {
      log_->warn("{}: left with {} results the master had not acknowledged", lane.name,
                 end.unacked);
    }
  }

  const WorkerOptions options_;
  const Registry* const registry_;
  const std::shared_ptr<spdlog::logger> log_;
  const std::string host_;
  const std::string name_;
  std::vector<std::unique_ptr<Lane>> lanes_;  // fixed after construction
  std::atomic<bool> aborted_ = false;
  std::unique_ptr<AdminHttpServer> admin_;  // reads lanes_, so declared after them
};

}  // namespace

absl::StatusOr<std::unique_ptr<Worker>> Worker::Start(WorkerOptions options,
                                                      const Registry* registry) {
  if (registry->Kinds().empty()) return absl::InvalidArgumentError("the worker runs no kind");
  if (options.threads < 0) return absl::InvalidArgumentError("--threads must be positive");
  if (options.queues.empty()) options.queues = {"default"};
  for (const std::string& q : options.queues) {
    if (absl::Status s = CheckName("queue name", q); !s.ok()) return s;
  }
  if (options.master.keepalive_ms == 0) options.master.keepalive_ms = kDefaultKeepaliveMs;
  // Fail now on unreadable certificates rather than in every reconnect.
  if (absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(options.master);
      !channel.ok()) {
    return channel.status();
  }
  if (!options.pools.empty() && options.threads > 0) {
    return absl::InvalidArgumentError(
        "--threads (or threads) sizes the one default pool; with [pools.*], set each pool's "
        "threads instead");
  }
  if (options.pools.empty()) {
    options.pools = {{.name = "default", .threads = options.threads, .kinds = {}, .prefetch = {}}};
  }
  absl::StatusOr<std::map<std::string, std::vector<std::string>>> kinds =
      KindsByPool(options.pools, *registry);
  if (!kinds.ok()) return kinds.status();
  auto worker = std::make_unique<WorkerImpl>(std::move(options), registry, *kinds);
  if (absl::Status s = worker->StartAdmin(); !s.ok()) return s;
  worker->Run();
  return worker;
}

}  // namespace taskmaster
