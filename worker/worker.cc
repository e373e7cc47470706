#include "worker/worker.h"

#include <unistd.h>

#include <deque>
#include <optional>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/util.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {
namespace {

using TaskId = uint64_t;

// Results per message: bounds one write when many piled up during an outage.
constexpr int kMaxResultsPerMessage = 1000;
// Cancels that arrived before their task (messages can pass each other), remembered this many.
constexpr size_t kRecentCancels = 4096;
// Results unacknowledged this long are sent again on the same stream.
constexpr auto kResendAfter = std::chrono::seconds(10);
// After the drain, how long results may wait for the master's acknowledgement.
constexpr auto kAckGrace = std::chrono::seconds(5);
// Room in a message for what comes with a result's output.
constexpr size_t kResultOverhead = 4'096;
// How often the watchdog looks at the session. Every timed wait of the worker ends within this
// of its deadline: the watchdog's pass through the lock re-evaluates them.
constexpr auto kWatchdogPeriod = std::chrono::milliseconds(50);
// A master silent for this many heartbeat intervals is given up on: a fresh connection gets
// through where a stalled one sits in TCP's retransmission backoff.
constexpr int kSilentHeartbeats = 3;
// A result whose sending ended the master's stream this many times is given up on.
constexpr int kMaxRefusals = 5;
// The longest wait between reconnects while the worker holds tasks or results.
constexpr auto kHurried = std::chrono::milliseconds(1'000);
// Until a master says otherwise (in its welcome).
constexpr auto kDefaultHeartbeat = std::chrono::milliseconds(5'000);

using Clock = std::chrono::steady_clock;

int64_t SteadyMs(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

std::string HostName() {
  char buf[256] = {};
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
        worker_id_(absl::StrCat(name_, "-", RandomHex(6))),
        threads_(options_.threads > 0 ? options_.threads
                                      : std::max(1u, std::thread::hardware_concurrency())),
        max_output_(static_cast<size_t>(std::max<int64_t>(
            0, int64_t{options_.master.max_message_bytes} - int64_t{kResultOverhead}))) {}

  void Run() {
    for (int i = 0; i < threads_; ++i) pool_.emplace_back([this] { PoolLoop(); });
    session_thread_ = std::thread([this] { SessionLoop(); });
    watchdog_ = std::thread([this] { WatchdogLoop(); });
    log_->info("worker {} started: {} threads, prefetch {}, kinds [{}], master {}", name_, threads_,
               options_.prefetch >= 0 ? std::to_string(options_.prefetch)
                                      : absl::StrCat("adaptive up to ", options_.prefetch_max),
               absl::StrJoin(registry_->Kinds(), ","), options_.master.address);
  }

  ~WorkerImpl() override { Abort(); }

  void Drain() override {
    const auto deadline = Clock::now() + options_.drain_timeout;
    size_t returned, running;
    {
      absl::MutexLock lock(&mu_);
      if (stopped_ || draining_) return;
      draining_ = true;
      credits_to_send_ = 0;
      // Give back what has not started; the master requeues it without using an attempt.
      for (TaskId id : queue_) {
        AddResultLocked(id, held_.at(id).attempt, v1::TaskResult::RETURNED, "", "");
        held_.erase(id);
      }
      returned = queue_.size();
      queue_.clear();
      running = held_.size();
    }
    log_->info("draining: {} tasks given back, {} running (up to {} ms)", returned, running,
               options_.drain_timeout.count());
    size_t unfinished, unacked;
    {
      absl::MutexLock lock(&mu_);
      AwaitUntil([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return held_.empty(); }, deadline);
      unfinished = held_.size();
      AwaitUntil([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return unacked_.empty(); },
                 deadline + kAckGrace);
      unacked = unacked_.size();
      leaving_ = true;
      // The sender says bye and the stream ends; wait a little for that before cutting it.
      AwaitUntil([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !session_open_; },
                 Clock::now() + std::chrono::seconds(5));
    }
    if (unfinished > 0) {
      log_->warn("drain timeout: left {} tasks unfinished for the master to requeue", unfinished);
    }
    if (unacked > 0) log_->warn("left with {} results the master had not acknowledged", unacked);
    Abort();
  }

  void Abort() override {
    std::shared_ptr<grpc::ClientContext> live;
    {
      absl::MutexLock lock(&mu_);
      if (stopped_) return;
      stopped_ = true;
      leaving_ = true;
      for (auto& [id, h] : held_) h.cancelled->store(true);
      queue_.clear();
      live = live_context_;
    }
    if (live) live->TryCancel();
    if (session_thread_.joinable()) session_thread_.join();
    if (watchdog_.joinable()) watchdog_.join();
    for (std::thread& t : pool_) t.join();
    log_->info("worker {} stopped", name_);
  }

  bool Stopped() const override {
    absl::MutexLock lock(&mu_);
    return stopped_;
  }

 private:
  // A task this worker holds: queued or running.
  struct Held {
    int32_t attempt = 0;
    std::string kind;
    std::string payload;
    int64_t timeout_ms = 0;
    std::shared_ptr<std::atomic<bool>> cancelled = std::make_shared<std::atomic<bool>>(false);
    bool running = false;
    bool discard = false;  // revoked by the master: its result would be stale
  };

  void SessionLoop() {
    Backoff backoff(options_.reconnect_min, options_.reconnect_max);
    bool warned = false;
    while (true) {
      grpc::Status status;
      if (RunSession(&status)) {
        backoff.Reset();
        warned = false;
      }
      auto wait = backoff.Next();
      {
        // Holding tasks, the worker must be back before their leases lapse, and a restarted
        // master waits for it before it hands anything out: retry at least every second.
        absl::MutexLock lock(&mu_);
        if (!held_.empty() || !unacked_.empty()) wait = std::min({wait, heartbeat_, kHurried});
      }
      log_->debug("stream ended ({}: {}); next attempt in {} ms",
                  static_cast<int>(status.error_code()), status.error_message(), wait.count());
      {
        absl::MutexLock lock(&mu_);
        if (leaving_) return;
      }
      if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED ||
          status.error_code() == grpc::StatusCode::PERMISSION_DENIED ||
          status.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
        log_->error("master {} refused this worker: {}; retrying in {} ms", options_.master.address,
                    status.error_message(), wait.count());
      } else if (!warned) {
        log_->warn("lost the master {} ({}); reconnecting with backoff", options_.master.address,
                   status.error_message());
        warned = true;
      }
      absl::MutexLock lock(&mu_);
      if (AwaitUntil([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return leaving_; },
                     Clock::now() + wait)) {
        return;
      }
    }
  }

  // Waits until `done` holds or `deadline` passes, on the monotonic clock (this abseil's timed
  // waits sleep until a wall-clock deadline, which a clock step moves); returns `done`'s value.
  // The watchdog passes through the lock often enough to end the wait on time.
  template <typename Done>
  bool AwaitUntil(Done done, Clock::time_point deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return done() || Clock::now() >= deadline;
    };
    mu_.Await(absl::Condition(&ready));
    return done();
  }

  // Watches the session: a connection that gets no welcome, or a master that went silent, is
  // cut so the session loop reconnects afresh; and tasks whose leases are about to lapse on the
  // master are stopped, so they never run in two places at once.
  void WatchdogLoop() {
    while (true) {
      std::this_thread::sleep_for(kWatchdogPeriod);
      std::shared_ptr<grpc::ClientContext> cut;
      std::string why;
      size_t stopped = 0, dropped = 0;
      {
        absl::MutexLock lock(&mu_);
        if (stopped_) return;
        const auto now = Clock::now();
        const auto silence = kSilentHeartbeats * heartbeat_;
        if (live_context_ && !cut_) {
          // A master that accepted the connection but says nothing (paused, or its answer lost
          // in a partition): try again, though not so soon that a busy master never makes it.
          if (!welcomed_ && now - session_started_ > std::max({silence, lease_ / 2, kHurried})) {
            why = "no welcome";
          } else if (session_open_ && echoes_ && now - heard_at_ > silence) {
            why = absl::StrCat(
                "no word for ",
                std::chrono::duration_cast<std::chrono::milliseconds>(now - heard_at_).count(),
                " ms");
          }
          if (!why.empty()) {
            cut = live_context_;
            cut_ = true;
          }
        }
        if (echoes_ && lease_.count() > 0 && now > fence_at_) FenceLocked(&stopped, &dropped);
      }
      if (cut) {
        log_->warn("master {}: {}; reconnecting on a fresh connection", options_.master.address,
                   why);
        cut->TryCancel();
      }
      if (stopped + dropped > 0) {
        log_->warn(
            "no heartbeat answered by the master for {} ms: stopped {} running and dropped {} "
            "queued tasks before their leases lapse there (the master hands them to others)",
            lease_.count(), stopped, dropped);
      }
    }
  }

  // Stops every task whose lease may lapse on the master: results not yet acknowledged are kept.
  void FenceLocked(size_t* stopped, size_t* dropped) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (auto it = held_.begin(); it != held_.end();) {
      Held& h = it->second;
      if (h.running) {
        if (!h.discard) {
          h.discard = true;
          h.cancelled->store(true);
          ++discarded_;
          ++*stopped;
        }
        ++it;
      } else {
        std::erase(queue_, it->first);
        it = held_.erase(it);
        ++*dropped;
      }
    }
  }

  // The master extended this worker's leases at `since` at the latest: they hold for a lease
  // period from then. The worker stops its tasks a little earlier than the master would expire
  // them: a tenth of the lease, at least two watchdog periods.
  void LeasesHeldSinceLocked(Clock::time_point since) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const auto margin = std::max<Clock::duration>(lease_ / 10, 2 * kWatchdogPeriod);
    fence_at_ = std::max(fence_at_, since + lease_ - margin);
  }

  // One stream, from hello to its end. Returns whether the master welcomed us.
  bool RunSession(grpc::Status* status) {
    auto context_owner = std::make_shared<grpc::ClientContext>();
    grpc::ClientContext& context = *context_owner;
    AddBearerToken(context, options_.token);
    v1::WorkerMessage hello_message;
    ChannelOptions channel_options = options_.master;
    {
      absl::MutexLock lock(&mu_);
      if (leaving_) return false;
      // Pings tell a dead connection well within a lease; the master allows them that often.
      if (lease_.count() > 0) {
        channel_options.keepalive_ms = std::max<int64_t>(1'000, lease_.count() / 3);
      }
      live_context_ = context_owner;
      cut_ = false;
      welcomed_ = false;
      session_started_ = Clock::now();
      v1::Hello* hello = hello_message.mutable_hello();
      hello->set_worker_id(worker_id_);
      hello->set_name(ValidUtf8(name_));
      hello->set_host(ValidUtf8(host_));
      for (const std::string& kind : registry_->Kinds()) hello->add_kinds(kind);
      for (const std::string& queue : options_.queues) hello->add_queues(queue);
      for (const auto& [key, value] : options_.labels)
        (*hello->mutable_labels())[key] = ValidUtf8(value);
      hello->set_slots(threads_);
      auto add_held = [hello](TaskId id, int32_t attempt) {
        v1::TaskRef* ref = hello->add_held();
        ref->set_task_id(id);
        ref->set_attempt(attempt);
      };
      for (const auto& [id, h] : held_) {
        if (!h.discard) add_held(id, h.attempt);
      }
      for (const auto& [id, r] : unacked_) {
        if (!held_.contains(id)) add_held(id, r.attempt());
      }
      hello->set_master_epoch(epoch_);
      hello->set_worker_secret(secret_);
    }
    absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(channel_options);
    if (!channel.ok()) {  // checked in Start: the files went away since
      *status = grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                             std::string(channel.status().message()));
      absl::MutexLock lock(&mu_);
      live_context_ = nullptr;
      return false;
    }
    auto stub = v1::WorkerService::NewStub(*channel);
    auto stream = stub->Connect(&context);
    v1::MasterMessage in;
    const bool answered = stream->Write(hello_message) && stream->Read(&in);
    if (!answered || !in.has_welcome()) {
      if (answered) context.TryCancel();  // not a master we understand
      *status = stream->Finish();
      absl::MutexLock lock(&mu_);
      live_context_ = nullptr;
      return false;
    }
    std::optional<std::string> lost_state;
    {
      absl::MutexLock lock(&mu_);
      lost_state = AcceptWelcomeLocked(in.welcome());
    }
    if (lost_state) log_->warn("{}", *lost_state);
    log_->info("connected to master {} (epoch {})", options_.master.address,
               in.welcome().master_epoch());
    std::thread sender([this, s = stream.get()] { SendLoop(s); });
    bool master_stopping = false;
    do {
      HandleMessage(in);
      if (in.shutting_down()) {
        master_stopping = true;
        break;
      }
    } while (stream->Read(&in));
    {
      absl::MutexLock lock(&mu_);
      session_open_ = false;
    }
    context.TryCancel();  // unblocks the sender if it waits on flow control
    sender.join();
    *status = stream->Finish();
    if (master_stopping) *status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "master stopping");
    std::vector<std::string> given_up;
    {
      absl::MutexLock lock(&mu_);
      // A stream the master ended, not us, with results of ours unacknowledged on it.
      if (!cut_ && !leaving_ && !master_stopping) given_up = CountRefusalsLocked(*status);
      sent_in_session_.clear();
      live_context_ = nullptr;
    }
    for (const std::string& line : given_up) log_->error("{}", line);
    return true;
  }

  // Results the master keeps refusing (it ends the stream each time one arrives: it cannot read
  // it, say) would be resent forever and keep this worker from doing anything else: after
  // kMaxRefusals such ends, a result is given up on. Returns what to log.
  std::vector<std::string> CountRefusalsLocked(const grpc::Status& status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<std::string> given_up;
    for (TaskId id : sent_in_session_) {
      auto it = unacked_.find(id);
      if (it == unacked_.end() || ++refusals_[id] < kMaxRefusals) continue;
      given_up.push_back(absl::StrCat(
          "giving up on the result of task ", id, " attempt ", it->second.attempt(), " (",
          v1::TaskResult::Outcome_Name(it->second.outcome()), ", ", it->second.output().size(),
          " bytes of output): the master ended the stream each of the last ", kMaxRefusals,
          " times it was sent (", Printable(status.error_message()),
          "); the task runs again once its lease lapses"));
      unacked_.erase(it);
      refusals_.erase(id);
    }
    return given_up;
  }

  // Returns what to tell the operator when the master lost its state.
  std::optional<std::string> AcceptWelcomeLocked(const v1::Welcome& welcome)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::optional<std::string> lost_state;
    if (!epoch_.empty() && epoch_ != welcome.master_epoch()) {
      lost_state = absl::StrCat("the master lost its state (epoch ", epoch_, " -> ",
                                welcome.master_epoch(), "): dropping ", held_.size(),
                                " held tasks and ", unacked_.size(), " unacknowledged results");
      for (auto& [id, h] : held_) RevokeLocked(id);
      unacked_.clear();
      refusals_.clear();
    }
    for (const v1::TaskRef& ref : welcome.revoked()) {
      if (held_.contains(ref.task_id())) RevokeLocked(ref.task_id());
      unacked_.erase(ref.task_id());
    }
    epoch_ = welcome.master_epoch();
    heartbeat_ = std::chrono::milliseconds(std::max<int64_t>(100, welcome.heartbeat_interval_ms()));
    lease_ = std::chrono::milliseconds(std::max<int64_t>(0, welcome.lease_timeout_ms()));
    echoes_ = welcome.echoes_heartbeats();
    secret_ = welcome.worker_secret();
    heard_at_ = Clock::now();
    welcomed_ = true;
    // Attaching extended every lease this worker kept: from when the hello left at the latest.
    LeasesHeldSinceLocked(session_started_);
    to_send_.clear();
    for (const auto& [id, r] : unacked_) to_send_.push_back(id);
    credits_to_send_ = 0;
    outstanding_credit_ = 0;
    drain_sent_ = false;
    session_open_ = true;
    TopUpCreditsLocked();
    return lost_state;
  }

  // Tasks to hold beyond the running ones. Adaptive: enough to keep the threads busy for
  // --prefetch-window while the next tasks travel, judged from how long tasks take; so short
  // tasks stream without a round trip between them, and long ones never queue behind each other.
  int32_t PrefetchLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (options_.prefetch >= 0) return options_.prefetch;
    if (task_us_ewma_ <= 0) return threads_;  // nothing measured yet
    const double window_us = static_cast<double>(options_.prefetch_window.count()) * 1000.0;
    const double want = threads_ * window_us / task_us_ewma_;
    return static_cast<int32_t>(std::clamp<double>(want, 0, options_.prefetch_max));
  }

  // Grants the master what the worker can take now: its threads plus prefetch, less what it
  // holds and what it granted already.
  void TopUpCreditsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (draining_ || !session_open_) return;
    const auto held = static_cast<int32_t>(held_.size()) - discarded_;
    const int32_t want = threads_ + PrefetchLocked() - held - outstanding_credit_;
    if (want <= 0) return;
    credits_to_send_ += want;
    outstanding_credit_ += want;
  }

  // Drops a held task: a queued one now, a running one when its handler returns.
  void RevokeLocked(TaskId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Held& h = held_.at(id);
    if (h.running) {
      discarded_ += h.discard ? 0 : 1;
      h.discard = true;
      h.cancelled->store(true);
    } else {
      std::erase(queue_, id);
      held_.erase(id);
    }
  }

  void HandleMessage(v1::MasterMessage& in) {
    absl::MutexLock lock(&mu_);
    heard_at_ = Clock::now();
    if (in.heartbeat_echo() > 0) {
      LeasesHeldSinceLocked(Clock::time_point(std::chrono::milliseconds(in.heartbeat_echo())));
    }
    outstanding_credit_ = std::max(0, outstanding_credit_ - in.tasks_size());
    for (v1::Task& t : *in.mutable_tasks()) {
      const TaskId id = t.task_id();
      if (held_.contains(id)) continue;  // delivered twice
      if (recent_cancels_.erase(id) > 0) {
        AddResultLocked(id, t.attempt(), v1::TaskResult::CANCELLED, "", "cancelled");
        continue;
      }
      if (draining_) {
        AddResultLocked(id, t.attempt(), v1::TaskResult::RETURNED, "", "");
        continue;
      }
      Held& h = held_[id];
      h.attempt = t.attempt();
      h.kind = std::move(*t.mutable_kind());
      h.payload = std::move(*t.mutable_payload());
      h.timeout_ms = t.timeout_ms();
      queue_.push_back(id);
    }
    for (TaskId id : in.cancel()) {
      auto it = held_.find(id);
      if (it == held_.end()) {
        if (recent_cancels_order_.size() >= kRecentCancels) {
          recent_cancels_.erase(recent_cancels_order_.front());
          recent_cancels_order_.pop_front();
        }
        recent_cancels_.insert(id);
        recent_cancels_order_.push_back(id);
      } else if (it->second.running) {
        it->second.cancelled->store(true);
      } else {
        AddResultLocked(id, it->second.attempt, v1::TaskResult::CANCELLED, "", "cancelled");
        std::erase(queue_, id);
        held_.erase(it);
      }
    }
    for (const v1::TaskRef& ref : in.acked()) {
      auto it = unacked_.find(ref.task_id());
      if (it != unacked_.end() && it->second.attempt() == ref.attempt()) {
        unacked_.erase(it);
        refusals_.erase(ref.task_id());
      }
    }
    TopUpCreditsLocked();
  }

  void AddResultLocked(TaskId id, int32_t attempt, v1::TaskResult::Outcome outcome,
                       std::string output, std::string error) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    v1::TaskResult& r = unacked_[id];
    r.set_task_id(id);
    r.set_attempt(attempt);
    r.set_outcome(outcome);
    r.set_output(std::move(output));
    r.set_error(std::move(error));
    to_send_.push_back(id);
  }

  void SendLoop(grpc::ClientReaderWriter<v1::WorkerMessage, v1::MasterMessage>* stream) {
    auto next_heartbeat = Clock::now();  // at once: it tells how long the leases hold
    auto next_resend = Clock::now() + kResendAfter;
    std::vector<TaskId> unacked_before;  // results unacknowledged at the last resend check
    std::chrono::milliseconds heartbeat_interval;
    while (true) {
      v1::WorkerMessage m;
      bool bye = false;
      {
        absl::MutexLock lock(&mu_);
        auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return !session_open_ || !to_send_.empty() || credits_to_send_ > 0 ||
                 (draining_ && !drain_sent_) || leaving_;
        };
        AwaitUntil(ready, next_heartbeat);
        if (!session_open_) return;
        heartbeat_interval = heartbeat_;
        if (std::chrono::steady_clock::now() >= next_resend) {
          // Still unacknowledged a whole period later: the master could not store them (its
          // disk was full, say). Send them again; it records each result once.
          for (TaskId id : unacked_before) {
            if (unacked_.contains(id)) to_send_.push_back(id);
          }
          unacked_before.clear();
          for (const auto& [id, r] : unacked_) unacked_before.push_back(id);
          next_resend = std::chrono::steady_clock::now() + kResendAfter;
        }
        size_t bytes = 0;
        while (!to_send_.empty() && m.results_size() < kMaxResultsPerMessage &&
               bytes < kBatchBytes) {
          auto it = unacked_.find(to_send_.front());
          to_send_.pop_front();
          if (it == unacked_.end()) continue;
          bytes += it->second.output().size() + it->second.error().size() + 32;
          *m.add_results() = it->second;
          sent_in_session_.insert(it->first);
        }
        if (credits_to_send_ > 0 && !draining_) m.set_credits(credits_to_send_);
        credits_to_send_ = 0;
        if (draining_ && !drain_sent_) {
          m.set_draining(true);
          drain_sent_ = true;
        }
        if (leaving_ && to_send_.empty()) {
          m.set_bye(true);
          bye = true;
        }
      }
      const auto now = Clock::now();
      if (now >= next_heartbeat) {
        m.set_heartbeat(true);
        m.set_heartbeat_at(SteadyMs(now));
        next_heartbeat = now + heartbeat_interval;
      }
      if (m.ByteSizeLong() == 0) continue;
      if (!stream->Write(m)) return;
      if (bye) {
        stream->WritesDone();
        return;
      }
    }
  }

  void PoolLoop() {
    while (true) {
      TaskId id;
      int32_t attempt;
      std::string kind, payload;
      int64_t timeout_ms;
      std::shared_ptr<std::atomic<bool>> cancelled;
      {
        absl::MutexLock lock(&mu_);
        auto ready = [this]()
                         ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopped_ || !queue_.empty(); };
        mu_.Await(absl::Condition(&ready));
        if (stopped_) return;
        id = queue_.front();
        queue_.pop_front();
        Held& h = held_.at(id);
        h.running = true;
        attempt = h.attempt;
        kind = h.kind;
        payload = std::move(h.payload);
        timeout_ms = h.timeout_ms;
        cancelled = h.cancelled;
      }
      const auto start = std::chrono::steady_clock::now();
      v1::TaskResult result = Execute(id, attempt, kind, payload, timeout_ms, cancelled);
      const double took_us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
              .count();
      absl::MutexLock lock(&mu_);
      // A moving average over the last few dozen tasks.
      task_us_ewma_ = task_us_ewma_ <= 0 ? took_us : 0.95 * task_us_ewma_ + 0.05 * took_us;
      auto it = held_.find(id);
      const bool discard = it == held_.end() || it->second.discard;
      if (it != held_.end()) {
        discarded_ -= it->second.discard ? 1 : 0;
        held_.erase(it);
      }
      if (!discard) {
        unacked_[id] = std::move(result);
        to_send_.push_back(id);
      }
      TopUpCreditsLocked();
    }
  }

  v1::TaskResult Execute(TaskId id, int32_t attempt, const std::string& kind,
                         const std::string& payload, int64_t timeout_ms,
                         const std::shared_ptr<std::atomic<bool>>& cancelled) {
    v1::TaskResult r;
    r.set_task_id(id);
    r.set_attempt(attempt);
    const Handler* handler = registry_->Find(kind);
    if (!handler) {
      r.set_outcome(v1::TaskResult::FAILED);
      r.set_error(absl::StrCat("worker ", name_, " does not run kind '", kind, "'"));
      return r;
    }
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = timeout_ms > 0 ? start + std::chrono::milliseconds(timeout_ms)
                                         : std::chrono::steady_clock::time_point::max();
    TaskContext context(id, attempt, payload, deadline, cancelled);
    absl::StatusOr<std::string> output;
    try {
      output = (*handler)(context);
    } catch (const std::exception& e) {
      output = absl::InternalError(absl::StrCat("handler threw: ", e.what()));
    }
    if (cancelled->load()) {
      r.set_outcome(v1::TaskResult::CANCELLED);
      r.set_error("cancelled while running");
    } else if (std::chrono::steady_clock::now() >= deadline) {
      r.set_outcome(v1::TaskResult::FAILED);
      r.set_error(absl::StrCat("timed out after ", timeout_ms, " ms"));
    } else if (output.ok() && output->size() > max_output_) {
      // It could never reach the master: a result the stream cannot carry would be refused,
      // and resent, forever.
      r.set_outcome(v1::TaskResult::FAILED);
      r.set_error(absl::StrCat("output of ", output->size(), " bytes is over the ", max_output_,
                               " a result may carry (--max-message-bytes)"));
      r.set_permanent(true);
    } else if (output.ok()) {
      r.set_outcome(v1::TaskResult::SUCCEEDED);
      r.set_output(std::move(*output));
    } else {
      r.set_outcome(v1::TaskResult::FAILED);
      // A text field: the master cannot even parse a message whose text is not UTF-8, so an
      // error carrying outside bytes would stop this worker's stream for good.
      const absl::string_view message = output.status().message();
      r.set_error(ValidUtf8(std::string_view(message.data(), message.size()), kMaxErrorBytes));
      r.set_permanent(absl::IsInvalidArgument(output.status()));
    }
    log_->debug("task {} attempt {} ({}): {}", id, attempt, kind,
                v1::TaskResult::Outcome_Name(r.outcome()));
    return r;
  }

  const WorkerOptions options_;
  const Registry* const registry_;
  const std::shared_ptr<spdlog::logger> log_;
  const std::string host_;
  const std::string name_;
  const std::string worker_id_;
  const int threads_;
  const size_t max_output_;  // largest output one result message can carry
  std::vector<std::thread> pool_;
  std::thread session_thread_;
  std::thread watchdog_;

  mutable absl::Mutex mu_;
  std::map<TaskId, Held> held_ ABSL_GUARDED_BY(mu_);
  int32_t discarded_ ABSL_GUARDED_BY(mu_) = 0;     // entries of held_ running only to be dropped
  std::deque<TaskId> queue_ ABSL_GUARDED_BY(mu_);  // held, not started, in arrival order
  // Results (and give-backs) until the master acknowledges them; sent again after a reconnect.
  std::map<TaskId, v1::TaskResult> unacked_ ABSL_GUARDED_BY(mu_);
  std::deque<TaskId> to_send_ ABSL_GUARDED_BY(mu_);        // unacked results not written yet
  std::set<TaskId> sent_in_session_ ABSL_GUARDED_BY(mu_);  // results written on this stream
  // Streams the master ended while these unacknowledged results were on them.
  std::map<TaskId, int> refusals_ ABSL_GUARDED_BY(mu_);
  int32_t credits_to_send_ ABSL_GUARDED_BY(mu_) = 0;     // granted, not written yet
  int32_t outstanding_credit_ ABSL_GUARDED_BY(mu_) = 0;  // granted this session, not used yet
  double task_us_ewma_ ABSL_GUARDED_BY(mu_) = 0;         // how long tasks take; 0: unknown
  std::set<TaskId> recent_cancels_ ABSL_GUARDED_BY(mu_);
  std::deque<TaskId> recent_cancels_order_ ABSL_GUARDED_BY(mu_);
  std::string epoch_ ABSL_GUARDED_BY(mu_);
  std::string secret_ ABSL_GUARDED_BY(mu_);  // from the welcome; shown in the next hello
  // The session's call, from its hello to its end; the watchdog and Abort cancel it.
  std::shared_ptr<grpc::ClientContext> live_context_ ABSL_GUARDED_BY(mu_);
  bool cut_ ABSL_GUARDED_BY(mu_) = false;       // the watchdog cancelled this session already
  bool welcomed_ ABSL_GUARDED_BY(mu_) = false;  // this session got its welcome
  Clock::time_point session_started_ ABSL_GUARDED_BY(mu_);  // its hello left
  Clock::time_point heard_at_ ABSL_GUARDED_BY(mu_);         // its last message from the master
  // The master's timers, from its last welcome; the lease is 0 until one came.
  std::chrono::milliseconds heartbeat_ ABSL_GUARDED_BY(mu_) = kDefaultHeartbeat;
  std::chrono::milliseconds lease_ ABSL_GUARDED_BY(mu_){0};
  // The master echoes heartbeats: only then can silence be told and leases be fenced.
  bool echoes_ ABSL_GUARDED_BY(mu_) = false;
  // When the leases this worker holds may lapse on the master, less a margin: tasks still held
  // then are stopped (FenceLocked).
  Clock::time_point fence_at_ ABSL_GUARDED_BY(mu_);
  bool session_open_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool drain_sent_ ABSL_GUARDED_BY(mu_) = false;
  bool leaving_ ABSL_GUARDED_BY(mu_) = false;  // say bye, then no more sessions
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;  // pool threads exit
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
  // Until a welcome says how long leases last.
  if (options.master.keepalive_ms == 0) options.master.keepalive_ms = 30'000;
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
