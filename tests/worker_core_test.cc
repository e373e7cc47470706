// Unit tests of the worker's slots and credits and of its pool, without gRPC: a fake clock drives
// every timer, and blocking calls run on a thread whose wait is bounded.
#include <gtest/gtest.h>

#include <algorithm>
#include <future>
#include <stdexcept>
#include <thread>

#include "absl/strings/match.h"
#include "common/util.h"
#include "spdlog/spdlog.h"
#include "worker/pool.h"
#include "worker/slots.h"

namespace taskmaster::worker {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

// Longest real time a blocking call may take before the test calls it a hang.
constexpr auto kBound = seconds(10);
constexpr auto kHeartbeat = milliseconds(1'000);
constexpr auto kLease = milliseconds(10'000);

// A monotonic clock that moves only when told to.
class FakeTime {
 public:
  Time Now() const { return Time(std::chrono::nanoseconds(ns_.load())); }
  void Advance(std::chrono::nanoseconds d) { ns_ += d.count(); }

 private:
  std::atomic<int64_t> ns_{int64_t{1'000'000} * 1'000'000'000};  // far from the epoch
};

Task MakeTask(TaskId id, std::string kind = "echo", std::string payload = "", int32_t attempt = 1) {
  return {
      .task_id = id, .attempt = attempt, .kind = std::move(kind), .payload = std::move(payload)};
}

Welcome MakeWelcome(std::string epoch = "e1") {
  Welcome welcome;
  welcome.master_epoch = std::move(epoch);
  welcome.heartbeat_interval_ms = kHeartbeat.count();
  welcome.lease_timeout_ms = kLease.count();
  welcome.echoes_heartbeats = true;
  welcome.worker_secret = "s";
  return welcome;
}

std::vector<TaskId> Ids(const std::vector<Result>& results) {
  std::vector<TaskId> ids;
  for (const Result& r : results) ids.push_back(r.task_id);
  return ids;
}

std::vector<TaskId> Ids(const std::vector<TaskRef>& refs) {
  std::vector<TaskId> ids;
  for (const TaskRef& r : refs) ids.push_back(r.task_id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

class SlotsTest : public ::testing::Test {
 protected:
  void Make(int threads, int prefetch, int prefetch_max = 1000) {
    slots_ = std::make_unique<Slots>(SlotsOptions{.threads = threads,
                                                  .prefetch = prefetch,
                                                  .prefetch_max = prefetch_max,
                                                  .prefetch_window = milliseconds(2),
                                                  .batch_bytes = 1'000,
                                                  .on_ready = [this] { feed_.Notify(); },
                                                  .now = [this] { return time_.Now(); }});
  }

  // Opens a new session with `welcome`; returns what its hello listed as held.
  std::vector<TaskRef> Connect(Welcome welcome = MakeWelcome()) {
    std::optional<HelloState> hello = slots_->BeginSession(++session_);
    EXPECT_TRUE(hello.has_value());
    if (!hello) return {};
    lost_state_ = slots_->Welcomed(welcome);
    return hello->held;
  }

  // The stream ends as the master ends it (it cannot read something, say).
  std::vector<std::string> Disconnect() {
    slots_->CloseSession();
    return slots_->SessionEnded(false, "stream reset");
  }

  // What the sender writes once `passed` has; a heartbeat falls due at the latest after
  // kHeartbeat, so this returns at once.
  ToMaster Tick(std::chrono::nanoseconds passed = kHeartbeat) {
    time_.Advance(passed);
    std::optional<ToMaster> out = slots_->NextToSend();
    EXPECT_TRUE(out.has_value());
    if (out) slots_->Sent();
    return out.value_or(ToMaster{});
  }

  // Waits for a call running on another thread, letting `step` of fake time pass and the watchdog
  // look between checks, as a blocked call of the worker sees in real life. Past kBound of real
  // time the test fails, and hours pass at each step to end the call's timed waits.
  template <typename T>
  T Wait(std::future<T>& done, std::chrono::nanoseconds step = {}) {
    const auto until = std::chrono::steady_clock::now() + kBound;
    while (done.wait_for(milliseconds(5)) != std::future_status::ready) {
      if (std::chrono::steady_clock::now() >= until && step < std::chrono::hours(1)) {
        ADD_FAILURE() << "still blocked";
        step = std::chrono::hours(1);
      }
      time_.Advance(step);
      slots_->Watch();
    }
    return done.get();
  }

  // What the sender writes next, without time passing: fails rather than hangs when it has
  // nothing to write.
  ToMaster Next() {
    auto next = std::async(std::launch::async, [this] { return slots_->NextToSend(); });
    std::optional<ToMaster> out = Wait(next);
    EXPECT_TRUE(out.has_value());
    if (out) slots_->Sent();
    return out.value_or(ToMaster{});
  }

  // Takes the next queued task; fails when none is.
  Assignment Take() {
    std::optional<Assignment> a = slots_->TryNextTask();
    if (!a) ADD_FAILURE() << "no task queued";
    return a.value_or(Assignment{});
  }

  void Succeed(const Assignment& a, std::chrono::nanoseconds took = milliseconds(1)) {
    slots_->Finish(a.delivery, {a.task.task_id, a.task.attempt, Outcome::kSucceeded, "out", ""},
                   took);
  }

  // Messages from the master: tasks, cancels, acknowledgements, a heartbeat's echo, or none of
  // them (it was heard from).
  void Deliver(std::vector<Task> tasks) {
    FromMaster m;
    m.tasks = std::move(tasks);
    slots_->Received(std::move(m));
  }
  void Cancel(TaskId id) {
    FromMaster m;
    m.cancel = {id};
    slots_->Received(std::move(m));
  }
  void Ack(std::vector<TaskRef> acked) {
    FromMaster m;
    m.acked = std::move(acked);
    slots_->Received(std::move(m));
  }
  void Hear(std::optional<Time> echo = std::nullopt) {
    FromMaster m;
    m.heartbeat_echo = echo;
    slots_->Received(std::move(m));
  }

  FakeTime time_;
  Feed feed_;  // before slots_, whose on_ready reaches it
  std::unique_ptr<Slots> slots_;
  uint64_t session_ = 0;
  std::optional<std::string> lost_state_;
};

// ---- Credits ----

TEST_F(SlotsTest, CreditsCoverThreadsAndPrefetchAndReturnAsTasksFinish) {
  Make(/*threads=*/2, /*prefetch=*/1);
  Connect();
  ToMaster first = Tick(milliseconds(0));
  EXPECT_EQ(first.credits, 3);
  EXPECT_TRUE(first.heartbeat_at.has_value()) << "the first message carries a heartbeat";

  Deliver({MakeTask(1), MakeTask(2), MakeTask(3)});
  EXPECT_EQ(Tick().credits, 0) << "every credit was used; none is owed";
  Assignment a = Take();
  Take();
  EXPECT_EQ(Tick().credits, 0) << "a task that starts frees no credit";
  Succeed(a);
  ToMaster after = Tick();
  EXPECT_EQ(after.credits, 1);
  EXPECT_EQ(Ids(after.results), std::vector<TaskId>{1});
}

// A thread that finishes while no task waits writes its result itself, with the credit it frees,
// and the sender has nothing left of it; under load (a task queued) the result waits for the
// sender, to leave with others; and never while another write is in flight.
TEST_F(SlotsTest, AResultGoesStraightOutOnlyWhenTheThreadHasNothingQueued) {
  Make(/*threads=*/1, /*prefetch=*/1);
  Connect();
  Tick(milliseconds(0));
  const auto ok = [](const Assignment& a) {
    return Result{a.task.task_id, a.task.attempt, Outcome::kSucceeded, "out", ""};
  };

  Deliver({MakeTask(1)});
  Assignment one = Take();
  std::optional<ToMaster> direct = slots_->Finish(one.delivery, ok(one), milliseconds(1), true);
  ASSERT_TRUE(direct.has_value());
  EXPECT_EQ(Ids(direct->results), std::vector<TaskId>{1});
  EXPECT_EQ(direct->credits, 1);
  slots_->Sent();
  EXPECT_TRUE(Tick().results.empty()) << "written once";

  Deliver({MakeTask(2), MakeTask(3)});
  Assignment two = Take();
  EXPECT_FALSE(slots_->Finish(two.delivery, ok(two), milliseconds(1), true).has_value())
      << "task 3 is queued: the result waits for the sender";
  Assignment three = Take();
  auto sender = std::async(std::launch::async, [this] { return slots_->NextToSend(); });
  std::optional<ToMaster> held = Wait(sender);  // the sender writes task 2's result...
  ASSERT_TRUE(held.has_value());
  EXPECT_EQ(Ids(held->results), std::vector<TaskId>{2});
  EXPECT_FALSE(slots_->Finish(three.delivery, ok(three), milliseconds(1), true).has_value())
      << "...so task 3's waits for it";
  slots_->Sent();
  EXPECT_EQ(Ids(Next().results), std::vector<TaskId>{3});
}

TEST_F(SlotsTest, UnusedCreditsAreGrantedAfreshOnANewSession) {
  Make(2, 1);
  Connect();
  EXPECT_EQ(Tick().credits, 3);
  Deliver({MakeTask(1)});
  Disconnect();
  Connect();
  EXPECT_EQ(Tick().credits, 2) << "the task still held takes one of the three";
}

// ---- Credits shared by the partitions of a pool ----

TEST(SharedCreditsTest, OnePartitionIsGrantedTheWholePool) {
  SharedCredits credits;
  EXPECT_EQ(credits.Allow(0, 0, 0, 10), 10);
  EXPECT_EQ(credits.Allow(0, 10, 0, 10), 0);
  EXPECT_EQ(credits.Allow(0, 9, 0, 10), 1);
  EXPECT_FALSE(credits.TakeWaiting(0));
}

TEST(SharedCreditsTest, AnIdlePartitionKeepsOneCreditWhileAnotherWorks) {
  SharedCredits credits;
  EXPECT_EQ(credits.Allow(0, 0, 0, 10), 10);  // alone so far
  EXPECT_EQ(credits.Allow(1, 0, 0, 10), 5) << "no partition has tasks: each is granted its part";
  EXPECT_EQ(credits.Allow(0, 10, 0, 10), 0) << "partition 0's master used its ten";
  EXPECT_EQ(credits.Allow(1, 0, 0, 10), 1) << "one credit waits at the idle partition";
  EXPECT_EQ(credits.Allow(1, 0, 1, 10), 0);
}

TEST(SharedCreditsTest, BusyPartitionsShareThePoolEqually) {
  SharedCredits credits;
  EXPECT_EQ(credits.Allow(0, 10, 0, 10), 0);
  // Partition 1's one credit was used: it has a task, and is held back below its share of five.
  EXPECT_EQ(credits.Allow(1, 1, 0, 10), 0);
  EXPECT_TRUE(credits.TakeWaiting(0)) << "partition 0's finishes must tell it";
  EXPECT_FALSE(credits.TakeWaiting(0)) << "told once";
  // Partition 0 finishes tasks: over its share, it grants nothing, and the room goes to 1.
  int32_t to_one = 0;
  for (int32_t held = 9; held >= 5; --held) {
    EXPECT_EQ(credits.Allow(0, held, 0, 10), 0);
    to_one += credits.Allow(1, 1, to_one, 10);
  }
  EXPECT_EQ(to_one, 4) << "up to its share: five with the task it holds";
  EXPECT_EQ(credits.Allow(0, 4, 0, 10), 1) << "back to its share: five each";
  EXPECT_FALSE(credits.TakeWaiting(1)) << "nobody is held back";
}

// A partition of short tasks prefetches far more than one of long tasks: the pool is shared as the
// most demanding sees it, each partition within what it takes itself.
TEST(SharedCreditsTest, APartitionOfLongTasksIsNotCrowdedOutByOneThatPrefetchesMore) {
  SharedCredits credits;
  EXPECT_EQ(credits.Allow(0, 800, 0, 804), 4);  // short tasks: threads and a large prefetch
  EXPECT_EQ(credits.Allow(1, 1, 0, 4), 0) << "long tasks: threads only; the pool is full";
  EXPECT_TRUE(credits.TakeWaiting(0));
  // Partition 0 finishes tasks: over its share of 402, it grants nothing; the room goes to 1.
  int32_t to_one = 0;
  for (int32_t held = 803; held >= 798; --held) {
    EXPECT_EQ(credits.Allow(0, held, 0, 804), 0);
    to_one += credits.Allow(1, 1, to_one, 4);
  }
  EXPECT_EQ(to_one, 3) << "up to what partition 1 takes itself: its four threads";
}

// A partition held back below its share gets the room another partition's finish opens, at once.
TEST_F(SlotsTest, RoomThatOpensInOnePartitionGoesToTheOneHeldBack) {
  auto credits = std::make_shared<SharedCredits>();
  std::vector<Slots*> all;
  auto options = [&](size_t member) {
    return SlotsOptions{.threads = 4,
                        .prefetch = 0,
                        .on_ready = [this] { feed_.Notify(); },
                        .shared_credits = credits,
                        .member = member,
                        .on_room =
                            [&] {
                              for (Slots* s : all) s->TopUp();
                            },
                        .now = [this] { return time_.Now(); }};
  };
  slots_ = std::make_unique<Slots>(options(0));
  Slots other(options(1));
  all = {slots_.get(), &other};
  const auto other_credits = [&] {
    time_.Advance(kHeartbeat);
    std::optional<ToMaster> out = other.NextToSend();
    other.Sent();
    return out ? out->credits : -1;
  };
  Connect();
  EXPECT_EQ(Tick(milliseconds(0)).credits, 4) << "partition 0 is alone so far";
  Deliver({MakeTask(1), MakeTask(2), MakeTask(3), MakeTask(4)});
  Assignment a = Take(), b = Take();
  Take();
  Take();
  ASSERT_TRUE(other.BeginSession(1).has_value());
  other.Welcomed(MakeWelcome());
  EXPECT_EQ(other_credits(), 1) << "one credit waits at the idle partition";
  FromMaster to_other;
  to_other.tasks = {MakeTask(5)};
  other.Received(std::move(to_other));
  EXPECT_EQ(other_credits(), 0) << "below its share of two, but the pool is full";
  Succeed(a);
  EXPECT_EQ(Tick().credits, 0) << "task 5 takes the thread";
  EXPECT_EQ(other_credits(), 0);
  Succeed(b);
  EXPECT_EQ(Tick().credits, 0) << "partition 0 holds its share";
  EXPECT_EQ(other_credits(), 1) << "partition 1 gets the room partition 0's finish opened";
  // Partition 0's master goes silent: once its leases may lapse, its tasks are stopped, and the
  // room they held goes to partition 1.
  time_.Advance(kLease);
  EXPECT_EQ(slots_->Watch()->stopped, 2u);
  EXPECT_EQ(other_credits(), 2) << "its share is now the whole pool of four, one task held";
  other.Stop();
}

TEST_F(SlotsTest, AdaptivePrefetchHoldsAWindowOfShortTasksUpToItsMaximum) {
  Make(2, /*prefetch=*/-1, /*prefetch_max=*/100);
  Connect();
  const ToMaster first = Tick();
  EXPECT_EQ(first.credits, 4) << "nothing measured yet: a prefetch of one per thread";
  EXPECT_EQ(first.task_us, 0) << "nor is a task time told";
  Deliver({MakeTask(1), MakeTask(2), MakeTask(3), MakeTask(4)});
  Assignment a = Take();
  // 10 µs tasks: 2 ms per thread is 400 of them, more than the maximum.
  Succeed(a, std::chrono::microseconds(10));
  const ToMaster next = Tick();
  EXPECT_EQ(next.credits, 2 + 100 - 3);
  EXPECT_EQ(next.task_us, 10) << "the master packs tasks for a worker that says it is fast";
}

TEST_F(SlotsTest, AdaptivePrefetchHoldsNothingBehindLongTasks) {
  Make(2, -1, 100);
  Connect();
  EXPECT_EQ(Tick().credits, 4);
  Deliver({MakeTask(1), MakeTask(2), MakeTask(3), MakeTask(4)});
  Succeed(Take(), seconds(1));
  Succeed(Take(), seconds(1));
  EXPECT_EQ(Tick().credits, 0) << "two held for two threads: no prefetch for second-long tasks";
  Succeed(Take(), seconds(1));
  EXPECT_EQ(Tick().credits, 1);
}

// ---- Cancels and revokes ----

TEST_F(SlotsTest, CancelOfAQueuedTaskAnswersAtOnceAndItNeverRuns) {
  Make(1, 1);
  Connect();
  Tick();
  Deliver({MakeTask(1), MakeTask(2)});
  Cancel(2);
  ToMaster out = Tick();
  ASSERT_EQ(Ids(out.results), std::vector<TaskId>{2});
  EXPECT_EQ(out.results[0].outcome, Outcome::kCancelled);
  EXPECT_EQ(Take().task.task_id, 1u);
  Deliver({MakeTask(3)});
  EXPECT_EQ(Take().task.task_id, 3u) << "task 2 left the queue";
}

TEST_F(SlotsTest, CancelOfARunningTaskTellsItsHandler) {
  Make(1, 0);
  Connect();
  Deliver({MakeTask(1)});
  Assignment a = Take();
  EXPECT_FALSE(a.cancelled->load());
  Cancel(1);
  EXPECT_TRUE(a.cancelled->load());
}

TEST_F(SlotsTest, CancelThatOvertakesItsTaskIsRemembered) {
  Make(1, 0);
  Connect();
  Tick();
  Cancel(7);
  Deliver({MakeTask(7)});
  ToMaster out = Tick();
  ASSERT_EQ(Ids(out.results), std::vector<TaskId>{7});
  EXPECT_EQ(out.results[0].outcome, Outcome::kCancelled);
  EXPECT_EQ(out.credits, 1) << "the cancelled task holds no slot";
}

TEST_F(SlotsTest, RevokedTasksAreDroppedQueuedNowRunningWhenTheyReturn) {
  Make(1, 1);
  Connect();
  Tick();
  Deliver({MakeTask(1), MakeTask(2)});
  Assignment running = Take();
  Disconnect();
  Welcome welcome = MakeWelcome();
  welcome.revoked = {{1, 1}, {2, 1}};
  EXPECT_EQ(Ids(Connect(welcome)), (std::vector<TaskId>{1, 2})) << "the hello lists both";
  EXPECT_TRUE(running.cancelled->load());
  EXPECT_EQ(Tick().credits, 2) << "neither holds a slot any more";
  Succeed(running);
  EXPECT_TRUE(Tick().results.empty()) << "a revoked task's result is stale";
  Deliver({MakeTask(3)});
  EXPECT_EQ(Take().task.task_id, 3u) << "task 2 left the queue";
  Disconnect();
  EXPECT_EQ(Ids(Connect()), std::vector<TaskId>{3});
}

TEST_F(SlotsTest, AHandlerPastItsDeadlineIsReportedTimedOutAndKeepsItsSlot) {
  Make(1, 0);
  Connect();
  EXPECT_EQ(Tick().credits, 1);
  Task task = MakeTask(1);
  task.timeout_ms = 1'000;
  Deliver({task});
  Assignment stuck = Take();
  time_.Advance(milliseconds(1'000) + kStuckGrace - milliseconds(1));
  EXPECT_TRUE(slots_->Watch()->stuck.empty()) << "the handler still has its grace";
  time_.Advance(milliseconds(2));
  const std::optional<WatchReport> report = slots_->Watch();
  ASSERT_EQ(report->stuck.size(), 1u);
  EXPECT_TRUE(stuck.cancelled->load()) << "the handler is told to stop";
  ToMaster out = Tick(kHeartbeat);
  ASSERT_EQ(Ids(out.results), std::vector<TaskId>{1}) << "reported without the handler";
  EXPECT_EQ(out.results[0].outcome, Outcome::kFailed);
  EXPECT_TRUE(absl::StrContains(out.results[0].error, "timed out after 1000 ms"));
  EXPECT_EQ(out.credits, 0) << "its thread is still busy";
  EXPECT_EQ(out.stuck, 1) << "the heartbeat tells the master";
  EXPECT_EQ(slots_->Stuck(), 1);
  Ack({{1, 1}});
  Disconnect();
  EXPECT_TRUE(Connect().empty()) << "the master has its result: the hello holds nothing";
  EXPECT_EQ(Tick().credits, 0) << "nor is its slot free on a new stream";
  Succeed(stuck);
  ToMaster after = Tick(kHeartbeat);
  EXPECT_TRUE(after.results.empty()) << "what the handler returned at last is dropped";
  EXPECT_EQ(after.credits, 1) << "its slot is free again";
  EXPECT_EQ(after.stuck, 0);
}

// The master leases a task again (its retry) to the worker whose handler it gave up on: the new
// attempt runs, and the old handler's late return touches nothing of it.
TEST_F(SlotsTest, ATaskLeasedAgainRunsBesideItsStuckHandler) {
  Make(2, 0);
  Connect();
  Tick();
  Task task = MakeTask(1);
  task.timeout_ms = 1'000;
  Deliver({task});
  Assignment stuck = Take();
  time_.Advance(milliseconds(1'000) + kStuckGrace + milliseconds(1));
  ASSERT_EQ(slots_->Watch()->stuck.size(), 1u);
  ToMaster reported = Tick(kHeartbeat);
  ASSERT_EQ(Ids(reported.results), std::vector<TaskId>{1});
  Ack({{1, 1}});
  Deliver({MakeTask(1, "echo", "", /*attempt=*/2)});
  Assignment retry = Take();
  EXPECT_EQ(retry.task.task_id, 1u);
  EXPECT_EQ(retry.task.attempt, 2);
  EXPECT_FALSE(retry.cancelled->load());
  slots_->ReportProgress(1, stuck.delivery, {9, 9, "from the stuck handler"});
  EXPECT_TRUE(Tick().progress.empty()) << "not the retry's progress";
  Succeed(stuck);  // returns at last: dropped, and the retry still runs
  EXPECT_TRUE(Tick().results.empty());
  Succeed(retry);
  ToMaster done = Tick(milliseconds(0));
  ASSERT_EQ(done.results.size(), 1u);
  EXPECT_EQ(done.results[0].attempt, 2);
  EXPECT_EQ(done.stuck, 0);
}

// The same after a fence, and after a master that lost its state hands out the same id again; a
// cancel remembered from before the loss does not stop the new task.
TEST_F(SlotsTest, ATaskIdHandedOutAgainRunsBesideItsFencedOrRevokedHandler) {
  Make(2, 0);
  Connect();
  Tick();
  Deliver({MakeTask(1)});
  Assignment fenced = Take();
  time_.Advance(milliseconds(9'100));  // past the lease, less its margin: fenced
  EXPECT_EQ(slots_->Watch()->stopped, 1u);
  Hear();
  Deliver({MakeTask(1, "echo", "", 2)});
  Assignment again = Take();
  EXPECT_EQ(again.task.attempt, 2);
  Succeed(fenced);
  EXPECT_TRUE(Tick().results.empty()) << "the fenced handler's result is stale";
  Cancel(5);  // overtakes a task 5 that the lost state will never send
  Disconnect();
  Connect(MakeWelcome("e2"));
  ASSERT_TRUE(lost_state_.has_value());
  EXPECT_TRUE(again.cancelled->load()) << "revoked with the lost state";
  Deliver({MakeTask(1), MakeTask(5)});
  Assignment first = Take();
  Assignment fifth = Take();
  EXPECT_EQ(first.task.task_id, 1u);
  EXPECT_EQ(fifth.task.task_id, 5u) << "a cancel of the lost state stops nothing new";
  Succeed(again);
  Succeed(first);
  Succeed(fifth);
  ToMaster out = Tick(milliseconds(0));
  EXPECT_EQ(Ids(out.results), (std::vector<TaskId>{1, 5}));
}

TEST_F(SlotsTest, ProgressGoesOutRateLimitedTheLatestOfEachTaskOnce) {
  Make(2, 0);
  Connect();
  Tick();
  Deliver({MakeTask(1), MakeTask(2)});
  Assignment a = Take();
  Assignment b = Take();
  slots_->ReportProgress(1, a.delivery, {1, 10, "first"});
  slots_->ReportProgress(1, a.delivery, {2, 10, "second"});
  slots_->ReportProgress(2, b.delivery, {5, 0, ""});
  ToMaster out = Tick(milliseconds(0));
  ASSERT_EQ(out.progress.size(), 2u) << "the latest of each, in one message";
  EXPECT_EQ(out.progress[0].task_id, 1u);
  EXPECT_EQ(out.progress[0].done, 2);
  EXPECT_EQ(out.progress[0].message, "second");
  EXPECT_EQ(out.progress[1].task_id, 2u);
  slots_->ReportProgress(1, a.delivery, {3, 10, "third"});
  // Within the interval the report waits: a message that goes now (a result) carries none of it.
  Succeed(b);
  ToMaster now = Tick(milliseconds(0));
  EXPECT_EQ(Ids(now.results), std::vector<TaskId>{2});
  EXPECT_TRUE(now.progress.empty());
  ToMaster later = Tick(milliseconds(500));
  ASSERT_EQ(later.progress.size(), 1u);
  EXPECT_EQ(later.progress[0].done, 3);
  // A finished task's progress is never sent, and a report is sent once.
  slots_->ReportProgress(2, b.delivery, {9, 10, "late"});
  EXPECT_TRUE(Tick().progress.empty());
  Succeed(a);
}

TEST_F(SlotsTest, AMasterThatLostItsStateTakesEverythingBack) {
  Make(1, 2);
  Connect();
  Deliver({MakeTask(1), MakeTask(2), MakeTask(3)});
  Succeed(Take());
  Disconnect();
  EXPECT_EQ(Ids(Connect(MakeWelcome("e2"))), (std::vector<TaskId>{1, 2, 3}));
  ASSERT_TRUE(lost_state_.has_value());
  EXPECT_TRUE(absl::StrContains(*lost_state_, "dropping 2 held tasks and 1 unacknowledged"))
      << *lost_state_;
  ToMaster out = Tick();
  EXPECT_TRUE(out.results.empty());
  EXPECT_EQ(out.credits, 3);
  Disconnect();
  EXPECT_TRUE(Connect(MakeWelcome("e2")).empty());
}

// ---- Results ----

TEST_F(SlotsTest, ResultsAreKeptUntilAcknowledgedAndResentAfterAReconnect) {
  Make(1, 0);
  Connect();
  Deliver({MakeTask(1, "echo", "", /*attempt=*/3)});
  Succeed(Take());
  EXPECT_EQ(Ids(Tick().results), std::vector<TaskId>{1});
  Disconnect();

  std::vector<TaskRef> held = Connect();
  ASSERT_EQ(held.size(), 1u) << "the hello claims the unacknowledged result's lease";
  EXPECT_EQ(held[0].attempt, 3);
  ToMaster again = Tick();
  ASSERT_EQ(Ids(again.results), std::vector<TaskId>{1});
  EXPECT_EQ(again.results[0].output, "out");

  Ack({{1, 2}});
  Disconnect();
  EXPECT_EQ(Connect().size(), 1u) << "an acknowledgement of another attempt counts for nothing";
  Ack({{1, 3}});
  Disconnect();
  EXPECT_TRUE(Connect().empty());
  EXPECT_TRUE(Tick().results.empty());
}

TEST_F(SlotsTest, ResultsUnacknowledgedForAPeriodAreResentOnTheSameStream) {
  Make(1, 0);
  Connect();
  Deliver({MakeTask(1), MakeTask(2)});
  Succeed(Take());
  EXPECT_EQ(Ids(Tick().results), std::vector<TaskId>{1});
  EXPECT_TRUE(Tick(seconds(10)).results.empty()) << "one period: noted, not resent yet";
  EXPECT_EQ(Ids(Tick(seconds(10)).results), std::vector<TaskId>{1});
  Ack({{1, 1}});
  EXPECT_TRUE(Tick(seconds(10)).results.empty());
  EXPECT_TRUE(Tick(seconds(10)).results.empty());
}

TEST_F(SlotsTest, AMessageOfResultsClosesAtItsByteBudget) {
  Make(1, 0);
  Connect();
  Tick();
  for (TaskId id = 1; id <= 3; ++id) {
    Deliver({MakeTask(id)});
    slots_->Finish(Take().delivery, {id, 1, Outcome::kSucceeded, std::string(600, 'x'), ""},
                   milliseconds(1));
  }
  EXPECT_EQ(Ids(Next().results), (std::vector<TaskId>{1, 2})) << "1,000 bytes: two of 600";
  EXPECT_EQ(Ids(Next().results), std::vector<TaskId>{3});
}

TEST_F(SlotsTest, AResultTheMasterKeepsRefusingIsGivenUp) {
  Make(1, 0);
  Connect();
  Deliver({MakeTask(1)});
  Succeed(Take());
  for (int end = 1; end <= 5; ++end) {
    if (end > 1) Connect();
    EXPECT_EQ(Ids(Tick().results), std::vector<TaskId>{1});
    if (end == 3) {
      // A master that stops says so: that end is no refusal.
      slots_->CloseSession();
      EXPECT_TRUE(slots_->SessionEnded(true, "master stopping").empty());
      Connect();
      Tick();
    }
    std::vector<std::string> given_up = Disconnect();
    if (end < 5) {
      EXPECT_TRUE(given_up.empty()) << end;
    } else {
      ASSERT_EQ(given_up.size(), 1u);
      EXPECT_TRUE(absl::StrContains(given_up[0], "giving up on the result of task 1 attempt 1"))
          << given_up[0];
    }
  }
  EXPECT_TRUE(Connect().empty());
}

// ---- The watchdog ----

TEST_F(SlotsTest, LeasesAboutToLapseStopTheTasksHeld) {
  Make(1, 1);
  Connect();
  Deliver({MakeTask(1), MakeTask(2)});
  Assignment running = Take();
  // The lease holds 10 s from the hello; the worker stops a tenth earlier.
  time_.Advance(milliseconds(8'990));
  Hear();  // heard from, but no echo
  EXPECT_EQ(slots_->Watch()->stopped, 0u);
  time_.Advance(milliseconds(20));
  std::optional<WatchReport> report = slots_->Watch();
  EXPECT_EQ(report->stopped, 1u);
  EXPECT_EQ(report->dropped, 1u);
  EXPECT_TRUE(running.cancelled->load());
  EXPECT_EQ(slots_->Watch()->stopped, 0u) << "stopped once";
  Succeed(running);
  EXPECT_TRUE(Tick().results.empty()) << "a fenced task's result is never sent";
}

TEST_F(SlotsTest, AnEchoedHeartbeatExtendsTheLeases) {
  Make(1, 0);
  Connect();
  Deliver({MakeTask(1)});
  Assignment running = Take();
  const Time sent = Tick(seconds(4)).heartbeat_at.value();
  time_.Advance(seconds(1));
  Hear(sent);
  time_.Advance(seconds(5));
  Hear();
  EXPECT_EQ(slots_->Watch()->stopped, 0u) << "held until 4 s + 9 s";
  time_.Advance(milliseconds(3'100));
  Hear();
  EXPECT_EQ(slots_->Watch()->stopped, 1u);
}

TEST_F(SlotsTest, ASilentMasterIsCutOnceAndAMissingWelcomeToo) {
  Make(1, 0);
  Connect();
  time_.Advance(milliseconds(2'900));
  EXPECT_EQ(slots_->Watch()->cut_session, 0u);
  time_.Advance(milliseconds(200));
  std::optional<WatchReport> report = slots_->Watch();
  EXPECT_EQ(report->cut_session, session_);
  EXPECT_EQ(report->why, "no word for 3100 ms");
  EXPECT_EQ(slots_->Watch()->cut_session, 0u) << "cut once";
  // A cut stream's results are no refusal.
  Disconnect();

  ASSERT_TRUE(slots_->BeginSession(++session_).has_value());
  time_.Advance(milliseconds(4'900));  // the welcome may take a lease's half
  EXPECT_EQ(slots_->Watch()->cut_session, 0u);
  time_.Advance(milliseconds(200));
  report = slots_->Watch();
  EXPECT_EQ(report->cut_session, session_);
  EXPECT_EQ(report->why, "no welcome");
}

TEST_F(SlotsTest, HoldingTasksTheWorkerReconnectsSoon) {
  Make(1, 0);
  EXPECT_EQ(slots_->ReconnectDelay(seconds(8)), seconds(8));
  Connect();
  Deliver({MakeTask(1)});
  Disconnect();
  EXPECT_EQ(slots_->ReconnectDelay(seconds(8)), kHeartbeat);
}

// ---- Drain and stop ----

TEST_F(SlotsTest, DrainGivesBackWhatWaitsAndLeavesOnceResultsAreAcknowledged) {
  Make(1, 2);
  Connect();
  Tick();
  Deliver({MakeTask(1), MakeTask(2), MakeTask(3)});
  Assignment running = Take();
  std::optional<Slots::DrainStart> start = slots_->StartDrain();
  ASSERT_TRUE(start.has_value());
  EXPECT_EQ(start->returned, 2u);
  EXPECT_EQ(start->running, 1u);
  EXPECT_FALSE(slots_->StartDrain().has_value()) << "draining already";
  Deliver({MakeTask(4)});  // sent before the master heard
  ToMaster out = Tick();
  EXPECT_TRUE(out.draining);
  EXPECT_EQ(out.credits, 0);
  EXPECT_EQ(Ids(out.results), (std::vector<TaskId>{2, 3, 4}));
  for (const Result& r : out.results) EXPECT_EQ(r.outcome, Outcome::kReturned);
  EXPECT_FALSE(out.bye);
  ASSERT_TRUE(out.heartbeat_at.has_value()) << "the drain goes with a heartbeat";

  auto drained = std::async(std::launch::async,
                            [this] { return slots_->FinishDrain(time_.Now() + seconds(30)); });
  // Until the master echoes the drain's heartbeat, tasks it sent before may still arrive, and
  // are given back as they do: a task in flight is never left for the master to count as lost.
  Deliver({MakeTask(5)});
  EXPECT_EQ(Ids(Next().results), std::vector<TaskId>{5});
  Hear(out.heartbeat_at);
  Succeed(running);
  EXPECT_EQ(Ids(Next().results), std::vector<TaskId>{1});
  Ack({{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}});
  EXPECT_TRUE(Next().bye);
  EXPECT_TRUE(slots_->Leaving());
  slots_->CloseSession();
  Slots::DrainEnd end = Wait(drained);
  EXPECT_EQ(end.unfinished, 0u);
  EXPECT_EQ(end.unacked, 0u);
  EXPECT_FALSE(slots_->BeginSession(++session_).has_value()) << "no session after leaving";
}

TEST_F(SlotsTest, DrainLeavesTasksThatOutlastItsTimeout) {
  Make(1, 0);
  Connect();
  Deliver({MakeTask(1)});
  Take();
  slots_->StartDrain();
  const Time deadline = time_.Now() + seconds(30);
  auto drained = std::async(std::launch::async, [&] { return slots_->FinishDrain(deadline); });
  Slots::DrainEnd end = Wait(drained, seconds(1));
  EXPECT_EQ(end.unfinished, 1u);
  EXPECT_GE(time_.Now(), deadline + seconds(5)) << "the bye had its grace";
}

TEST_F(SlotsTest, StopEndsThePoolsWaitAndCancelsRunningTasks) {
  Make(2, 0);
  Connect();
  Deliver({MakeTask(1)});
  Assignment running = Take();
  feed_.Add({slots_.get(), nullptr});
  auto waiting = std::async(std::launch::async, [this] { return feed_.Wait(); });
  EXPECT_TRUE(slots_->Stop());
  EXPECT_FALSE(slots_->Stop()) << "stopped once";
  EXPECT_FALSE(Wait(waiting).has_value());
  EXPECT_TRUE(running.cancelled->load());
  EXPECT_TRUE(slots_->Stopped());
  EXPECT_FALSE(slots_->Watch().has_value()) << "the watchdog exits";
  EXPECT_TRUE(slots_->AwaitLeaving(seconds(0)));
}

// ---- Running handlers ----

class RunTaskTest : public ::testing::Test {
 protected:
  RunTaskTest() {
    EXPECT_TRUE(RegisterBuiltins(registry_).ok());
    EXPECT_TRUE(registry_
                    .Register("until-stopped",
                              [](const TaskContext& ctx) -> absl::StatusOr<std::string> {
                                while (!ctx.ShouldStop()) std::this_thread::yield();
                                return "stopped";
                              })
                    .ok());
    EXPECT_TRUE(registry_
                    .Register("throws",
                              [](const TaskContext&) -> absl::StatusOr<std::string> {
                                throw std::runtime_error("oops");
                              })
                    .ok());
    EXPECT_TRUE(registry_
                    .Register("bad-error",
                              [](const TaskContext&) -> absl::StatusOr<std::string> {
                                return absl::UnknownError("\xff\xfe");
                              })
                    .ok());
  }

  Result Run(Task task, bool cancelled = false) {
    return RunTask(registry_, {.worker_name = "w1", .max_output = 16}, task,
                   std::make_shared<std::atomic<bool>>(cancelled));
  }

  Registry registry_;
};

TEST_F(RunTaskTest, OutputsAndFailures) {
  Result ok = Run(MakeTask(1, "square", "7", 2));
  EXPECT_EQ(ok.task_id, 1u);
  EXPECT_EQ(ok.attempt, 2);
  EXPECT_EQ(ok.outcome, Outcome::kSucceeded);
  EXPECT_EQ(ok.output, "7*7=49");

  Result malformed = Run(MakeTask(1, "square", "x"));
  EXPECT_EQ(malformed.outcome, Outcome::kFailed);
  EXPECT_TRUE(malformed.permanent) << "a malformed payload is no use retrying";

  Result failed = Run(MakeTask(1, "fail", "no"));
  EXPECT_EQ(failed.outcome, Outcome::kFailed);
  EXPECT_FALSE(failed.permanent);

  Result unknown = Run(MakeTask(1, "nope"));
  EXPECT_EQ(unknown.outcome, Outcome::kFailed);
  EXPECT_EQ(unknown.error, "worker w1 does not run kind 'nope'");

  Result threw = Run(MakeTask(1, "throws"));
  EXPECT_EQ(threw.outcome, Outcome::kFailed);
  EXPECT_EQ(threw.error, "handler threw: oops");

  Result bad_error = Run(MakeTask(1, "bad-error"));
  EXPECT_TRUE(IsValidUtf8(bad_error.error)) << "the master could not parse it";
}

TEST_F(RunTaskTest, OutputTooLargeForAMessageFailsForGood) {
  Result big = Run(MakeTask(1, "echo", std::string(17, 'x')));
  EXPECT_EQ(big.outcome, Outcome::kFailed);
  EXPECT_TRUE(big.permanent);
  EXPECT_TRUE(absl::StrContains(big.error, "output of 17 bytes is over the 16")) << big.error;
  EXPECT_EQ(Run(MakeTask(1, "echo", std::string(16, 'x'))).outcome, Outcome::kSucceeded);
}

TEST_F(RunTaskTest, CancelledAndTimedOut) {
  Result cancelled = Run(MakeTask(1, "until-stopped"), /*cancelled=*/true);
  EXPECT_EQ(cancelled.outcome, Outcome::kCancelled);

  Task task = MakeTask(1, "until-stopped");
  task.timeout_ms = 1;
  Result timed_out = Run(task);
  EXPECT_EQ(timed_out.outcome, Outcome::kFailed);
  EXPECT_EQ(timed_out.error, "timed out after 1 ms");
}

// The pool's threads serve the slots of every partition: here a second one, which gets no task,
// holds no thread back, and the pool stops only once both slots stopped.
TEST_F(SlotsTest, APoolRunsWhatTheSlotsHoldAndStopsWithThem) {
  Registry registry;
  ASSERT_TRUE(RegisterBuiltins(registry).ok());
  Make(2, 0);
  Connect();
  Tick();
  Slots idle(SlotsOptions{.threads = 2, .on_ready = [this] { feed_.Notify(); }});
  feed_.Add({&idle, nullptr});
  feed_.Add({slots_.get(), nullptr});
  RunMetrics metrics(registry.Kinds());
  Pool pool(&feed_, &registry, &metrics, {.worker_name = "w1", .max_output = 1'000},
            spdlog::default_logger());
  pool.Start(2);
  Deliver({MakeTask(1, "square", "3"), MakeTask(2, "square", "4")});
  std::vector<Result> results;
  while (results.size() < 2) {
    ToMaster out = Next();
    if (HasFailure()) break;
    for (Result& r : out.results) results.push_back(std::move(r));
  }
  std::sort(results.begin(), results.end(),
            [](const Result& a, const Result& b) { return a.task_id < b.task_id; });
  ASSERT_EQ(results.size(), 2u);
  EXPECT_EQ(results[0].output, "3*3=9");
  EXPECT_EQ(results[1].output, "4*4=16");
  slots_->Stop();
  idle.Stop();
  pool.Join();
}

}  // namespace
}  // namespace taskmaster::worker
