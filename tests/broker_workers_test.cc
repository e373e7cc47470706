// Broker unit tests of workers: welcome, credits and dispatch, leases and their expiry,
// reconnects and pauses, drains and byes, shutdown, and which hellos are accepted.
#include <gtest/gtest.h>

#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/limits.h"
#include "master/core/broker.h"
#include "tests/broker_fixture.h"
#include "tests/fakes.h"

namespace taskmaster {
namespace {

using testing::BrokerTest;
using testing::FakeChannel;
using testing::kClient;
using testing::Spec;

TEST_F(BrokerTest, WelcomeCarriesEpochAndTimers) {
  auto w = Attach("w", 1, 0);
  ASSERT_TRUE(w.channel->welcome);
  EXPECT_EQ(w.channel->welcome->master_epoch, broker_->epoch());
  EXPECT_EQ(w.channel->welcome->lease_timeout_ms, options_.lease_timeout_ms);
}

TEST_F(BrokerTest, TasksGoOnlyAgainstCredits) {
  for (int i = 0; i < 5; ++i) SubmitOne(Spec("square", std::to_string(i)));
  auto w = Attach("w", 2, 2);
  EXPECT_EQ(w.channel->Take().size(), 2u);
  broker_->AddCredits(w.handle, 1);
  EXPECT_EQ(w.channel->Take().size(), 1u);
  broker_->AddCredits(w.handle, 10);
  EXPECT_EQ(w.channel->Take().size(), 2u);
}

TEST_F(BrokerTest, IdleSlotWinsOverPrefetch) {
  // a: one slot, busy, with prefetch credit left. b: one idle slot.
  auto a = Attach("a", 1, 3);
  SubmitOne(Spec("sleep", "1000"));
  ASSERT_EQ(a.channel->Take().size(), 1u);
  auto b = Attach("b", 1, 1);
  const TaskId next = SubmitOne(Spec("sleep", "1000"));
  EXPECT_TRUE(a.channel->Take().empty());
  auto got = b.channel->Take();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].id, next);
  // With every slot busy, prefetch takes the next one.
  SubmitOne(Spec("sleep", "1000"));
  EXPECT_EQ(a.channel->Take().size(), 1u);
}

// Two idle workers of two slots with room for 64 tasks; `a` says its tasks take `a_task_us`.
// Returns how many tasks of one batch of `n` each got, and in how many messages `a` got them.
struct Split {
  size_t a = 0, b = 0;
  int a_messages = 0;
};

class PackTest : public BrokerTest {
 protected:
  static std::vector<TaskSpec> Squares(int n) {
    std::vector<TaskSpec> batch;
    for (int i = 0; i < n; ++i) batch.push_back(Spec("square", std::to_string(i)));
    return batch;
  }

  Split SubmitBeside(int64_t a_task_us, int64_t b_task_us, int n) {
    auto a = Attach("a", 2, 0);
    auto b = Attach("b", 2, 0);
    broker_->AddCredits(a.handle, 64, a_task_us);
    broker_->AddCredits(b.handle, 64, b_task_us);
    EXPECT_TRUE(Submit(Squares(n)).ok());
    return {a.channel->Take().size(), b.channel->Take().size(), a.channel->task_messages};
  }
};

TEST_F(PackTest, AWorkerThatKeepsUpTakesABatchInOneMessage) {
  // 10 µs a task on 2 slots: 40 tasks start within 200 µs, well within pack_wait_ms.
  const Split s = SubmitBeside(10, 0, 40);
  EXPECT_EQ(s.a, 40u);
  EXPECT_EQ(s.b, 0u) << "b's idle slots are not worth a message each";
  EXPECT_EQ(s.a_messages, 1);
}

TEST_F(PackTest, ASlowWorkerTakesNoTaskBeyondItsSlotsWhileAnotherHasOneIdle) {
  // a: a second a task; b: never said. Idle slots first, then one each in turn.
  const Split s = SubmitBeside(1'000'000, 0, 40);
  EXPECT_EQ(s.a, 20u);
  EXPECT_EQ(s.b, 20u);
}

TEST_F(PackTest, ANegativeTaskTimeFromAWorkerIsNoMeasurement) {
  const Split s = SubmitBeside(-5, 0, 40);
  EXPECT_EQ(s.a, 20u);
  EXPECT_EQ(s.b, 20u);
}

TEST_F(PackTest, AFastWorkerIsFilledOnlyAsFarAsItStartsTasksWithinTheWait) {
  // 1 ms a task on 2 slots and 2 ms of wait: its slots and 4 more; the rest starts at once on b.
  ASSERT_EQ(options_.pack_wait_ms, 2);
  const Split s = SubmitBeside(1'000, 0, 8);
  EXPECT_EQ(s.a, 6u);
  EXPECT_EQ(s.b, 2u);
}

TEST_F(PackTest, AWorkerWhoseTasksOutlastTheWaitIsNotPackedHoweverManyItsSlots) {
  // 64 slots at 3 ms a task start one task every 47 µs on average, but filled at once they all
  // free up only after 3 ms: a task queued behind them would wait that long, over the 2 ms.
  auto a = Attach("a", 64, 0);
  auto b = Attach("b", 2, 0);
  broker_->AddCredits(a.handle, 1000, 3'000);
  broker_->AddCredits(b.handle, 64, 0);
  ASSERT_TRUE(Submit(Squares(50)).ok());
  EXPECT_EQ(b.channel->Take().size(), 2u) << "b's idle slots come before a's queue";
  EXPECT_EQ(a.channel->Take().size(), 48u);
}

TEST_F(PackTest, AReconnectedWorkerIsUnmeasuredUntilItSaysAgain) {
  auto a = Attach("a", 2, 0);
  broker_->AddCredits(a.handle, 64, 10);
  broker_->Detach(a.handle, /*bye=*/false);
  a = Attach("a", 2, 64);
  auto b = Attach("b", 2, 64);
  ASSERT_TRUE(Submit(Squares(8)).ok());
  EXPECT_EQ(a.channel->Take().size(), 4u) << "its earlier process's figure is not its own";
  EXPECT_EQ(b.channel->Take().size(), 4u);
}

TEST_F(PackTest, NoWaitAllowedSpreadsTasksOverIdleSlotsFirst) {
  options_.pack_wait_ms = 0;
  Reset();
  const Split s = SubmitBeside(10, 0, 40);
  EXPECT_EQ(s.a, 20u);
  EXPECT_EQ(s.b, 20u);
}

TEST_F(BrokerTest, LabelsAndKindsSelectWorkers) {
  TaskSpec gpu = Spec("square", "1");
  gpu.labels = {{"gpu", "yes"}};
  const TaskId gpu_id = SubmitOne(gpu);
  const TaskId echo_id = SubmitOne(Spec("echo", "x"));
  auto plain = Attach("plain", 4, 4, {"square"});
  EXPECT_TRUE(plain.channel->Take().empty());
  auto fancy = Attach("fancy", 4, 4, {"square", "echo"}, {{"gpu", "yes"}, {"zone", "a"}});
  auto got = fancy.channel->Take();
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].id, gpu_id);
  EXPECT_EQ(got[1].id, echo_id);
}

TEST_F(BrokerTest, LeaseExpiresWithoutHeartbeatsAndStaleResultIsDropped) {
  const TaskId id = SubmitOne(Spec("square", "4"));
  auto a = Attach("a", 1, 1);
  auto first = a.channel->Take();
  ASSERT_EQ(first.size(), 1u);
  Pass(9'000);
  broker_->Heartbeat(a.handle);  // keeps it
  Pass(9'900);
  EXPECT_EQ(State(id), TaskState::kLeased);
  Pass(100);
  EXPECT_EQ(State(id), TaskState::kPending);
  EXPECT_EQ(a.channel->cancels, std::vector<TaskId>{id});
  EXPECT_EQ(broker_->GetTask(kClient, id)->attempts, 1);  // counted

  auto b = Attach("b", 1, 1);
  auto second = b.channel->Take();
  ASSERT_EQ(second.size(), 1u);
  EXPECT_EQ(second[0].attempt, 2);
  Report(a, first[0], Outcome::kSucceeded, "stale");
  EXPECT_EQ(State(id), TaskState::kLeased);
  Report(b, second[0], Outcome::kSucceeded, "4*4=16");
  EXPECT_EQ(broker_->GetTask(kClient, id)->output, "4*4=16");
}

TEST_F(BrokerTest, LostLeasesUseUpAttempts) {
  TaskSpec s = Spec("square", "4");
  s.max_attempts = 1;
  const TaskId id = SubmitOne(s);
  auto a = Attach("a", 1, 1);
  ASSERT_EQ(a.channel->Take().size(), 1u);
  broker_->Detach(a.handle, /*bye=*/false);
  // Past its grace, but a disconnected worker may run the task for a lease period from its last
  // heartbeat (it stops it only then): it is not handed on before.
  Pass(options_.reconnect_grace_ms);
  EXPECT_EQ(State(id), TaskState::kLeased);
  Pass(options_.lease_timeout_ms - options_.reconnect_grace_ms);
  auto task = broker_->GetTask(kClient, id);
  EXPECT_EQ(task->state, TaskState::kDead);
  EXPECT_NE(task->error.find("disconnected"), std::string::npos);
}

TEST_F(BrokerTest, ReconnectWithinGraceKeepsHeldLeases) {
  const TaskId kept = SubmitOne(Spec("sleep", "1"));
  const TaskId lost = SubmitOne(Spec("sleep", "2"));
  auto a = Attach("a", 2, 2);
  auto tasks = a.channel->Take();
  ASSERT_EQ(tasks.size(), 2u);
  broker_->Detach(a.handle, /*bye=*/false);
  clock_.Advance(4'000);
  // Back with the first task only; the second never arrived and goes back unused.
  auto again = Attach("a", 2, 0, {"sleep"}, {}, {{kept, 1}, {999, 1}});
  EXPECT_EQ(State(kept), TaskState::kLeased);
  EXPECT_EQ(State(lost), TaskState::kPending);
  EXPECT_EQ(broker_->GetTask(kClient, lost)->attempts, 0);
  ASSERT_TRUE(again.channel->welcome);
  EXPECT_EQ(again.channel->welcome->revoked, (std::vector<TaskRef>{{999, 1}}));
  // The old stream's late calls are ignored.
  Report(a, tasks[0], Outcome::kSucceeded, "old stream");
  EXPECT_EQ(State(kept), TaskState::kLeased);
  TaskReport r{kept, 1, Outcome::kSucceeded, "slept 1 ms", ""};
  broker_->Report(again.handle, {r});
  EXPECT_EQ(State(kept), TaskState::kSucceeded);
  clock_.Advance(10'000);
  broker_->Tick();
  EXPECT_EQ(State(kept), TaskState::kSucceeded);
}

TEST_F(BrokerTest, APausedMasterDoesNotBlameWorkersForItsSilence) {
  TaskSpec s = Spec("sleep", "1");
  s.max_attempts = 1;
  const TaskId running = SubmitOne(s);
  const TaskId away = SubmitOne(s);
  auto a = Attach("a", 1, 1);
  auto b = Attach("b", 1, 1);
  ASSERT_EQ(a.channel->Take().size(), 1u);
  ASSERT_EQ(b.channel->Take().size(), 1u);
  // Stopped right after its start, before any tick: that counts as a pause too.
  clock_.Advance(2 * options_.lease_timeout_ms);
  broker_->Tick();
  EXPECT_EQ(State(running), TaskState::kLeased);
  Pass(1'000);
  broker_->Heartbeat(a.handle);
  broker_->Detach(b.handle, /*bye=*/false);
  // The master stops for twice the lease (SIGSTOP), then ticks again.
  clock_.Advance(2 * options_.lease_timeout_ms);
  broker_->Tick();
  EXPECT_EQ(State(running), TaskState::kLeased) << "a fresh lease period, not an expiry";
  EXPECT_EQ(State(away), TaskState::kLeased) << "and a fresh reconnect grace";
  // The heartbeats that waited in the socket arrive; the lease holds from then on.
  broker_->Heartbeat(a.handle);
  Pass(options_.lease_timeout_ms - 100);
  EXPECT_EQ(State(running), TaskState::kLeased);
  // Time the master itself saw pass still counts.
  Pass(200);
  EXPECT_EQ(State(running), TaskState::kDead);
  EXPECT_EQ(State(away), TaskState::kDead);
}

TEST_F(BrokerTest, AReconnectingWorkerKeepsTasksWhoseLeasesLapsedMeanwhile) {
  const TaskId id = SubmitOne(Spec("sleep", "1"));
  const TaskId other = SubmitOne(Spec("echo", "2"));
  auto a = Attach("a", 2, 2);
  ASSERT_EQ(a.channel->Take().size(), 2u);
  Pass(options_.lease_timeout_ms + 100);  // silent: both leases expire, attempt counted
  ASSERT_EQ(State(id), TaskState::kPending);
  auto c = Attach("c", 1, 1, {"echo"});  // takes the other one
  ASSERT_EQ(c.channel->Take().size(), 1u);
  // "a" comes back with the result of `id` still unacknowledged and `other` running: it keeps
  // `id` instead of it running again; `other` runs on "c" now, so "a" drops it.
  auto back = Attach("a", 2, 0, {"sleep", "echo"}, {}, {{id, 1}, {other, 1}, {12345, 1}});
  EXPECT_EQ(State(id), TaskState::kLeased);
  EXPECT_EQ(broker_->GetTask(kClient, id)->attempts, 1);
  ASSERT_TRUE(back.channel->welcome);
  EXPECT_EQ(back.channel->welcome->revoked, (std::vector<TaskRef>{{other, 1}, {12345, 1}}));
  broker_->Report(back.handle, {{id, 1, Outcome::kSucceeded, "slept 1 ms", ""}});
  EXPECT_EQ(State(id), TaskState::kSucceeded);
  EXPECT_EQ(broker_->DuplicateResults(), 0);
  // A result already recorded is not taken back by a worker that missed its acknowledgement.
  TaskSpec flaky = Spec("sleep", "4");
  flaky.max_attempts = 3;
  const TaskId failed = SubmitOne(flaky);
  auto f = Attach("f", 1, 1, {"sleep"});
  auto ran = f.channel->Take();
  ASSERT_EQ(ran.size(), 1u);
  broker_->Report(f.handle, {{failed, ran[0].attempt, Outcome::kFailed, "", "boom"}});
  ASSERT_EQ(State(failed), TaskState::kDelayed);
  auto f_again = Attach("f", 1, 0, {"sleep"}, {}, {{failed, ran[0].attempt}});
  EXPECT_EQ(State(failed), TaskState::kDelayed);
  EXPECT_EQ(f_again.channel->welcome->revoked, (std::vector<TaskRef>{{failed, 1}}));
  int64_t failures = 0, reclaimed = 0;
  for (const auto& q : broker_->QueueStats()) {
    failures += q.failed;
    reclaimed += q.reclaimed;
  }
  // The lapsed lease of `other` (it ran on "c") and the failure, once; `id`'s lapse not at all,
  // but counted as reclaimed (metrics, whose counters only grow, keep it in both).
  EXPECT_EQ(failures, 2);
  EXPECT_EQ(reclaimed, 1);
  // A claim of an attempt the task never reached is refused.
  const TaskId fresh = SubmitOne(Spec("sleep", "3"));
  auto liar = Attach("liar", 1, 0, {"sleep"}, {}, {{fresh, 5}});
  EXPECT_EQ(State(fresh), TaskState::kPending);
  EXPECT_EQ(liar.channel->welcome->revoked, (std::vector<TaskRef>{{fresh, 5}}));
}

TEST_F(BrokerTest, ReturnedTaskKeepsItsAttemptAndPlace) {
  const TaskId first = SubmitOne(Spec("square", "1"));
  const TaskId second = SubmitOne(Spec("square", "2"));
  auto a = Attach("a", 1, 1);
  auto tasks = a.channel->Take();
  ASSERT_EQ(tasks[0].id, first);
  broker_->Drain(a.handle);
  Report(a, tasks[0], Outcome::kReturned);
  EXPECT_EQ(broker_->GetTask(kClient, first)->attempts, 0);
  auto b = Attach("b", 1, 1);
  auto got = b.channel->Take();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].id, first);  // still ahead of `second`
  EXPECT_EQ(got[0].attempt, 1);
  EXPECT_EQ(State(second), TaskState::kPending);
}

TEST_F(BrokerTest, ByeRequeuesWhatTheWorkerStillHeld) {
  const TaskId id = SubmitOne(Spec("sleep", "100"));
  auto a = Attach("a", 1, 1);
  ASSERT_EQ(a.channel->Take().size(), 1u);
  broker_->Detach(a.handle, /*bye=*/true);
  EXPECT_EQ(State(id), TaskState::kPending);
  EXPECT_TRUE(broker_->Workers().empty());
}

TEST_F(BrokerTest, ShutdownTellsWorkersAndStopsDispatch) {
  auto w = Attach("w", 1, 1);
  broker_->Shutdown();
  EXPECT_TRUE(w.channel->shutting_down);
  SubmitOne(Spec("echo", "late"));
  EXPECT_TRUE(w.channel->Take().empty());
}

TEST_F(BrokerTest, HelloIsValidated) {
  WorkerHello hello;
  hello.worker_id = "w";
  hello.kinds = {"echo"};
  hello.slots = 0;
  EXPECT_EQ(broker_->Attach(hello, std::make_shared<FakeChannel>()).status().code(),
            absl::StatusCode::kInvalidArgument);
  hello.slots = 1;
  hello.kinds = {};
  EXPECT_EQ(broker_->Attach(hello, std::make_shared<FakeChannel>()).status().code(),
            absl::StatusCode::kInvalidArgument);
  hello.kinds = std::vector<std::string>(1'001, "echo");
  EXPECT_EQ(broker_->Attach(hello, std::make_shared<FakeChannel>()).status().code(),
            absl::StatusCode::kInvalidArgument);
  hello.kinds = {"echo"};
  hello.labels = {{"zone", std::string(257, 'z')}};
  EXPECT_EQ(broker_->Attach(hello, std::make_shared<FakeChannel>()).status().code(),
            absl::StatusCode::kInvalidArgument);
  hello.labels = {};
  hello.name = std::string(256, 'n');
  EXPECT_EQ(broker_->Attach(hello, std::make_shared<FakeChannel>()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(BrokerTest, AWorkerIdCannotBeTakenOverWithoutItsSecret) {
  const TaskId id = SubmitOne(Spec("sleep", "1"));
  auto owner = Attach("w", 1, 1);
  ASSERT_EQ(owner.channel->Take().size(), 1u);
  ASSERT_FALSE(owner.channel->welcome->secret.empty());
  // Another stream under the same id (ids are visible to any client), claiming its task.
  for (const std::string& guess :
       {std::string(), std::string("0123456789abcdef0123456789abcdef")}) {
    WorkerHello thief;
    thief.worker_id = "w";
    thief.kinds = {"sleep"};
    thief.held = {{id, 1}};
    thief.master_epoch = broker_->epoch();
    thief.secret = guess;
    EXPECT_EQ(broker_->Attach(thief, std::make_shared<FakeChannel>()).status().code(),
              absl::StatusCode::kPermissionDenied);
  }
  EXPECT_EQ(State(id), TaskState::kLeased);
  broker_->Report(owner.handle, {{id, 1, Outcome::kSucceeded, "slept 1 ms", ""}});
  EXPECT_EQ(State(id), TaskState::kSucceeded) << "the owner's stream is still the one";
  // The owner itself, reconnecting with its secret, is welcome.
  auto back = Attach("w", 1, 0);
  EXPECT_TRUE(back.channel->welcome.has_value());
}

TEST_F(BrokerTest, CreditsFromAPeerCannotOverflow) {
  auto w = Attach("w", 1, 0);
  broker_->AddCredits(w.handle, std::numeric_limits<int32_t>::max());
  broker_->AddCredits(w.handle, std::numeric_limits<int32_t>::max());
  SubmitOne(Spec("echo", "a"));
  SubmitOne(Spec("echo", "b"));
  EXPECT_EQ(w.channel->Take().size(), 2u);
}

TEST_F(BrokerTest, ProgressIsKeptForTheLeaseHolderOnlyWhileTheLeaseLasts) {
  const std::string job = Submit({Spec("echo", "a"), Spec("echo", "b")})->job_id;
  auto w = Attach("w", 2, 2);
  auto other = Attach("other", 1, 0);
  std::vector<LeasedTask> leased = w.channel->Take();
  ASSERT_EQ(leased.size(), 2u);
  const LeasedTask& a = leased[0];
  auto report = [](const LeasedTask& t, int32_t attempt, int64_t done, int64_t total,
                   std::string message = "") {
    return TaskProgress{.id = t.id,
                        .attempt = attempt,
                        .done = done,
                        .total = total,
                        .message = std::move(message),
                        .updated_ms = 0};
  };
  // From the holder, at its attempt: kept, the message bounded and printable.
  broker_->Progress(w.handle, {{.id = a.id,
                                .attempt = a.attempt,
                                .done = 4,
                                .total = 10,
                                .message = std::string(1000, 'x') + "\x1b[2J",
                                .updated_ms = 0}});
  std::optional<TaskProgress> p = broker_->GetTask(kClient, a.id)->progress;
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->done, 4);
  EXPECT_EQ(p->total, 10);
  EXPECT_EQ(p->message.size(), kMaxProgressMessageBytes);
  EXPECT_GT(p->updated_ms, 0);
  EXPECT_EQ(broker_->GetJob(kClient, job)->running.size(), 1u);
  // From another worker, or for another attempt, or with negative counts: not taken as is.
  broker_->Progress(other.handle, {report(a, a.attempt, 9, 10)});
  broker_->Progress(w.handle, {report(a, a.attempt + 1, 9, 10)});
  EXPECT_EQ(broker_->GetTask(kClient, a.id)->progress->done, 4);
  broker_->Progress(w.handle, {report(a, a.attempt, -5, -1)});
  EXPECT_EQ(broker_->GetTask(kClient, a.id)->progress->done, 0);
  // More reports than the worker holds leases: the excess is ignored, not stored.
  std::vector<TaskProgress> flood(100, report(leased[1], leased[1].attempt, 1, 2));
  broker_->Progress(w.handle, flood);
  // The lease ends: its progress goes with it.
  Report(w, a, Outcome::kSucceeded, "a");
  EXPECT_FALSE(broker_->GetTask(kClient, a.id)->progress.has_value());
  EXPECT_EQ(broker_->GetJob(kClient, job)->running.size(), 1u) << "b's, not a's";
}

TEST_F(BrokerTest, StuckHandlersAreShownAndBounded) {
  auto w = Attach("w", 2, 0);
  EXPECT_TRUE(broker_->Heartbeat(w.handle, 1));
  EXPECT_EQ(broker_->Workers().at(0).stuck, 1);
  broker_->Heartbeat(w.handle, 1'000'000);
  EXPECT_EQ(broker_->Workers().at(0).stuck, 2) << "never more than its slots";
  broker_->Heartbeat(w.handle, -3);
  EXPECT_EQ(broker_->Workers().at(0).stuck, 0);
}

}  // namespace
}  // namespace taskmaster
