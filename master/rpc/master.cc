#include "master/rpc/master.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/auth.h"
#include "common/logging.h"
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

class MasterImpl final : public Master {
 public:
  MasterImpl(const MasterOptions& options, std::optional<TokenSet> tokens,
             std::shared_ptr<ReloadableServerCredentials> tls, std::unique_ptr<Store> store,
             PostgresStore* postgres)
      : options_(options),
        log_(GetLogger("master")),
        store_(std::move(store)),
        broker_(options.broker, SystemClock::Get(), store_.get(), GetLogger("broker")),
        auth_(tokens),
        tls_(std::move(tls)),
        queue_service_(&broker_, &auth_, static_cast<size_t>(options.max_watches_per_token),
                       options.hold_first_event),
        // A write the worker has not taken for half a lease: it holds tasks it cannot know of
        // (cut by the time its leases lapse, whose cancels are written to it).
        worker_service_(&broker_, &auth_, log_,
                        static_cast<size_t>(options.max_worker_buffer_bytes),
                        std::chrono::milliseconds(options.broker.lease_timeout_ms / 2)),
        health_service_([this] { return Health().state == MasterState::kServing; }),
        postgres_(postgres) {}

  absl::Status Init(const std::optional<TokenSet>& tokens) {
    if (tokens) broker_.SetTenantLimits(tokens->limits());
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
    if (postgres_) {
      // A standby listens (probes say why it does not serve) and waits for the lease.
      server_thread_ = std::thread([this] { StandByThenServe(); });
      return absl::OkStatus();
    }
    return Serve();
  }

  ~MasterImpl() override { Shutdown(std::chrono::milliseconds(0)); }

  int port() const override { return port_; }
  int exit_code() const override { return exit_code_.load(); }
  int admin_port() const override { return admin_ ? admin_->port() : 0; }

  std::string StatusLine() const override {
    int64_t pending = 0, leased = 0;
    for (const QueueStatsView& q : broker_.QueueStats()) {
      pending += q.pending;
      leased += q.leased;
    }
    size_t connected = 0;
    for (const WorkerView& w : broker_.Workers()) connected += w.connected ? 1 : 0;
    return absl::StrCat("serving on ", options_.listen, " (port ", port_, "): ", connected,
                        connected == 1 ? " worker, " : " workers, ", pending, " tasks waiting, ",
                        leased, " running");
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
        broker_.SetTenantLimits(tokens->limits());
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
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    // A lease lost from here on changes nothing: the master stops anyway, and the callback must
    // not outlive what it reaches.
    if (postgres_) postgres_->Disarm();
    cv_.notify_all();
    if (server_thread_.joinable()) server_thread_.join();
    if (ticker_.joinable()) ticker_.join();
    if (!server_) {  // never started
      admin_.reset();
      return;
    }
    log_->info("shutting down: telling workers, waiting up to {} ms for calls", deadline.count());
    // First events held for results go now, while they can still name their jobs.
    queue_service_.Tick();
    broker_.Shutdown();
    server_->Shutdown(std::chrono::system_clock::now() + deadline);
    server_->Wait();
    queue_service_.Stop();
    worker_service_.Stop();
    health_service_.Stop();
    for (const std::unique_ptr<CompletionQueueThread>& queue : rpc_queues_) queue->Stop();
    admin_.reset();
    log_->info("stopped");
  }

 private:
  // Recovers the store, then serves.
  absl::Status Serve() {
    if (absl::Status s = broker_.Recover(); !s.ok()) return s;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // A lease lost while recovering: it stepped down already, and stays down.
      if (stepped_down_) return absl::OkStatus();
      recovered_ = true;
      auth_.SetUnavailable("");
    }
    MarkTick();
    ticker_ = std::thread([this] { TickLoop(); });
    log_->info("listening on {} (port {}), {}{}, {} store, epoch {}", options_.listen, port_,
               options_.insecure ? "INSECURE: no authentication" : "token authentication",
               !tls_ ? "" : (options_.tls.client_ca_file.empty() ? ", TLS" : ", mutual TLS"),
               options_.store == "memory" ? "memory (nothing survives a restart)"
               : options_.store == "postgres"
                   ? "postgres at " + RedactedConninfo(options_.postgres.conninfo)
                   : "sqlite in " + options_.sqlite.data_dir,
               broker_.epoch());
    return absl::OkStatus();
  }

  // With PostgreSQL: stands by until this master holds the lease, then serves until it loses it.
  void StandByThenServe() {
    const std::string address = AdvertisedAddress();
    absl::Status acquired = postgres_->Acquire(
        address, [this] { return Stopping(); },
        [this, address](const PostgresStore::Owner& owner) {
          // Only a live holder elsewhere is named: one whose lease expired is taken over next,
          // and this very address (a holder this master was before a restart) sends clients
          // back here.
          const bool named = owner.live && !owner.address.empty() && owner.address != address;
          const std::string reason =
              named
                  ? absl::StrCat("this master stands by; the master at ", owner.address, " serves")
                  : std::string("this master stands by for another; retry in a moment");
          auth_.SetUnavailable(reason, named ? owner.address : "");
          std::lock_guard<std::mutex> lock(mu_);
          standby_reason_ = reason;
        },
        [this](const absl::Status& why) { StepDown(why); });
    if (!acquired.ok()) return;  // stopping
    {
      std::lock_guard<std::mutex> lock(mu_);
      standby_reason_.clear();
    }
    auth_.SetUnavailable("the master is recovering its store; retry in a moment");
    if (absl::Status s = Serve(); !s.ok()) {
      log_->critical("cannot recover the store: {}", std::string(s.message()));
      Exit(kExitSoftware);
    }
  }

  // Another master serves the partition now, or may at any moment: nothing more may be answered
  // from this one's memory. The process stops (its supervisor starts it again, to stand by).
  void StepDown(const absl::Status& why) {
    log_->error("stepping down: {}", std::string(why.message()));
    {
      std::lock_guard<std::mutex> lock(mu_);
      stepped_down_ = true;
      auth_.SetUnavailable(absl::StrCat("this master stepped down: ", why.message()));
    }
    broker_.Shutdown();
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

  std::string AdvertisedAddress() const {
    if (!options_.advertise.empty()) return options_.advertise;
    std::string host = options_.listen.substr(0, options_.listen.rfind(':'));
    if (host.empty() || host == "0.0.0.0" || host == "[::]") host = HostName();
    return absl::StrCat(host, ":", port_);
  }

  // What the probes answer: not serving while recovering or shutting down, nor while the store
  // cannot write (a full disk), when every submit would be refused.
  MasterHealth Health() const {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return {MasterState::kStopping, "shutting down"};
      if (!standby_reason_.empty()) return {MasterState::kRecovering, standby_reason_};
      if (!recovered_) return {MasterState::kRecovering, "recovering the store"};
    }
    if (absl::Status s = store_->Writable(); !s.ok()) {
      return {MasterState::kStoreFailing, std::string(s.message())};
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
    return {&broker_,
            store_.get(),
            [this] { return Health(); },
            [this] { return auth_.Failures(); },
            [this] { return Ticking(); },
            options_.listen,
            options_.broker.SilentAfterMs()};
  }

  void MarkTick() {
    last_tick_.store(std::chrono::steady_clock::now().time_since_epoch().count(),
                     std::memory_order_relaxed);
  }

  void TickLoop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      cv_.wait_for(lock, options_.tick);
      if (stopping_) break;
      lock.unlock();
      broker_.Tick();
      queue_service_.Tick();
      MarkTick();
      lock.lock();
    }
  }

  const MasterOptions options_;
  const std::shared_ptr<spdlog::logger> log_;
  const std::unique_ptr<Store> store_;
  Broker broker_;
  Authorizer auth_;
  // Declared before the server, which must not outlive them.
  const std::shared_ptr<ReloadableServerCredentials> tls_;
  TaskQueueService queue_service_;
  WorkerServiceImpl worker_service_;
  HealthService health_service_;
  // Declared before server_, so that they go after the server, as gRPC requires.
  std::vector<std::unique_ptr<CompletionQueueThread>> rpc_queues_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MasterAdmin> admin_;  // reads broker_ and store_, so declared after them
  int port_ = 0;
  std::thread ticker_;
  // When TickLoop last finished a tick (steady_clock ticks); read by Ticking from another thread.
  std::atomic<int64_t> last_tick_{0};

  mutable std::mutex mu_;
  bool stopping_ = false;       // guarded by mu_
  bool recovered_ = false;      // guarded by mu_
  std::string standby_reason_;  // guarded by mu_; set while another master serves
  bool stepped_down_ = false;   // guarded by mu_: lost its lease, and serves no more
  std::condition_variable cv_;
  PostgresStore* const postgres_;  // store_, when it is PostgreSQL's
  std::thread server_thread_;      // StandByThenServe's
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
  std::unique_ptr<Store> store;
  PostgresStore* postgres = nullptr;
  if (options.store == "memory") {
    store = NewMemoryStore();
  } else if (options.store == "postgres") {
    PostgresStoreOptions pg_options = options.postgres;
    if (pg_options.conninfo.empty()) {
      return absl::InvalidArgumentError(
          "--store postgres needs --postgres, a libpq connection string or URL");
    }
    if (pg_options.master_id.empty()) {
      pg_options.master_id = absl::StrCat(HostName(), "-", getpid(), "-", RandomHex(4));
    }
    absl::StatusOr<std::unique_ptr<PostgresStore>> opened = OpenPostgresStore(pg_options);
    if (!opened.ok()) return opened.status();
    postgres = opened->get();
    store = std::move(*opened);
  } else if (options.store == "sqlite") {
    absl::StatusOr<std::unique_ptr<Store>> opened = OpenSqliteStore(options.sqlite);
    if (!opened.ok()) return opened.status();
    store = std::move(*opened);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown store '", options.store, "' (sqlite, postgres or memory)"));
  }
  auto master =
      std::make_unique<MasterImpl>(options, tokens, std::move(tls), std::move(store), postgres);
  if (absl::Status status = master->Init(tokens); !status.ok()) return status;
  return master;
}

}  // namespace taskmaster
