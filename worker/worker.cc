// The worker engine: wires the slots, the pool and the session together, and drains or aborts them.
#include "worker/worker.h"

#include <unistd.h>

#include <climits>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
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

std::string HostName() {
  char buf[HOST_NAME_MAX + 1] = {};
  gethostname(buf, sizeof(buf) - 1);
  return buf;
}

class WorkerImpl final : public Worker {
 public:
  WorkerImpl(WorkerOptions options, const Registry* registry)
      : options_(std::move(options)),
        registry_(registry),
        log_(GetLogger("worker")),
        host_(HostName()),
        name_(options_.name.empty() ? absl::StrCat(host_, "-", getpid()) : options_.name),
        threads_(options_.threads > 0 ? options_.threads
                                      : std::max(1u, std::thread::hardware_concurrency())),
        slots_({.threads = threads_,
                .prefetch = options_.prefetch,
                .prefetch_max = options_.prefetch_max,
                .prefetch_window = options_.prefetch_window,
                .batch_bytes = kBatchBytes}),
        pool_(&slots_, registry_,
              {.worker_name = name_,
               .max_output = static_cast<size_t>(std::max<int64_t>(
                   0, int64_t{options_.master.max_message_bytes} - int64_t{kResultOverhead}))},
              log_),
        session_(&options_,
                 {.worker_id = absl::StrCat(name_, "-", RandomHex(kWorkerIdRandomBytes)),
                  .name = name_,
                  .host = host_,
                  .slots = threads_,
                  .kinds = registry_->Kinds()},
                 &slots_, log_) {}

  void Run() {
    pool_.Start(threads_);
    session_.Start();
    log_->info("worker {} started: {} threads, prefetch {}, kinds [{}], master {}", name_, threads_,
               options_.prefetch >= 0 ? std::to_string(options_.prefetch)
                                      : absl::StrCat("adaptive up to ", options_.prefetch_max),
               absl::StrJoin(registry_->Kinds(), ","), options_.master.address);
  }

  ~WorkerImpl() override { Abort(); }

  void Drain() override {
    const worker::Time deadline = slots_.Now() + options_.drain_timeout;
    const std::optional<worker::Slots::DrainStart> start = slots_.StartDrain();
    if (!start) return;
    log_->info("draining: {} tasks given back, {} running (up to {} ms)", start->returned,
               start->running, options_.drain_timeout.count());
    const worker::Slots::DrainEnd end = slots_.FinishDrain(deadline);
    if (end.unfinished > 0) {
      log_->warn("drain timeout: left {} tasks unfinished for the master to requeue",
                 end.unfinished);
    }
    if (end.unacked > 0) {
      log_->warn("left with {} results the master had not acknowledged", end.unacked);
    }
    Abort();
  }

  void Abort() override {
    // Only the caller that stops the slots joins the threads.
    if (!slots_.Stop()) return;
    session_.Cancel();
    session_.Join();
    pool_.Join();
    log_->info("worker {} stopped", name_);
  }

  bool Stopped() const override { return slots_.Stopped(); }

 private:
  const WorkerOptions options_;
  const Registry* const registry_;
  const std::shared_ptr<spdlog::logger> log_;
  const std::string host_;
  const std::string name_;
  const int threads_;
  // Each is thread-safe or used by one thread at a time (see their headers).
  worker::Slots slots_;
  worker::Pool pool_;
  worker::Session session_;
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
  auto worker = std::make_unique<WorkerImpl>(std::move(options), registry);
  worker->Run();
  return worker;
}

}  // namespace taskmaster
