// The worker's slots and credits: the tasks it holds, the credits it grants, the results it keeps
// until the master acknowledges them, and the lease fence. Plain C++: the session and the pool
// drive it, and unit tests drive it with a fake clock.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "taskmaster/worker.h"
#include "worker/messages.h"

namespace taskmaster::worker {

// How often the watchdog looks at the session (Slots::Watch). Every timed wait of Slots ends
// within this of its deadline: the watchdog's pass through the lock re-evaluates them.
inline constexpr auto kWatchdogPeriod = std::chrono::milliseconds(50);
// How long past its deadline a handler may take to return on its own (it sees ShouldStop) before
// its task is reported timed out without it.
inline constexpr auto kStuckGrace = std::chrono::milliseconds(500);

// The credits of one pool's slots, one slots per partition of the queues (each with a stream to
// the master serving it), shared out: the partitions with tasks share the pool's threads and
// prefetch, in equal parts when each wants more, while a partition without any keeps one credit,
// so that its master can hand it a task at once; when none has tasks, each is granted its part.
// Without it, each partition's master would be granted the whole pool, and a worker of N
// partitions would hold up to N times what it runs. Credits granted cannot be taken back, so a
// partition whose tasks ran out keeps what it was granted; the others share the pool without
// counting it. Thread-safe; the slots call it under their own locks (it takes only its own).
class SharedCredits {
 public:
  // Slots `member` holds `held` tasks with `outstanding` credits granted and not used, and would
  // take `capacity` (its threads and prefetch; 0 while it grants nothing). Returns how many more
  // it may grant now, counted as granted.
  int32_t Allow(size_t member, int32_t held, int32_t outstanding, int32_t capacity);
  // Called by `member` after its tasks changed: whether another partition with tasks was held
  // back below its share, or saw its share grow (one partition fewer has tasks), since. Every slots
  // is then asked to top up (Slots::TopUp), as room may have opened.
  bool TakeWaiting(size_t member);

 private:
  struct Use {
    int32_t held = 0;
    int32_t outstanding = 0;
    int32_t capacity = 0;
    bool waiting = false;  // held back below its share, or its share grew
  };
  absl::Mutex mu_;
  std::vector<Use> members_ ABSL_GUARDED_BY(mu_);
};

// The worker fills these from WorkerOptions, whose fields of the same names say what they mean
// and their defaults.
struct SlotsOptions {
  int threads = 1;   // tasks run at once
  int prefetch = 0;  // -1: adaptive
  int prefetch_max = 0;
  std::chrono::milliseconds prefetch_window{0};
  // A message of results closes once it holds about this many bytes (the worker passes
  // kBatchBytes); it carries one result at least, whatever its size.
  size_t batch_bytes = 0;
  // Progress reports reach the master at most this often, the latest of each task in one message.
  std::chrono::milliseconds progress_interval{500};
  // Runs (outside the lock) once tasks were queued, and once the slots stopped: a pool that takes
  // from several slots waits for it (see Feed).
  std::function<void()> on_ready;
  // The pool's credits, shared with its other partitions' slots (this one is `member`); null:
  // this slots grants the whole pool. `on_room` runs (outside the lock) when another's slots may
  // now grant more: it calls their TopUp.
  std::shared_ptr<SharedCredits> shared_credits = nullptr;
  size_t member = 0;
  std::function<void()> on_room = nullptr;
  // The monotonic clock; tests pass a fake one.
  std::function<Time()> now = [] { return std::chrono::steady_clock::now(); };
};

// A task handed to a pool thread, with the flag that tells its handler to stop.
struct Assignment {
  Task task;
  std::shared_ptr<std::atomic<bool>> cancelled;
  // Which delivery of the task this is: the master may lease the same task id again (a retry, a
  // reused id after it lost its state) while a handler it gave up on still runs.
  uint64_t delivery = 0;
};

// What a new stream's hello carries of the worker's state.
struct HelloState {
  std::vector<TaskRef> held;           // queued, running, or with a result not yet acknowledged
  std::string master_epoch;            // the epoch they came from
  std::string worker_secret;           // from the last welcome
  std::chrono::milliseconds lease{0};  // the master's lease; 0 until a welcome said
};

// What the watchdog found on one pass.
struct WatchReport {
  uint64_t cut_session = 0;  // the session to cut and reconnect afresh; 0: none
  std::string why;           // why it is cut
  size_t stopped = 0;        // running tasks stopped before their leases lapse
  size_t dropped = 0;        // queued tasks dropped for the same reason
  std::chrono::milliseconds lease{0};
  // Handlers found past their deadline (and kStuckGrace) on this pass: their tasks are reported
  // timed out; their threads stay busy until they return.
  std::vector<TaskRef> stuck;
};

// Thread-safe: one mutex guards every field, and no call does I/O or runs a handler under it.
// Only NextToSend, FinishDrain and AwaitLeaving block; timed waits end when the clock
// passes their deadline at the next call that takes the lock (the watchdog's Watch, at least).
class Slots {
 public:
  explicit Slots(SlotsOptions options);
  Slots(const Slots&) = delete;
  Slots& operator=(const Slots&) = delete;

  Time Now() const { return options_.now(); }

  // ---- The pool ----

  // Marks the first queued task running; nullopt when none is queued or the worker stopped. The
  // pool waits for on_ready between tries (see Feed).
  std::optional<Assignment> TryNextTask();
  // The handler of `delivery` returned after `took`: its result waits for the master's
  // acknowledgement, unless the task was revoked, fenced or reported stuck meanwhile. With
  // `take`, when no task is queued, nothing is being written and the session is open, returns
  // what the caller is to write itself, then call Sent: the result leaves without a hand-off to
  // the sender's thread.
  std::optional<ToMaster> Finish(uint64_t delivery, Result result,
                                 std::chrono::steady_clock::duration took, bool take = false);
  // The handler of `delivery` says how far it has come: kept (the latest only) and sent with the
  // next message at most every progress_interval. Cheap enough to call in a handler's loop.
  void ReportProgress(TaskId id, uint64_t delivery, Progress progress);

  // ---- The session ----

  // A new stream, numbered `session` (non-zero, increasing): what its hello says; nullopt when
  // the worker is leaving.
  std::optional<HelloState> BeginSession(uint64_t session);
  // The master's welcome opens the session. Returns what to tell the operator when the master
  // lost its state (and with it this worker's tasks and results).
  std::optional<std::string> Welcomed(const Welcome& welcome);
  void Received(FromMaster message);
  // Blocks until there is something to write or a heartbeat is due, and nobody else is writing;
  // nullopt once the session closed. The caller writes it, then calls Sent.
  std::optional<ToMaster> NextToSend();
  // What NextToSend or Finish returned is written (or failed to be): another may write.
  void Sent();
  // Grants what the shared credits allow now (see SlotsOptions::on_room).
  void TopUp();
  // Waits until nobody writes: after CloseSession, before the stream goes.
  void AwaitNotSending();
  // The stream stopped reading: the sender stops too.
  void CloseSession();
  // The stream ended, with the master's `error` message. Returns what to log of the results
  // given up on: those on this stream when the master ended it once too often.
  std::vector<std::string> SessionEnded(bool master_stopping, std::string_view error);
  // How long to wait before the next connection, given the backoff's `wait`.
  std::chrono::milliseconds ReconnectDelay(std::chrono::milliseconds wait) const;
  bool Leaving() const;
  // Waits up to `wait` for the worker to leave; returns whether it does.
  bool AwaitLeaving(std::chrono::milliseconds wait);
  // The watchdog's pass: a session to cut, tasks to stop before their leases lapse on the
  // master; nullopt once the worker stopped.
  std::optional<WatchReport> Watch();

  // ---- The worker's life ----

  struct DrainStart {
    size_t returned = 0;  // queued tasks given back
    size_t running = 0;
  };
  // Stops taking tasks and gives back the queued ones; nullopt when draining or stopped already.
  std::optional<DrainStart> StartDrain();
  struct DrainEnd {
    size_t unfinished = 0;  // tasks still running at `deadline`
    size_t unacked = 0;     // results the master had not acknowledged
  };
  // Waits for the running tasks until `deadline`, for their acknowledgements a little longer,
  // then leaves: the sender says bye. Returns once the session closed, or a little later.
  DrainEnd FinishDrain(Time deadline);
  // Stops: pool threads exit, running handlers are told to stop, no more sessions. Returns false
  // when stopped already.
  bool Stop();
  bool Stopped() const;
  // Handlers still running past their deadline, their tasks reported timed out.
  int32_t Stuck() const;

 private:
  // A task this worker holds: queued or running.
  struct Held {
    Task task;  // its payload moves to the pool thread that runs it
    std::shared_ptr<std::atomic<bool>> cancelled = std::make_shared<std::atomic<bool>>(false);
    uint64_t delivery = 0;
    bool running = false;
    Time deadline = Time::max();       // from its start, when the task has a timeout
    std::optional<Progress> progress;  // the latest its handler reported, until sent
  };

  template <typename Done>
  bool AwaitUntilLocked(Done done, Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Received's work, under its own lock; Received tells on_ready (and on_room: the result)
  // after it.
  bool ApplyReceived(FromMaster in) ABSL_LOCKS_EXCLUDED(mu_);
  void AddResultLocked(Result result) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RevokeLocked(TaskId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A running handler whose result no longer counts leaves held_ for orphans_, told to stop:
  // the task id is free for the master to lease again.
  std::map<TaskId, Held>::iterator OrphanLocked(std::map<TaskId, Held>::iterator it, bool stuck)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FenceLocked(WatchReport* report) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReportStuckLocked(WatchReport* report) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LeasesHeldSinceLocked(Time since) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int32_t PrefetchLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The next message to write: results, credits, a drain, progress, a heartbeat when due.
  ToMaster TakeLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TopUpCreditsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What this slots may grant of `capacity` (threads and prefetch; 0: it grants nothing, and
  // only tells the shared credits what it holds).
  int32_t AllowLocked(int32_t capacity) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // After this slots' tasks changed: whether another partition's slots waits for room (to tell
  // on_room, once the lock is released).
  bool TakeOthersWaitingLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Tells the shared credits what this slots holds now, granting nothing (after a fence, or at
  // the session's end); returns TakeOthersWaitingLocked's answer.
  bool RecordUseLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Watch's and Welcomed's work, under their own lock; `waiting` as TakeOthersWaitingLocked
  // says (they tell on_room after it).
  std::optional<WatchReport> WatchPass(bool& waiting) ABSL_LOCKS_EXCLUDED(mu_);
  std::optional<std::string> ApplyWelcome(const Welcome& welcome, bool& waiting)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Tells on_room, outside the lock, when `waiting`.
  void TellRoom(bool waiting) ABSL_LOCKS_EXCLUDED(mu_);
  void RememberCancelLocked(TaskId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<std::string> CountRefusalsLocked(std::string_view error)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const SlotsOptions options_;

  mutable absl::Mutex mu_;
  // ---- Tasks ----
  std::map<TaskId, Held> held_ ABSL_GUARDED_BY(mu_);
  uint64_t next_delivery_ ABSL_GUARDED_BY(mu_) = 1;
  // Handlers still running whose results will be dropped (revoked, fenced, reported stuck), by
  // delivery: whether each was reported stuck. A stuck one keeps its thread busy, and so counts
  // against the credits.
  std::map<uint64_t, bool> orphans_ ABSL_GUARDED_BY(mu_);
  int32_t stuck_ ABSL_GUARDED_BY(mu_) = 0;         // orphans reported stuck
  std::deque<TaskId> queue_ ABSL_GUARDED_BY(mu_);  // held, not started, in arrival order
  // Cancels that arrived before their task (messages can pass each other), oldest first.
  std::set<TaskId> recent_cancels_ ABSL_GUARDED_BY(mu_);
  std::deque<TaskId> recent_cancels_order_ ABSL_GUARDED_BY(mu_);
  bool progress_pending_ ABSL_GUARDED_BY(mu_) = false;  // some held_ entry has progress to send
  Time progress_due_ ABSL_GUARDED_BY(mu_);              // not sent before then
  // ---- Results ----
  // Results (and give-backs) until the master acknowledges them; sent again after a reconnect.
  std::map<TaskId, Result> unacked_ ABSL_GUARDED_BY(mu_);
  std::deque<TaskId> to_send_ ABSL_GUARDED_BY(mu_);          // unacked results not written yet
  std::set<TaskId> sent_in_session_ ABSL_GUARDED_BY(mu_);    // results written on this stream
  std::vector<TaskId> unacked_before_ ABSL_GUARDED_BY(mu_);  // at the last resend check
  Time resend_at_ ABSL_GUARDED_BY(mu_);                      // the next resend check
  // Streams the master ended while these unacknowledged results were on them.
  std::map<TaskId, int> refusals_ ABSL_GUARDED_BY(mu_);
  // ---- Credits ----
  int32_t credits_to_send_ ABSL_GUARDED_BY(mu_) = 0;     // granted, not written yet
  int32_t outstanding_credit_ ABSL_GUARDED_BY(mu_) = 0;  // granted this session, not used yet
  double task_us_ewma_ ABSL_GUARDED_BY(mu_) = 0;         // how long tasks take; 0: unknown
  // ---- The master, from its last welcome ----
  std::string epoch_ ABSL_GUARDED_BY(mu_);
  std::string secret_ ABSL_GUARDED_BY(mu_);  // shown in the next hello
  std::chrono::milliseconds heartbeat_ ABSL_GUARDED_BY(mu_);
  std::chrono::milliseconds lease_ ABSL_GUARDED_BY(mu_){0};  // 0 until a welcome came
  // The master echoes heartbeats: only then can silence be told and leases be fenced.
  bool echoes_ ABSL_GUARDED_BY(mu_) = false;
  // When the leases this worker holds may lapse on the master, less a margin: tasks still held
  // then are stopped (FenceLocked).
  Time fence_at_ ABSL_GUARDED_BY(mu_);
  // ---- The session ----
  uint64_t live_session_ ABSL_GUARDED_BY(mu_) = 0;  // from its hello to its end; 0: none
  bool cut_ ABSL_GUARDED_BY(mu_) = false;           // the watchdog cut this session already
  bool welcomed_ ABSL_GUARDED_BY(mu_) = false;      // this session got its welcome
  bool session_open_ ABSL_GUARDED_BY(mu_) = false;  // from its welcome until it stops reading
  bool sending_ ABSL_GUARDED_BY(mu_) = false;       // a message taken is being written
  Time session_started_ ABSL_GUARDED_BY(mu_);       // its hello left
  Time heard_at_ ABSL_GUARDED_BY(mu_);              // its last message from the master
  Time heartbeat_due_ ABSL_GUARDED_BY(mu_);         // its next heartbeat
  // The heartbeat sent with its drain, and whether the master echoed it (or a later one).
  std::optional<Time> drain_heartbeat_ ABSL_GUARDED_BY(mu_);
  bool drain_echoed_ ABSL_GUARDED_BY(mu_) = false;
  // ---- The worker's life ----
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool drain_sent_ ABSL_GUARDED_BY(mu_) = false;  // told the master on this session
  bool leaving_ ABSL_GUARDED_BY(mu_) = false;     // say bye, then no more sessions
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;     // pool threads exit
};

}  // namespace taskmaster::worker
