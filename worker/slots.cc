// The worker's accounting: which tasks it holds, what it grants, what it owes the master, and when
// it must stop its tasks because their leases may have lapsed.
#include "worker/slots.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/limits.h"
#include "common/util.h"

namespace taskmaster::worker {
namespace {

// Results per message: bounds one write when many piled up during an outage.
constexpr size_t kMaxResultsPerMessage = 1000;
// Cancels that arrived before their task (messages can pass each other), remembered this many.
constexpr size_t kRecentCancels = 4096;
// Results unacknowledged this long are sent again on the same stream.
constexpr auto kResendAfter = std::chrono::seconds(10);
// After the drain, how long results may wait for the master's acknowledgement.
constexpr auto kAckGrace = std::chrono::seconds(5);
// After the drain, how long the sender's bye may take to end the stream before it is cut.
constexpr auto kByeGrace = std::chrono::seconds(5);
// A master silent for this many heartbeat intervals is given up on: a fresh connection gets
// through where a stalled one sits in TCP's retransmission backoff.
constexpr int kSilentHeartbeats = 3;
// A result whose sending ended the master's stream this many times is given up on.
constexpr int kMaxRefusals = 5;
// The longest wait between reconnects while the worker holds tasks or results.
constexpr auto kHurried = std::chrono::milliseconds(1'000);
// Until a master says otherwise (in its welcome).
constexpr auto kDefaultHeartbeat = std::chrono::milliseconds(5'000);
// The shortest heartbeat interval a welcome may set: a smaller one would make the sender spin.
constexpr int64_t kMinHeartbeatMs = 100;
// The weight of the newest task in the moving average of task times: about the last few dozen
// tasks count.
constexpr double kTaskTimeWeight = 0.05;

}  // namespace

const char* OutcomeName(Outcome outcome) {
  switch (outcome) {
    case Outcome::kSucceeded:
      return "SUCCEEDED";
    case Outcome::kFailed:
      return "FAILED";
    case Outcome::kCancelled:
      return "CANCELLED";
    case Outcome::kReturned:
      return "RETURNED";
  }
  return "OUTCOME_UNSPECIFIED";
}

Slots::Slots(SlotsOptions options) : options_(std::move(options)), heartbeat_(kDefaultHeartbeat) {}

// Waits on the monotonic clock (this abseil's timed waits sleep until a wall-clock deadline,
// which a clock step moves); returns `done`'s value. The watchdog passes through the lock often
// enough to end the wait on time.
template <typename Done>
bool Slots::AwaitUntilLocked(Done done, Time deadline) {
  auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return done() || options_.now() >= deadline;
  };
  mu_.Await(absl::Condition(&ready));
  return done();
}

// ---- The pool ----

std::optional<Assignment> Slots::TryNextTask() {
  absl::MutexLock lock(&mu_);
  if (stopped_ || queue_.empty()) return std::nullopt;
  const TaskId id = queue_.front();
  queue_.pop_front();
  Held& h = held_.at(id);
  h.running = true;
  if (h.task.timeout_ms > 0) {
    h.deadline = options_.now() + std::chrono::milliseconds(h.task.timeout_ms);
  }
  return Assignment{.task = {.task_id = id,
                             .attempt = h.task.attempt,
                             .kind = h.task.kind,
                             .payload = std::move(h.task.payload),
                             .timeout_ms = h.task.timeout_ms},
                    .cancelled = h.cancelled,
                    .delivery = h.delivery};
}

std::optional<ToMaster> Slots::Finish(uint64_t delivery, Result result,
                                      std::chrono::steady_clock::duration took, bool take) {
  const double took_us = std::chrono::duration<double, std::micro>(took).count();
  std::optional<ToMaster> out;
  bool waiting;
  {
    absl::MutexLock lock(&mu_);
    task_us_ewma_ = task_us_ewma_ <= 0
                        ? took_us
                        : (1 - kTaskTimeWeight) * task_us_ewma_ + kTaskTimeWeight * took_us;
    if (auto it = held_.find(result.task_id);
        it != held_.end() && it->second.delivery == delivery) {
      held_.erase(it);
      AddResultLocked(std::move(result));
    } else if (auto orphan = orphans_.find(delivery); orphan != orphans_.end()) {
      stuck_ -= orphan->second ? 1 : 0;
      orphans_.erase(orphan);
    }
    TopUpCreditsLocked();
    waiting = TakeOthersWaitingLocked();
    // Only when no task waits for a thread: under load the results gather while the pool works
    // and leave together with the sender (a message each would cost most of the throughput).
    // And only in the plain case: a drain or a goodbye is the sender's to write.
    if (take && queue_.empty() && !sending_ && session_open_ && !draining_ && !leaving_ &&
        !to_send_.empty()) {
      sending_ = true;
      out = TakeLocked();
    }
  }
  TellRoom(waiting);
  return out;
}

void Slots::TopUp() {
  absl::MutexLock lock(&mu_);
  TopUpCreditsLocked();
}

void Slots::TellRoom(bool waiting) {
  if (waiting && options_.on_room) options_.on_room();
}

void Slots::ReportProgress(TaskId id, uint64_t delivery, Progress progress) {
  absl::MutexLock lock(&mu_);
  // Only from the task's own handler: not an orphan's, whose task id may be held anew.
  auto it = held_.find(id);
  if (it == held_.end() || it->second.delivery != delivery || !it->second.running) return;
  it->second.progress = std::move(progress);
  progress_pending_ = true;
}

// ---- The session ----

std::optional<HelloState> Slots::BeginSession(uint64_t session) {
  absl::MutexLock lock(&mu_);
  if (leaving_) return std::nullopt;
  live_session_ = session;
  cut_ = false;
  welcomed_ = false;
  session_started_ = options_.now();
  HelloState hello{.held = {}, .master_epoch = epoch_, .worker_secret = secret_, .lease = lease_};
  for (const auto& [id, h] : held_) hello.held.push_back({id, h.task.attempt});
  for (const auto& [id, r] : unacked_) {
    if (!held_.contains(id)) hello.held.push_back({id, r.attempt});
  }
  return hello;
}

std::optional<std::string> Slots::Welcomed(const Welcome& welcome) {
  bool waiting = false;
  std::optional<std::string> lost_state = ApplyWelcome(welcome, waiting);
  TellRoom(waiting);
  return lost_state;
}

std::optional<std::string> Slots::ApplyWelcome(const Welcome& welcome, bool& waiting) {
  absl::MutexLock lock(&mu_);
  std::optional<std::string> lost_state;
  if (!epoch_.empty() && epoch_ != welcome.master_epoch) {
    lost_state = absl::StrCat("the master lost its state (epoch ", epoch_, " -> ",
                              welcome.master_epoch, "): dropping ", held_.size(),
                              " held tasks and ", unacked_.size(), " unacknowledged results");
    std::vector<TaskId> ids;
    for (const auto& [id, h] : held_) ids.push_back(id);
    for (TaskId id : ids) RevokeLocked(id);
    unacked_.clear();
    refusals_.clear();
    // Ids of the lost state: a cancel remembered for one must not stop a new task of that id.
    recent_cancels_.clear();
    recent_cancels_order_.clear();
  }
  for (const TaskRef& ref : welcome.revoked) {
    if (held_.contains(ref.task_id)) RevokeLocked(ref.task_id);
    unacked_.erase(ref.task_id);
  }
  epoch_ = welcome.master_epoch;
  heartbeat_ =
      std::chrono::milliseconds(std::max<int64_t>(kMinHeartbeatMs, welcome.heartbeat_interval_ms));
  lease_ = std::chrono::milliseconds(std::max<int64_t>(0, welcome.lease_timeout_ms));
  echoes_ = welcome.echoes_heartbeats;
  secret_ = welcome.worker_secret;
  const Time now = options_.now();
  heard_at_ = now;
  welcomed_ = true;
  // Attaching extended every lease this worker kept: from when the hello left at the latest.
  LeasesHeldSinceLocked(session_started_);
  to_send_.clear();
  for (const auto& [id, r] : unacked_) to_send_.push_back(id);
  unacked_before_.clear();
  resend_at_ = now + kResendAfter;
  heartbeat_due_ = now;  // at once: its echo tells how long the leases hold
  credits_to_send_ = 0;
  outstanding_credit_ = 0;
  drain_sent_ = false;
  drain_heartbeat_.reset();
  drain_echoed_ = false;
  session_open_ = true;
  TopUpCreditsLocked();
  waiting = TakeOthersWaitingLocked();
  return lost_state;
}

void Slots::Received(FromMaster in) {
  const bool tasks = !in.tasks.empty();
  const bool waiting = ApplyReceived(std::move(in));
  if (tasks && options_.on_ready) options_.on_ready();
  TellRoom(waiting);
}

bool Slots::ApplyReceived(FromMaster in) {
  absl::MutexLock lock(&mu_);
  heard_at_ = options_.now();
  if (in.heartbeat_echo) {
    LeasesHeldSinceLocked(*in.heartbeat_echo);
    if (drain_heartbeat_ && *in.heartbeat_echo >= *drain_heartbeat_) drain_echoed_ = true;
  }
  outstanding_credit_ = std::max(0, outstanding_credit_ - static_cast<int32_t>(in.tasks.size()));
  for (Task& t : in.tasks) {
    const TaskId id = t.task_id;
    if (held_.contains(id)) continue;  // delivered twice
    if (recent_cancels_.erase(id) > 0) {
      AddResultLocked({id, t.attempt, Outcome::kCancelled, "", "cancelled"});
      continue;
    }
    if (draining_) {
      AddResultLocked({id, t.attempt, Outcome::kReturned, "", ""});
      continue;
    }
    Held& h = held_[id];
    h.task = std::move(t);
    h.delivery = next_delivery_++;
    queue_.push_back(id);
  }
  for (TaskId id : in.cancel) {
    auto it = held_.find(id);
    if (it == held_.end()) {
      RememberCancelLocked(id);
    } else if (it->second.running) {
      it->second.cancelled->store(true);
    } else {
      AddResultLocked({id, it->second.task.attempt, Outcome::kCancelled, "", "cancelled"});
      std::erase(queue_, id);
      held_.erase(it);
    }
  }
  for (const TaskRef& ref : in.acked) {
    auto it = unacked_.find(ref.task_id);
    if (it != unacked_.end() && it->second.attempt == ref.attempt) {
      unacked_.erase(it);
      refusals_.erase(ref.task_id);
    }
  }
  TopUpCreditsLocked();
  return TakeOthersWaitingLocked();
}

void Slots::RememberCancelLocked(TaskId id) {
  if (recent_cancels_order_.size() >= kRecentCancels) {
    recent_cancels_.erase(recent_cancels_order_.front());
    recent_cancels_order_.pop_front();
  }
  recent_cancels_.insert(id);
  recent_cancels_order_.push_back(id);
}

std::optional<ToMaster> Slots::NextToSend() {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!session_open_) return true;
    if (sending_) return false;
    const Time now = options_.now();
    return !to_send_.empty() || credits_to_send_ > 0 || (draining_ && !drain_sent_) || leaving_ ||
           (progress_pending_ && now >= progress_due_) || now >= heartbeat_due_;
  };
  mu_.Await(absl::Condition(&ready));
  if (!session_open_) return std::nullopt;
  sending_ = true;
  return TakeLocked();
}

void Slots::Sent() {
  absl::MutexLock lock(&mu_);
  sending_ = false;
}

void Slots::AwaitNotSending() {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !sending_; };
  mu_.Await(absl::Condition(&idle));
}

ToMaster Slots::TakeLocked() {
  const Time now = options_.now();
  if (now >= resend_at_) {
    // Still unacknowledged a whole period later: the master could not store them (its disk was
    // full, say). Send them again; it records each result once.
    for (TaskId id : unacked_before_) {
      if (unacked_.contains(id)) to_send_.push_back(id);
    }
    unacked_before_.clear();
    for (const auto& [id, r] : unacked_) unacked_before_.push_back(id);
    resend_at_ = now + kResendAfter;
  }
  ToMaster out;
  size_t bytes = 0;
  while (!to_send_.empty() && out.results.size() < kMaxResultsPerMessage &&
         (out.results.empty() || bytes < options_.batch_bytes)) {
    auto it = unacked_.find(to_send_.front());
    to_send_.pop_front();
    if (it == unacked_.end()) continue;
    bytes += it->second.output.size() + it->second.error.size() + kItemOverheadBytes;
    out.results.push_back(it->second);
    sent_in_session_.insert(it->first);
  }
  if (credits_to_send_ > 0 && !draining_) {
    out.credits = credits_to_send_;
    // Measured: at least 1 µs, as 0 says "not measured".
    if (task_us_ewma_ > 0) out.task_us = std::max<int64_t>(1, std::llround(task_us_ewma_));
  }
  credits_to_send_ = 0;
  if (draining_ && !drain_sent_) {
    out.draining = true;
    drain_sent_ = true;
  }
  out.bye = leaving_ && to_send_.empty();
  if (progress_pending_ && now >= progress_due_) {
    for (auto& [id, h] : held_) {
      if (!h.progress) continue;
      out.progress.push_back({.task_id = id,
                              .attempt = h.task.attempt,
                              .done = h.progress->done,
                              .total = h.progress->total,
                              .message = std::move(h.progress->message)});
      h.progress.reset();
    }
    progress_pending_ = false;
    progress_due_ = now + options_.progress_interval;
  }
  // The drain goes with a heartbeat: its echo comes after every task the master sent before it
  // saw the drain, so once it is back no task is still on its way (see FinishDrain).
  if (now >= heartbeat_due_ || out.draining) {
    if (out.draining) drain_heartbeat_ = now;
    out.heartbeat_at = now;
    out.stuck = stuck_;
    heartbeat_due_ = now + heartbeat_;
  }
  return out;
}

void Slots::CloseSession() {
  bool waiting;
  {
    absl::MutexLock lock(&mu_);
    session_open_ = false;
    waiting = RecordUseLocked();  // its credits are void: the others may use the room
  }
  TellRoom(waiting);
}

std::vector<std::string> Slots::SessionEnded(bool master_stopping, std::string_view error) {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> given_up;
  // A stream the master ended, not us, with results of ours unacknowledged on it.
  if (!cut_ && !leaving_ && !master_stopping) given_up = CountRefusalsLocked(error);
  sent_in_session_.clear();
  live_session_ = 0;
  return given_up;
}

// Results the master keeps refusing (it ends the stream each time one arrives: it cannot read it,
// say) would be resent forever and keep this worker from doing anything else: after kMaxRefusals
// such ends, a result is given up on.
std::vector<std::string> Slots::CountRefusalsLocked(std::string_view error) {
  std::vector<std::string> given_up;
  for (TaskId id : sent_in_session_) {
    auto it = unacked_.find(id);
    if (it == unacked_.end() || ++refusals_[id] < kMaxRefusals) continue;
    given_up.push_back(absl::StrCat(
        "giving up on the result of task ", id, " attempt ", it->second.attempt, " (",
        OutcomeName(it->second.outcome), ", ", it->second.output.size(),
        " bytes of output): the master ended the stream each of the last ", kMaxRefusals,
        " times it was sent (", Printable(error), "); the task runs again once its lease lapses"));
    unacked_.erase(it);
    refusals_.erase(id);
  }
  return given_up;
}

std::chrono::milliseconds Slots::ReconnectDelay(std::chrono::milliseconds wait) const {
  absl::MutexLock lock(&mu_);
  // Holding tasks, the worker must be back before their leases lapse, and a restarted master
  // waits for it before it hands anything out: retry at least every second.
  if (!held_.empty() || !unacked_.empty()) return std::min({wait, heartbeat_, kHurried});
  return wait;
}

bool Slots::Leaving() const {
  absl::MutexLock lock(&mu_);
  return leaving_;
}

bool Slots::AwaitLeaving(std::chrono::milliseconds wait) {
  absl::MutexLock lock(&mu_);
  return AwaitUntilLocked([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return leaving_; },
                          options_.now() + wait);
}

// A connection that gets no welcome, or a master that went silent, is cut so the session loop
// reconnects afresh; and tasks whose leases are about to lapse on the master are stopped, so they
// never run in two places at once.
std::optional<WatchReport> Slots::Watch() {
  bool waiting = false;
  std::optional<WatchReport> report = WatchPass(waiting);
  TellRoom(waiting);
  return report;
}

std::optional<WatchReport> Slots::WatchPass(bool& waiting) {
  absl::MutexLock lock(&mu_);
  if (stopped_) return std::nullopt;
  WatchReport report;
  report.lease = lease_;
  const Time now = options_.now();
  const auto silence = kSilentHeartbeats * heartbeat_;
  if (live_session_ != 0 && !cut_) {
    // A master that accepted the connection but says nothing (paused, or its answer lost in a
    // partition): try again, though not so soon that a busy master never makes it.
    if (!welcomed_ && now - session_started_ > std::max({silence, lease_ / 2, kHurried})) {
      report.why = "no welcome";
    } else if (session_open_ && echoes_ && now - heard_at_ > silence) {
      report.why = absl::StrCat(
          "no word for ",
          std::chrono::duration_cast<std::chrono::milliseconds>(now - heard_at_).count(), " ms");
    }
    if (!report.why.empty()) {
      report.cut_session = live_session_;
      cut_ = true;
    }
  }
  if (echoes_ && lease_.count() > 0 && now > fence_at_) FenceLocked(&report);
  ReportStuckLocked(&report);
  // Fewer held: the others may use the room.
  if (report.stopped + report.dropped > 0) waiting = RecordUseLocked();
  return report;
}

// A handler that ignores its deadline must not hold its result back forever: past the deadline
// (and a grace to return on its own) the task is reported timed out, and whatever the handler
// returns later is dropped. Its thread stays busy meanwhile, and counts so.
void Slots::ReportStuckLocked(WatchReport* report) {
  const Time now = options_.now();
  for (auto it = held_.begin(); it != held_.end();) {
    const Held& h = it->second;
    // As a difference: a task without a deadline has Time::max(), which no sum may reach.
    if (!h.running || now - h.deadline < kStuckGrace) {
      ++it;
      continue;
    }
    report->stuck.push_back({it->first, h.task.attempt});
    AddResultLocked({.task_id = it->first,
                     .attempt = h.task.attempt,
                     .outcome = Outcome::kFailed,
                     .output = {},
                     .error = absl::StrCat("timed out after ", h.task.timeout_ms,
                                           " ms; the handler did not stop, and its thread on "
                                           "the worker stays busy until it does"),
                     .permanent = false});
    it = OrphanLocked(it, /*stuck=*/true);
  }
}

int32_t Slots::Stuck() const {
  absl::MutexLock lock(&mu_);
  return stuck_;
}

// Stops every task whose lease may lapse on the master: results not yet acknowledged are kept.
void Slots::FenceLocked(WatchReport* report) {
  for (auto it = held_.begin(); it != held_.end();) {
    if (it->second.running) {
      it = OrphanLocked(it, /*stuck=*/false);
      ++report->stopped;
    } else {
      std::erase(queue_, it->first);
      it = held_.erase(it);
      ++report->dropped;
    }
  }
}

// The master extended this worker's leases at `since` at the latest: they hold for a lease period
// from then. The worker stops its tasks a little earlier than the master would expire them: a
// tenth of the lease, at least two watchdog periods.
void Slots::LeasesHeldSinceLocked(Time since) {
  const auto margin =
      std::max<std::chrono::steady_clock::duration>(lease_ / 10, 2 * kWatchdogPeriod);
  fence_at_ = std::max(fence_at_, since + lease_ - margin);
}

// Tasks to hold beyond the running ones. Adaptive: enough to keep the threads busy for the
// prefetch window while the next tasks travel, judged from how long tasks take; so short tasks
// stream without a round trip between them, and long ones never queue behind each other.
int32_t Slots::PrefetchLocked() const {
  if (options_.prefetch >= 0) return options_.prefetch;
  if (task_us_ewma_ <= 0) return options_.threads;  // nothing measured yet
  const double window_us =
      std::chrono::duration<double, std::micro>(options_.prefetch_window).count();
  const double want = options_.threads * window_us / task_us_ewma_;
  return static_cast<int32_t>(std::clamp<double>(want, 0, options_.prefetch_max));
}

// Grants the master what the worker can take now: its threads plus prefetch, less what it holds
// and what it granted already; with shared credits, this partition's part of that.
void Slots::TopUpCreditsLocked() {
  const bool granting = !draining_ && session_open_;
  const int32_t want = AllowLocked(granting ? options_.threads + PrefetchLocked() : 0);
  if (granting && want > 0) {
    credits_to_send_ += want;
    outstanding_credit_ += want;
  }
}

int32_t Slots::AllowLocked(int32_t capacity) {
  const auto held = static_cast<int32_t>(held_.size()) + stuck_;
  if (!options_.shared_credits) return capacity - held - outstanding_credit_;
  // A closed session's credits are void (the next welcome starts from none).
  return options_.shared_credits->Allow(options_.member, held,
                                        session_open_ ? outstanding_credit_ : 0, capacity);
}

bool Slots::TakeOthersWaitingLocked() {
  return options_.shared_credits && options_.shared_credits->TakeWaiting(options_.member);
}

bool Slots::RecordUseLocked() {
  AllowLocked(0);
  return TakeOthersWaitingLocked();
}

int32_t SharedCredits::Allow(size_t member, int32_t held, int32_t outstanding, int32_t capacity) {
  absl::MutexLock lock(&mu_);
  if (members_.size() <= member) members_.resize(member + 1);
  Use& use = members_[member];
  if (use.held > 0 && held == 0) {
    // One partition fewer with tasks: the others' shares grow.
    for (Use& u : members_) u.waiting = u.waiting || u.held > 0;
  }
  use = {.held = held, .outstanding = outstanding, .capacity = capacity};
  int64_t busy = 0;       // partitions with tasks
  int64_t busy_used = 0;  // their tasks and credits
  int64_t pool = 0;       // the most any of them takes
  for (const Use& u : members_) {
    if (u.held > 0) {
      ++busy;
      busy_used += u.held + u.outstanding;
      pool = std::max<int64_t>(pool, u.capacity);
    }
  }
  const auto parts = [](int64_t whole, int64_t n) { return (whole + n - 1) / n; };
  int64_t allow;
  if (capacity <= 0) {
    allow = 0;
  } else if (held == 0) {
    // With no partition busy a burst anywhere starts at once; otherwise one credit waits.
    allow = (busy == 0 ? parts(capacity, static_cast<int64_t>(members_.size())) : 1) - outstanding;
  } else {
    // The pool as the most demanding busy partition sees it (one of short tasks prefetches
    // more), shared equally, each within what it takes itself.
    const int64_t share = std::min<int64_t>(capacity, parts(pool, busy));
    const int64_t used = held + outstanding;
    allow = std::min(pool - busy_used, share - used);
    // Held back below its share by the others' tasks: their finishes open room for it.
    use.waiting = used < share && allow < share - used;
  }
  allow = std::max<int64_t>(0, allow);
  use.outstanding += static_cast<int32_t>(allow);
  return static_cast<int32_t>(allow);
}

bool SharedCredits::TakeWaiting(size_t member) {
  absl::MutexLock lock(&mu_);
  bool any = false;
  for (size_t i = 0; i < members_.size(); ++i) {
    if (i != member && members_[i].waiting) {
      members_[i].waiting = false;
      any = true;
    }
  }
  return any;
}

// Drops a held task: a queued one now, a running one when its handler returns.
void Slots::RevokeLocked(TaskId id) {
  auto it = held_.find(id);
  if (it->second.running) {
    OrphanLocked(it, /*stuck=*/false);
  } else {
    std::erase(queue_, id);
    held_.erase(it);
  }
}

std::map<TaskId, Slots::Held>::iterator Slots::OrphanLocked(std::map<TaskId, Held>::iterator it,
                                                            bool stuck) {
  it->second.cancelled->store(true);
  orphans_[it->second.delivery] = stuck;
  stuck_ += stuck ? 1 : 0;
  return held_.erase(it);
}

void Slots::AddResultLocked(Result result) {
  const TaskId id = result.task_id;
  unacked_[id] = std::move(result);
  to_send_.push_back(id);
}

// ---- The worker's life ----

std::optional<Slots::DrainStart> Slots::StartDrain() {
  absl::MutexLock lock(&mu_);
  if (stopped_ || draining_) return std::nullopt;
  draining_ = true;
  credits_to_send_ = 0;
  // Give back what has not started; the master requeues it without using an attempt.
  DrainStart start{.returned = queue_.size()};
  for (TaskId id : queue_) {
    AddResultLocked({id, held_.at(id).task.attempt, Outcome::kReturned, "", ""});
    held_.erase(id);
  }
  queue_.clear();
  start.running = held_.size();
  return start;
}

Slots::DrainEnd Slots::FinishDrain(Time deadline) {
  absl::MutexLock lock(&mu_);
  DrainEnd end;
  // Tasks the master sent before it saw the drain are given back as they arrive: wait for them
  // (for the drain's echo), unless there is no stream to bring them or the master echoes nothing.
  AwaitUntilLocked([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(
                       mu_) { return drain_echoed_ || !session_open_ || !echoes_; },
                   deadline);
  AwaitUntilLocked(
      [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return held_.empty() && orphans_.empty(); },
      deadline);
  end.unfinished = held_.size() + orphans_.size();
  AwaitUntilLocked([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return unacked_.empty(); },
                   deadline + kAckGrace);
  end.unacked = unacked_.size();
  leaving_ = true;
  // The sender says bye and the stream ends; wait a little for that before cutting it.
  AwaitUntilLocked([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !session_open_; },
                   options_.now() + kByeGrace);
  return end;
}

bool Slots::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) return false;
    stopped_ = true;
    leaving_ = true;
    for (auto& [id, h] : held_) h.cancelled->store(true);
    queue_.clear();
  }
  if (options_.on_ready) options_.on_ready();
  return true;
}

bool Slots::Stopped() const {
  absl::MutexLock lock(&mu_);
  return stopped_;
}

}  // namespace taskmaster::worker
