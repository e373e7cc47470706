#include "master/rpc/master.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <future>
#include <map>
#include <optional>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/auth.h"
#include "common/logging.h"
#include "common/partition.h"
#include "common/util.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/impl/server_builder_plugin.h"
#include "master/rpc/health_service.h"
#include "master/rpc/task_queue_service.h"
#include "master/rpc/worker_stream.h"
#include "master/store/memory_store.h"

namespace taskmaster {

namespace {

// Exit codes (sysexits.h): the store cannot be recovered; another master took over.
constexpr int kExitSoftware = 70;
constexpr int kExitTempFail = 75;

absl::Status CheckTlsFlags(const TlsFiles& tls) {
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (tls.cert_file.empty() && !tls.client_ca_file.empty()) {
    return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key");
  }
  return absl::OkStatus();
}

absl::StatusOr<TokenSet> LoadTokens(const std::string& path) {
  absl::StatusOr<TokenSet> loaded = TokenSet::Load(path);
  if (loaded.ok() && !IsPrivateFile(path)) {
    GetLogger("master")->warn("{} can be read by other users: chmod 600 it", path);
  }
  return loaded;
}

// Linking gRPC's reflection library registers its plugin for every server (a static initializer
// does), so reflection would always be on: this option takes it out again unless asked for.
class WithoutReflection final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments* arguments) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    std::erase_if(*plugins, [](const auto& p) { return p->name() == kReflectionPlugin; });
  }

 private:
  static constexpr char kReflectionPlugin[] = "proto_server_reflection";
};

// A partition served here: its store and its broker, which goes first (it writes to the store
// until it is gone). Services reach the broker through the BrokerSet, sharing this.
struct PartitionUnit {
  std::unique_ptr<Store> store;
  PostgresStore* postgres = nullptr;  // store, when it is PostgreSQL's
  std::optional<Broker> broker;
};

class MasterImpl final : public Master {
 public:
  // With `membership` (PostgreSQL) the partitions are taken as leases allow; otherwise `store`
  // holds the one partition.
  MasterImpl(const MasterOptions& options, std::optional<TokenSet> tokens,
             std::shared_ptr<ReloadableServerCredentials> tls, std::unique_ptr<Store> store,
             std::unique_ptr<PostgresMembership> membership)
      : options_(options),
        log_(GetLogger("master")),
        single_store_(std::move(store)),
        membership_(std::move(membership)),
        brokers_(membership_ ? membership_->partitions() : 1,
                 [this](int32_t p) { return OwnerOf(p); }),
        auth_(tokens),
        tls_(std::move(tls)),
        queue_service_(&brokers_, &auth_, static_cast<size_t>(options.max_watches_per_token),
                       options.hold_first_event),
        // A write the worker has not taken for half a lease: it holds tasks it cannot know of
        // (cut by the time its leases lapse, whose cancels are written to it).
        worker_service_(&brokers_, &auth_, log_,
                        static_cast<size_t>(options.max_worker_buffer_bytes),
                        std::chrono::milliseconds(options.broker.lease_timeout_ms / 2)),
        health_service_([this] { return Health().state == MasterState::kServing; }) {}

  absl::Status Init(const std::optional<TokenSet>& tokens) {
    if (tokens) brokers_.SetTenantLimits(tokens->limits());
    // The server listens before the store is recovered, so that probes hear NOT_SERVING
    // meanwhile, and every other call is answered UNAVAILABLE until it is.
    auth_.SetUnavailable("the master is recovering its store; retry in a moment");
    if (options_.grpc_reflection) {
      grpc::reflection::InitProtoReflectionServerBuilderPlugin();  // once, whoever calls it
    }
    grpc::ServerBuilder builder;
    if (!options_.grpc_reflection) builder.SetOption(std::make_unique<WithoutReflection>());
    builder.AddListeningPort(
        options_.listen,
        tls_ ? std::shared_ptr<grpc::ServerCredentials>(tls_) : grpc::InsecureServerCredentials(),
        &port_);
    builder.RegisterService(&queue_service_);
    builder.RegisterService(&worker_service_);
    builder.RegisterService(&health_service_);
    builder.SetMaxReceiveMessageSize(options_.max_message_bytes);
    builder.SetMaxSendMessageSize(options_.max_message_bytes);
    // Workers ping even when idle (see WorkerKeepaliveMs): allow it rather than answer GOAWAY.
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                               MasterMinPingIntervalMs(options_.broker.lease_timeout_ms));
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    builder.AddChannelArgument(
        GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS,
        static_cast<int>(std::clamp<int64_t>(options_.handshake_timeout_ms, 100, 3'600'000)));
    for (int64_t i = 0; i < options_.rpc_threads; ++i) {
      rpc_queues_.push_back(std::make_unique<CompletionQueueThread>(builder.AddCompletionQueue()));
    }
    server_ = builder.BuildAndStart();
    if (!server_ || port_ == 0) {
      return absl::UnavailableError(
          absl::StrCat("cannot listen on ", options_.listen, " (address in use or invalid)"));
    }
    // Every call runs on one of rpc_queues_, each with a thread of its own (see
    // completion_queue.h).
    for (const std::unique_ptr<CompletionQueueThread>& queue : rpc_queues_) {
      queue->Start();
      queue_service_.Start(queue.get());
      worker_service_.Start(queue.get());
      health_service_.Start(queue.get());
    }
    // After the server's port: an admin port the system picks (port 0) can then never be the
    // one a restarting master asks for again.
    if (!options_.admin.http.listen.empty()) {
      absl::StatusOr<std::unique_ptr<MasterAdmin>> admin =
          MasterAdmin::Start(AdminOptions(), AdminSourcesOf(), log_);
      if (!admin.ok()) return admin.status();
      admin_ = std::move(*admin);
    }
    if (membership_) return StandBy();
    return ServeSingleStore();
  }

  ~MasterImpl() override { Shutdown(std::chrono::milliseconds(0)); }

  int port() const override { return port_; }
  int exit_code() const override { return exit_code_.load(); }
  int admin_port() const override { return admin_ ? admin_->port() : 0; }

  std::string StatusLine() const override {
    int64_t pending = 0, leased = 0;
    for (const QueueStatsView& q : brokers_.QueueStats()) {
      pending += q.pending;
      leased += q.leased;
    }
    size_t connected = 0;
    for (const WorkerView& w : brokers_.Workers()) connected += w.connected ? 1 : 0;
    std::string partitions;
    if (membership_) {
      const std::vector<int32_t> served = brokers_.Served();
      partitions = served.empty() ? std::string(" standing by,")
                                  : absl::StrCat(" partitions ", absl::StrJoin(served, ","), " of ",
                                                 brokers_.partitions(), ",");
    }
    return absl::StrCat("serving on ", options_.listen, " (port ", port_, "):", partitions, " ",
                        connected, connected == 1 ? " worker, " : " workers, ", pending,
                        " tasks waiting, ", leased, " running");
  }

  bool Ticking() const override {
    // Far longer than any tick takes, far shorter than a watchdog worth setting.
    constexpr auto kStalled = std::chrono::seconds(10);
    const auto last = std::chrono::steady_clock::time_point(
        std::chrono::steady_clock::duration(last_tick_.load(std::memory_order_relaxed)));
    return std::chrono::steady_clock::now() - last <
           std::max<std::chrono::steady_clock::duration>(kStalled, options_.tick * 50);
  }

  void Reload() override {
    if (!options_.tokens_file.empty()) {
      absl::StatusOr<TokenSet> tokens = LoadTokens(options_.tokens_file);
      if (tokens.ok()) {
        brokers_.SetTenantLimits(tokens->limits());
        const size_t count = tokens->size();
        auth_.Replace(std::move(*tokens));
        log_->info("reloaded {}: {} tokens", options_.tokens_file, count);
      } else {
        log_->error("kept the tokens in use: {}", std::string(tokens.status().message()));
      }
    }
    if (tls_) {
      absl::StatusOr<TlsMaterial> material =
          LoadTlsMaterial(options_.tls, std::chrono::system_clock::now());
      if (material.ok()) {
        log_->info("reloaded the TLS certificate '{}' (valid until {}): new connections get it",
                   material->subject, std::chrono::system_clock::to_time_t(material->not_after));
        tls_->Replace(std::move(*material));
      } else {
        log_->error("kept the TLS certificate in use: {}",
                    std::string(material.status().message()));
      }
    }
  }

  void Shutdown(std::chrono::milliseconds deadline) override {
    std::vector<std::shared_ptr<PartitionUnit>> units;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      stopping_ = true;
      for (const auto& [p, unit] : units_) units.push_back(unit);
    }
    // A lease lost from here on changes nothing: the master stops anyway, and the callback must
    // not outlive what it reaches.
    for (const std::shared_ptr<PartitionUnit>& unit : units) {
      if (unit->postgres) unit->postgres->Disarm();
    }
    cv_.notify_all();
    for (std::thread& t : partition_threads_) t.join();
    if (membership_thread_.joinable()) membership_thread_.join();
    if (ticker_.joinable()) ticker_.join();
    if (!server_) {  // never started
      admin_.reset();
      return;
    }
    log_->info("shutting down: telling workers, waiting up to {} ms for calls", deadline.count());
    // First events held for results go now, while they can still name their jobs.
    queue_service_.Tick();
    brokers_.Shutdown();
    server_->Shutdown(std::chrono::system_clock::now() + deadline);
    server_->Wait();
    queue_service_.Stop();
    worker_service_.Stop();
    health_service_.Stop();
    for (const std::unique_ptr<CompletionQueueThread>& queue : rpc_queues_) queue->Stop();
    admin_.reset();
    // The others count without this master at once; its leases go with their stores.
    if (membership_) membership_->Leave();
    log_->info("stopped");
  }

 private:
  // SQLite or memory: the one partition, recovered, then served.
  absl::Status ServeSingleStore() {
    auto unit = std::make_shared<PartitionUnit>();
    unit->store = std::move(single_store_);
    unit->broker.emplace(options_.broker, SystemClock::Get(), unit->store.get(),
                         GetLogger("broker"));
    if (absl::Status s = unit->broker->Recover(); !s.ok()) return s;
    Serve(0, unit);
    StartTicker();
    log_->info("listening on {} (port {}), {}{}, {} store, epoch {}", options_.listen, port_,
               options_.insecure ? "INSECURE: no authentication" : "token authentication",
               !tls_ ? "" : (options_.tls.client_ca_file.empty() ? ", TLS" : ", mutual TLS"),
               options_.store == "memory" ? "memory (nothing survives a restart)"
                                          : "sqlite in " + options_.sqlite.data_dir,
               brokers_.epoch());
    return absl::OkStatus();
  }

  // PostgreSQL: says this master is there, then takes partitions as their leases come free, up
  // to its fair share of them, each on a thread of its own.
  absl::Status StandBy() {
    address_ = AdvertisedAddress();
    absl::StatusOr<int32_t> live = membership_->Beat(address_);
    if (!live.ok()) return live.status();
    UpdateFairShare(*live);
    UpdateServing();
    StartTicker();
    log_->info("listening on {} (port {}), {}{}, postgres store at {} ({} partitions), as {}",
               options_.listen, port_,
               options_.insecure ? "INSECURE: no authentication" : "token authentication",
               !tls_ ? "" : (options_.tls.client_ca_file.empty() ? ", TLS" : ", mutual TLS"),
               RedactedConninfo(options_.postgres.conninfo), brokers_.partitions(), address_);
    membership_thread_ = std::thread([this] { MembershipLoop(); });
    for (int32_t p = 0; p < brokers_.partitions(); ++p) {
      partition_threads_.emplace_back([this, p] { PartitionLoop(p); });
    }
    return absl::OkStatus();
  }

  void StartTicker() {
    MarkTick();
    ticker_ = std::thread([this] { TickLoop(); });
  }

  // Partition `p` is served here from now on.
  void Serve(int32_t p, std::shared_ptr<PartitionUnit> unit) {
    std::shared_ptr<Broker> broker(unit, &*unit->broker);
    {
      std::lock_guard<std::mutex> lock(mu_);
      units_[p] = std::move(unit);
      owners_.erase(p);  // whoever served it before: named again only once it is handed over
    }
    brokers_.Add(p, std::move(broker));
    UpdateServing();
  }

  // Takes partition `p` whenever this master wants it and its lease is free, serves it, and
  // hands it over when asked, until the master stops.
  void PartitionLoop(int32_t p) {
    PostgresStoreOptions store_options = options_.postgres;
    store_options.partition = p;
    while (!Stopping()) {
      absl::StatusOr<std::unique_ptr<PostgresStore>> opened = OpenPostgresStore(store_options);
      if (!opened.ok()) {
        log_->warn("partition {}: cannot open the store, trying again: {}", p,
                   std::string(opened.status().message()));
        WaitWhileRunning(std::chrono::milliseconds(options_.postgres.retry_interval_ms));
        continue;
      }
      PostgresStore* postgres = opened->get();
      absl::Status acquired = postgres->Acquire(
          address_, [this] { return Stopping(); }, [this] { return WantsMore(); },
          [this, p](const PostgresStore::Owner& owner) {
            // Only a live holder elsewhere is named: one whose lease expired is taken over next,
            // and this very address (a holder this master was before a restart) sends clients
            // back here.
            SetOwner(p, owner.live && owner.address != address_ ? owner.address : "");
          },
          [this](const absl::Status& why) { StepDown(why); });
      if (!acquired.ok()) return;  // stopping
      auto unit = std::make_shared<PartitionUnit>();
      unit->store = std::move(*opened);
      unit->postgres = postgres;
      BrokerOptions broker_options = options_.broker;
      broker_options.partition = p;
      broker_options.partitions = brokers_.partitions();
      unit->broker.emplace(broker_options, SystemClock::Get(), unit->store.get(),
                           GetLogger("broker"));
      if (absl::Status s = unit->broker->Recover(); !s.ok()) {
        log_->critical("cannot recover partition {}: {}", p, std::string(s.message()));
        Exit(kExitSoftware);
        return;
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        // Lost while recovering (it stepped down already, and stays down), or stopping.
        if (stepped_down_ || stopping_) {
          postgres->Disarm();
          return;
        }
      }
      Serve(p, unit);
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || hand_over_ == p; });
        if (stopping_) return;
        hand_over_ = -1;
      }
      HandOver(p, std::move(unit));
    }
  }

  // Gives partition `p` up to whichever master wants it: calls for it are refused from now on,
  // its workers and watchers are told, what it accepted is written, then its lease is released.
  // Its workers take their tasks to the next owner, so nothing runs twice.
  void HandOver(int32_t p, std::shared_ptr<PartitionUnit> unit) {
    log_->info("handing partition {} over: this master serves more than its share", p);
    std::shared_ptr<Broker> broker = brokers_.Remove(p);
    {
      std::lock_guard<std::mutex> lock(mu_);
      units_.erase(p);
    }
    UpdateServing();
    unit->postgres->Disarm();
    broker->Shutdown();
    // Shared: the store may answer after the wait gave up.
    auto written = std::make_shared<std::promise<void>>();
    std::future<void> done = written->get_future();
    broker->WhenDurable([written](const absl::Status&) { written->set_value(); });
    done.wait_for(std::chrono::milliseconds(2 * options_.postgres.lease_ms));
    unit->postgres->Release();
  }

  // Every third of a lease: says this master lives, counts the live ones, and hands a partition
  // over when it serves more than its share for two rounds in a row (one more master came).
  void MembershipLoop() {
    const auto period =
        std::chrono::milliseconds(std::max<int64_t>(options_.postgres.lease_ms / 3, 1));
    int over = 0;
    bool failing = false;
    while (WaitWhileRunning(period)) {
      absl::StatusOr<int32_t> live = membership_->Beat(address_);
      if (!live.ok()) {
        if (!failing) {
          log_->warn("cannot tell PostgreSQL this master lives, trying again: {}",
                     std::string(live.status().message()));
        }
        failing = true;
        continue;
      }
      failing = false;
      UpdateFairShare(*live);
      std::lock_guard<std::mutex> lock(mu_);
      if (static_cast<int32_t>(units_.size()) <= fair_share_ || hand_over_ >= 0) {
        over = 0;
        continue;
      }
      if (++over >= 2) {
        hand_over_ = units_.rbegin()->first;
        over = 0;
        cv_.notify_all();
      }
    }
  }

  void UpdateFairShare(int32_t live) {
    std::lock_guard<std::mutex> lock(mu_);
    fair_share_ = (brokers_.partitions() + live - 1) / live;
  }

  bool WantsMore() const {
    std::lock_guard<std::mutex> lock(mu_);
    return !stepped_down_ && static_cast<int32_t>(units_.size()) < fair_share_;
  }

  void SetOwner(int32_t p, std::string address) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      owners_[p] = std::move(address);
    }
    UpdateServing();
  }

  std::string OwnerOf(int32_t p) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = owners_.find(p);
    return it == owners_.end() ? std::string() : it->second;
  }

  // Serving any partition, the master answers calls (those of partitions served elsewhere name
  // where); serving none, it stands by, and names a master that serves.
  void UpdateServing() {
    std::lock_guard<std::mutex> lock(mu_);
    if (stepped_down_ || stopping_) return;
    if (!units_.empty()) {
      if (!recovered_) auth_.SetUnavailable("");
      recovered_ = true;
      standby_reason_.clear();
      return;
    }
    std::string serving_at;
    for (const auto& [p, address] : owners_) {
      if (!address.empty()) serving_at = address;
    }
    const std::string reason =
        serving_at.empty()
            ? std::string("this master stands by for another; retry in a moment")
            : absl::StrCat("this master stands by; the master at ", serving_at, " serves");
    if (reason == standby_reason_ && !recovered_) return;
    recovered_ = false;
    standby_reason_ = reason;
    auth_.SetUnavailable(reason, serving_at);
  }

  // Another master serves a partition of this one now, or may at any moment: nothing more may
  // be answered from this one's memory. The process stops (its supervisor starts it again, to
  // stand by).
  void StepDown(const absl::Status& why) {
    log_->error("stepping down: {}", std::string(why.message()));
    {
      std::lock_guard<std::mutex> lock(mu_);
      stepped_down_ = true;
      auth_.SetUnavailable(absl::StrCat("this master stepped down: ", why.message()));
    }
    brokers_.Shutdown();
    Exit(kExitTempFail);
  }

  // Ends the process through main's own shutdown, with `code`.
  void Exit(int code) {
    exit_code_.store(code);
    kill(getpid(), SIGTERM);
  }

  bool Stopping() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stopping_;
  }

  // Waits `wait` unless the master stops meanwhile; false when it stops.
  bool WaitWhileRunning(std::chrono::milliseconds wait) {
    std::unique_lock<std::mutex> lock(mu_);
    return !cv_.wait_for(lock, wait, [this] { return stopping_; });
  }

  std::string AdvertisedAddress() const {
    if (!options_.advertise.empty()) return options_.advertise;
    std::string host = options_.listen.substr(0, options_.listen.rfind(':'));
    if (host.empty() || host == "0.0.0.0" || host == "[::]") host = HostName();
    return absl::StrCat(host, ":", port_);
  }

  // What the probes answer: not serving while recovering, standing by or shutting down, nor
  // while a store cannot write (a full disk), when every submit would be refused.
  MasterHealth Health() const {
    std::vector<std::shared_ptr<PartitionUnit>> units;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return {MasterState::kStopping, "shutting down"};
      if (!standby_reason_.empty()) return {MasterState::kRecovering, standby_reason_};
      if (!recovered_) return {MasterState::kRecovering, "recovering the store"};
      for (const auto& [p, unit] : units_) units.push_back(unit);
    }
    for (const std::shared_ptr<PartitionUnit>& unit : units) {
      if (absl::Status s = unit->store->Writable(); !s.ok()) {
        return {MasterState::kStoreFailing, std::string(s.message())};
      }
    }
    return {MasterState::kServing, ""};
  }

  MasterAdminOptions AdminOptions() const {
    MasterAdminOptions admin = options_.admin;
    admin.http.tls_cert = options_.tls.cert_file;
    admin.http.tls_key = options_.tls.key_file;
    // With tokens, the pages are for admins only, on loopback too (any local user can connect
    // there): they name queues, workers and the errors of tasks. Probes need none.
    if (!options_.insecure) {
      admin.http.authorize = [this](std::string_view header) {
        return auth_.IsAdminAuthorization(header);
      };
    }
    return admin;
  }

  AdminSources AdminSourcesOf() const {
    return {&brokers_,
            [this] { return StoreMetricsOf(); },
            [this] { return Health(); },
            [this] { return auth_.Failures(); },
            [this] { return Ticking(); },
            options_.listen,
            options_.broker.SilentAfterMs()};
  }

  StoreMetrics StoreMetricsOf() const {
    std::vector<std::shared_ptr<PartitionUnit>> units;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& [p, unit] : units_) units.push_back(unit);
    }
    StoreMetrics merged;
    for (const std::shared_ptr<PartitionUnit>& unit : units) {
      const StoreMetrics m = unit->store->Metrics();
      merged.commit_seconds.Merge(m.commit_seconds);
      merged.commit_changes.Merge(m.commit_changes);
    }
    return merged;
  }

  void MarkTick() {
    last_tick_.store(std::chrono::steady_clock::now().time_since_epoch().count(),
                     std::memory_order_relaxed);
  }

  void TickLoop() {
    while (WaitWhileRunning(options_.tick)) {
      brokers_.Tick();
      queue_service_.Tick();
      MarkTick();
    }
  }

  const MasterOptions options_;
  const std::shared_ptr<spdlog::logger> log_;
  std::unique_ptr<Store> single_store_;  // SQLite's or memory's, until ServeSingleStore
  const std::unique_ptr<PostgresMembership> membership_;
  std::string address_;  // advertised to clients and the other masters (PostgreSQL)
  BrokerSet brokers_;
  Authorizer auth_;
  // Declared before the server, which must not outlive them.
  const std::shared_ptr<ReloadableServerCredentials> tls_;
  TaskQueueService queue_service_;
  WorkerServiceImpl worker_service_;
  HealthService health_service_;
  // Declared before server_, so that they go after the server, as gRPC requires.
  std::vector<std::unique_ptr<CompletionQueueThread>> rpc_queues_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MasterAdmin> admin_;  // reads brokers_ and the stores, so declared after them
  int port_ = 0;
  std::thread ticker_;
  // When TickLoop last finished a tick (steady_clock ticks); read by Ticking from another thread.
  std::atomic<int64_t> last_tick_{0};

  mutable std::mutex mu_;
  bool stopping_ = false;       // guarded by mu_
  bool recovered_ = false;      // guarded by mu_: serves a partition
  std::string standby_reason_;  // guarded by mu_; set while it serves none
  bool stepped_down_ = false;   // guarded by mu_: lost a lease, and serves no more
  // Guarded by mu_: the partitions served here.
  std::map<int32_t, std::shared_ptr<PartitionUnit>> units_;
  // Guarded by mu_: where the partitions not served here are (empty: unknown).
  std::map<int32_t, std::string> owners_;
  int32_t fair_share_ = 1;  // guarded by mu_: partitions this master may serve
  int32_t hand_over_ = -1;  // guarded by mu_: the partition to hand over; -1: none
  std::condition_variable cv_;
  std::thread membership_thread_;               // MembershipLoop
  std::vector<std::thread> partition_threads_;  // PartitionLoop's
  std::atomic<int> exit_code_{0};
};

}  // namespace

absl::StatusOr<std::unique_ptr<Master>> Master::Start(const MasterOptions& options) {
  if (options.tick.count() <= 0 || options.tick.count() * 2 > options.broker.pause_threshold_ms) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tick-ms (", options.tick.count(),
        ") must be positive and at most half of "
        "--pause-threshold-ms (",
        options.broker.pause_threshold_ms, "): ticks further apart look like a paused master"));
  }
  std::optional<TokenSet> tokens;
  if (options.insecure) {
    if (!options.tokens_file.empty()) {
      return absl::InvalidArgumentError("--insecure and --tokens exclude each other");
    }
    if (!IsLoopbackAddress(options.listen)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--insecure listens on loopback addresses only, not ", options.listen));
    }
    if (!options.admin.http.listen.empty() && !IsLoopbackAddress(options.admin.http.listen)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--insecure serves its admin pages on loopback addresses only, not ",
          options.admin.http.listen, ": they would be open to anyone who can reach them"));
    }
  } else {
    if (options.tls.cert_file.empty() && !IsLoopbackAddress(options.listen) &&
        !options.allow_plaintext) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--listen ", options.listen,
          " is not a loopback address, and without TLS every token would cross the network in "
          "clear: serve TLS (--tls-cert, --tls-key; deploy/make-certs.sh makes a set) or say "
          "--allow-plaintext"));
    }
    if (options.tokens_file.empty()) {
      return absl::InvalidArgumentError(
          "no --tokens file: the master refuses to run without authentication "
          "(say --insecure to run without it, on loopback only)");
    }
    absl::StatusOr<TokenSet> loaded = LoadTokens(options.tokens_file);
    if (!loaded.ok()) return loaded.status();
    tokens = std::move(*loaded);
  }
  if (absl::Status s = CheckTlsFlags(options.tls); !s.ok()) return s;
  std::shared_ptr<ReloadableServerCredentials> tls;
  if (!options.tls.cert_file.empty()) {
    absl::StatusOr<TlsMaterial> material =
        LoadTlsMaterial(options.tls, std::chrono::system_clock::now());
    if (!material.ok()) return material.status();
    tls = std::make_shared<ReloadableServerCredentials>(std::move(*material));
  }
  if (options.max_watches_per_token < 1) {
    return absl::InvalidArgumentError("--max-watches-per-token must be at least 1");
  }
  MasterOptions with_id = options;
  if (with_id.postgres.master_id.empty()) {
    with_id.postgres.master_id = absl::StrCat(HostName(), "-", getpid(), "-", RandomHex(4));
  }
  std::unique_ptr<Store> store;
  std::unique_ptr<PostgresMembership> membership;
  if (options.store == "memory") {
    store = NewMemoryStore();
  } else if (options.store == "postgres") {
    if (options.postgres.conninfo.empty()) {
      return absl::InvalidArgumentError(
          "--store postgres needs --postgres, a libpq connection string or URL");
    }
    if (options.postgres.partitions < 1 || options.postgres.partitions > kMaxPartitions) {
      return absl::InvalidArgumentError(
          absl::StrCat("--postgres-partitions must be 1 to ", kMaxPartitions));
    }
    absl::StatusOr<std::unique_ptr<PostgresMembership>> opened =
        OpenPostgresMembership(with_id.postgres);
    if (!opened.ok()) return opened.status();
    membership = std::move(*opened);
    if (membership->partitions() != options.postgres.partitions) {
      GetLogger("master")->warn(
          "the database has {} partitions, set when it was made; --postgres-partitions {} is "
          "ignored",
          membership->partitions(), options.postgres.partitions);
    }
  } else if (options.store == "sqlite") {
    absl::StatusOr<std::unique_ptr<Store>> opened = OpenSqliteStore(options.sqlite);
    if (!opened.ok()) return opened.status();
    store = std::move(*opened);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown store '", options.store, "' (sqlite, postgres or memory)"));
  }
  auto master = std::make_unique<MasterImpl>(with_id, tokens, std::move(tls), std::move(store),
                                             std::move(membership));
  if (absl::Status status = master->Init(tokens); !status.ok()) return status;
  return master;
}

}  // namespace taskmaster
