// Unit tests of the broker core, in memory, with a fake clock and fake worker channels.
#include "master/core/broker.h"

#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <mutex>

#include "absl/strings/match.h"
#include "absl/strings/str_replace.h"
#include "common/logging.h"
#include "master/store/memory_store.h"
#include "tests/fakes.h"

namespace taskmaster {
namespace {

using testing::CountingWatcher;
using testing::FakeChannel;
using testing::kClient;
using testing::Spec;

class BrokerTest : public ::testing::Test {
 protected:
  BrokerTest() {
    options_.lease_timeout_ms = 10'000;
    options_.reconnect_grace_ms = 5'000;
    options_.retry_backoff_ms = 1'000;
    options_.retry_backoff_max_ms = 4'000;
    options_.result_retention_ms = 60'000;
    options_.max_queue_length = 100;
    options_.max_payload_bytes = 64;
    options_.max_batch = 50;
    Reset();
  }

  void Reset() {
    broker_ = std::make_unique<Broker>(options_, &clock_, store_.get(), GetLogger("broker-test"));
  }

  absl::StatusOr<SubmitOutcome> Submit(std::vector<TaskSpec> specs,
                                       const Caller& caller = kClient) {
    absl::StatusOr<SubmitOutcome> result = absl::UnknownError("not called");
    broker_->Submit(caller, std::move(specs), [&](absl::StatusOr<SubmitOutcome> r) { result = r; });
    return result;
  }

  TaskId SubmitOne(TaskSpec spec) {
    auto out = Submit({std::move(spec)});
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? out->task_ids.at(0) : 0;
  }

  struct Attached {
    Broker::WorkerHandle handle;
    std::shared_ptr<FakeChannel> channel;
  };

  Attached Attach(const std::string& id, int32_t slots, int32_t credits,
                  std::vector<std::string> kinds = {"square", "sleep", "echo"}, Labels labels = {},
                  std::vector<TaskRef> held = {}) {
    WorkerHello hello;
    hello.worker_id = id;
    hello.name = id;
    hello.kinds = std::move(kinds);
    hello.slots = slots;
    hello.labels = std::move(labels);
    hello.held = std::move(held);
    hello.master_epoch = broker_->epoch();
    hello.secret = secrets_[id];  // as a worker that reconnects shows its welcome's
    auto channel = std::make_shared<FakeChannel>();
    auto handle = broker_->Attach(hello, channel);
    EXPECT_TRUE(handle.ok()) << handle.status();
    if (channel->welcome) secrets_[id] = channel->welcome->secret;
    if (credits > 0) broker_->AddCredits(*handle, credits);
    return {*handle, channel};
  }

  std::map<std::string, std::string> secrets_;  // worker id → the secret of its last welcome

  void Report(const Attached& w, const LeasedTask& t, Outcome outcome, std::string out = "") {
    TaskReport r;
    r.id = t.id;
    r.attempt = t.attempt;
    r.outcome = outcome;
    if (outcome == Outcome::kSucceeded) {
      r.output = std::move(out);
    } else {
      r.error = std::move(out);
    }
    broker_->Report(w.handle, {r});
  }

  TaskState State(TaskId id) { return broker_->GetTask(kClient, id)->state; }

  void Pass(int64_t ms) { testing::PassTime(clock_, *broker_, ms); }

  BrokerOptions options_;
  FakeClock clock_;
  std::unique_ptr<Store> store_ = NewMemoryStore();
  std::unique_ptr<Broker> broker_;
};

TEST_F(BrokerTest, HigherPriorityFirstThenFifo) {
  SubmitOne(Spec("square", "a", 0));
  SubmitOne(Spec("square", "b", 5));
  SubmitOne(Spec("square", "c", 0));
  SubmitOne(Spec("square", "d", 5));
  auto w = Attach("w", 1, 4);
  std::vector<std::string> order;
  for (const auto& t : w.channel->Take()) order.push_back(t.payload);
  EXPECT_EQ(order, (std::vector<std::string>{"b", "d", "a", "c"}));
}

TEST_F(BrokerTest, TenantsSeeOnlyTheirOwnWork) {
  const Caller acme{"acme"}, beta{"beta"}, admin{"", /*sees_all=*/true};
  auto job = Submit({Spec("square", "3")}, acme);
  ASSERT_TRUE(job.ok()) << job.status();
  const TaskId id = job->task_ids[0];
  auto w = Attach("w", 1, 1);
  ASSERT_EQ(w.channel->Take().size(), 1u);  // workers serve every tenant's queues

  // Another tenant gets the answer an id never used gets, word for word.
  auto unknown_task = broker_->GetTask(beta, 999'999);
  auto unknown_job = broker_->GetJob(beta, "job-00000000");
  auto watcher = std::make_shared<CountingWatcher>();
  for (absl::Status status :
       {broker_->GetTask(beta, id).status(), broker_->GetJob(beta, job->job_id).status(),
        broker_->ReadJob(beta, job->job_id, 0, 10, 1 << 20).status(),
        broker_->Watch(beta, job->job_id, watcher), broker_->CancelTask(beta, id).status(),
        broker_->CancelJob(beta, job->job_id).status(), broker_->GetTask(kClient, id).status()}) {
    EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  }
  EXPECT_EQ(broker_->GetTask(beta, id).status().message(),
            absl::StrReplaceAll(unknown_task.status().message(), {{"999999", std::to_string(id)}}));
  EXPECT_EQ(broker_->GetJob(beta, job->job_id).status().message(),
            absl::StrReplaceAll(unknown_job.status().message(), {{"job-00000000", job->job_id}}));
  EXPECT_EQ(broker_->GetTask(admin, id)->state, TaskState::kLeased);  // nothing was cancelled

  EXPECT_TRUE(broker_->GetTask(acme, id).ok());
  EXPECT_TRUE(broker_->GetTask(admin, id).ok());
  EXPECT_EQ(*broker_->CancelJob(admin, job->job_id), 1);
}

TEST_F(BrokerTest, IdempotencyKeysArePerTenant) {
  TaskSpec a = Spec("square", "3");
  a.idempotency_key = "nightly";
  TaskSpec b = Spec("square", "4");  // other work under the same key: fine in another tenant
  b.idempotency_key = "nightly";
  auto first = Submit({a}, Caller{"acme"});
  auto other = Submit({b}, Caller{"beta"});
  ASSERT_TRUE(first.ok() && other.ok()) << first.status() << other.status();
  EXPECT_NE(first->task_ids[0], other->task_ids[0]);
  auto again = Submit({a}, Caller{"acme"});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->task_ids[0], first->task_ids[0]);
  EXPECT_EQ(Submit({b}, Caller{"acme"}).status().code(), absl::StatusCode::kAlreadyExists);
}

TEST_F(BrokerTest, TenantPendingLimit) {
  options_.tenant_limits.max_pending = 3;
  Reset();
  broker_->SetTenantLimits({{"big", TenantLimits{10, -1}}});
  const Caller acme{"acme"};
  ASSERT_TRUE(Submit({Spec("square", "1"), Spec("square", "2")}, acme).ok());
  auto over = Submit({Spec("square", "3"), Spec("square", "4")}, acme);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(over.status().message(), "tenant 'acme' has 2 unfinished"))
      << over.status();
  // Others have their own count, and a named tenant its own limit.
  EXPECT_TRUE(Submit({Spec("square", "1"), Spec("square", "2"), Spec("square", "3")}).ok());
  EXPECT_TRUE(Submit(std::vector<TaskSpec>(8, Spec("square", "5")), Caller{"big"}).ok());
  // Finished tasks make room; a refused batch took none.
  auto w = Attach("w", 1, 1, {"square"});
  for (const LeasedTask& t : w.channel->Take()) Report(w, t, Outcome::kSucceeded, "ok");
  EXPECT_TRUE(Submit({Spec("square", "3"), Spec("square", "4")}, acme).ok());
}

TEST_F(BrokerTest, TenantSubmitRate) {
  options_.tenant_limits.submit_rate = 10;
  Reset();
  const Caller acme{"acme"};
  ASSERT_TRUE(Submit(std::vector<TaskSpec>(15, Spec("square", "1")), acme).ok());  // overdraws
  auto refused = Submit({Spec("square", "2")}, acme);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "retry in")) << refused.status();
  EXPECT_TRUE(Submit({Spec("square", "2")}, Caller{"beta"}).ok());
  Pass(400);  // 4 of the 5 overdrawn come back: still in debt
  EXPECT_FALSE(Submit({Spec("square", "2")}, acme).ok());
  Pass(200);
  EXPECT_TRUE(Submit({Spec("square", "2")}, acme).ok());
}

TEST_F(BrokerTest, WelcomeCarriesEpochAndTimers) {
  auto w = Attach("w", 1, 0);
  ASSERT_TRUE(w.channel->welcome);
  EXPECT_EQ(w.channel->welcome->master_epoch, broker_->epoch());
  EXPECT_EQ(w.channel->welcome->lease_timeout_ms, options_.lease_timeout_ms);
}

TEST_F(BrokerTest, DelayedTaskWaitsForItsTime) {
  TaskSpec s = Spec("square", "7");
  s.delay_ms = 3'000;
  const TaskId id = SubmitOne(s);
  auto w = Attach("w", 1, 1);
  EXPECT_EQ(State(id), TaskState::kDelayed);
  clock_.Advance(2'999);
  broker_->Tick();
  EXPECT_TRUE(w.channel->Take().empty());
  clock_.Advance(1);
  broker_->Tick();
  auto tasks = w.channel->Take();
  ASSERT_EQ(tasks.size(), 1u);
  EXPECT_EQ(tasks[0].id, id);
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

TEST_F(BrokerTest, UnservedKindWaitsAndSaysWhy) {
  auto out = Submit({Spec("resize", "img")});
  ASSERT_TRUE(out.ok());
  ASSERT_EQ(out->warnings.size(), 1u);
  EXPECT_NE(out->warnings[0].find("kind 'resize'"), std::string::npos);
  auto task = broker_->GetTask(kClient, out->task_ids[0]);
  EXPECT_EQ(task->state, TaskState::kPending);
  EXPECT_NE(task->waiting_for.find("no connected worker runs kind 'resize'"), std::string::npos);
  auto w = Attach("w", 1, 0, {"resize"});
  EXPECT_NE(broker_->GetTask(kClient, out->task_ids[0])->waiting_for.find("busy"),
            std::string::npos);
}

TEST_F(BrokerTest, SuccessIsRecordedOnceAndAcked) {
  const TaskId id = SubmitOne(Spec("square", "3"));
  auto w = Attach("w", 1, 1);
  auto tasks = w.channel->Take();
  ASSERT_EQ(tasks.size(), 1u);
  Report(w, tasks[0], Outcome::kSucceeded, "3*3=9");
  Report(w, tasks[0], Outcome::kSucceeded, "duplicate");
  EXPECT_EQ(broker_->DuplicateResults(), 1);
  auto task = broker_->GetTask(kClient, id);
  EXPECT_EQ(task->state, TaskState::kSucceeded);
  EXPECT_EQ(task->output, "3*3=9");
  EXPECT_EQ(w.channel->acked.size(), 2u);  // both acknowledged, one recorded
  auto stats = broker_->QueueStats();
  ASSERT_EQ(stats.size(), 1u);
  EXPECT_EQ(stats[0].succeeded, 1);
  EXPECT_EQ(stats[0].pending, 0);
  EXPECT_EQ(stats[0].leased, 0);
}

TEST_F(BrokerTest, FailureRetriesWithExponentialBackoffThenDies) {
  TaskSpec s = Spec("square", "x");
  s.max_attempts = 3;
  const TaskId id = SubmitOne(s);
  auto w = Attach("w", 1, 10);
  for (int attempt = 1; attempt <= 3; ++attempt) {
    auto tasks = w.channel->Take();
    ASSERT_EQ(tasks.size(), 1u) << "attempt " << attempt;
    EXPECT_EQ(tasks[0].attempt, attempt);
    Report(w, tasks[0], Outcome::kFailed, "boom " + std::to_string(attempt));
    if (attempt == 3) break;
    EXPECT_EQ(State(id), TaskState::kDelayed);
    const int64_t backoff = 1'000 << (attempt - 1);  // 1 s, then 2 s
    clock_.Advance(backoff - 1);
    broker_->Tick();
    EXPECT_TRUE(w.channel->Take().empty());
    EXPECT_EQ(State(id), TaskState::kDelayed);
    clock_.Advance(1);
    broker_->Tick();
  }
  auto task = broker_->GetTask(kClient, id);
  EXPECT_EQ(task->state, TaskState::kDead);
  EXPECT_EQ(task->error, "boom 3");
  EXPECT_EQ(task->attempts, 3);
  EXPECT_EQ(broker_->QueueStats()[0].failed, 3);
}

TEST_F(BrokerTest, PermanentFailureDiesAtOnce) {
  const TaskId id = SubmitOne(Spec("square", "abc"));
  auto w = Attach("w", 1, 1);
  auto tasks = w.channel->Take();
  TaskReport r{tasks[0].id, tasks[0].attempt, Outcome::kFailed, "", "not an integer", true};
  broker_->Report(w.handle, {r});
  EXPECT_EQ(State(id), TaskState::kDead);
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
  int64_t failures = 0;
  for (const auto& q : broker_->QueueStats()) failures += q.failed;
  // The lapsed lease of `other` (it ran on "c") and the failure, once; `id`'s lapse not at all.
  EXPECT_EQ(failures, 2);
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

TEST_F(BrokerTest, IdempotencyKeyReturnsTheFirstTask) {
  TaskSpec s = Spec("square", "5");
  s.idempotency_key = "order-17";
  auto first = Submit({s});
  auto second = Submit({s});
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(first->task_ids, second->task_ids);
  EXPECT_NE(first->job_id, second->job_id);
  auto w = Attach("w", 1, 5);
  auto tasks = w.channel->Take();
  ASSERT_EQ(tasks.size(), 1u);  // one task, not two
  Report(w, tasks[0], Outcome::kSucceeded, "5*5=25");
  // Both jobs see it finish.
  EXPECT_EQ(broker_->GetJob(kClient, first->job_id)->succeeded, 1);
  EXPECT_EQ(broker_->GetJob(kClient, second->job_id)->succeeded, 1);
  auto third = Submit({s});
  EXPECT_EQ(broker_->GetJob(kClient, third->job_id)->done, 1);
}

TEST_F(BrokerTest, IdempotencyKeyWithDifferentWorkIsRefused) {
  TaskSpec s = Spec("square", "5");
  s.idempotency_key = "order-18";
  auto first = Submit({s});
  ASSERT_TRUE(first.ok());
  for (auto change : std::vector<std::function<void(TaskSpec&)>>{
           [](TaskSpec& t) { t.payload = "66"; }, [](TaskSpec& t) { t.kind = "echo"; },
           [](TaskSpec& t) { t.queue = "other"; }, [](TaskSpec& t) { t.priority = 3; },
           [](TaskSpec& t) {
             t.labels = {{"gpu", "1"}};
           },
           [](TaskSpec& t) { t.max_attempts = 7; }}) {
    TaskSpec other = s;
    change(other);
    auto again = Submit({other});
    EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists) << again.status();
  }
  // The defaults resolved, the same spec is the same work.
  TaskSpec explicit_defaults = s;
  explicit_defaults.max_attempts = 3;
  EXPECT_TRUE(Submit({explicit_defaults}).ok());
  // Within one batch too.
  TaskSpec a = Spec("echo", "a"), b = Spec("echo", "b");
  a.idempotency_key = b.idempotency_key = "batch-key";
  EXPECT_EQ(Submit({a, b}).status().code(), absl::StatusCode::kAlreadyExists);
  auto same = Submit({a, a});
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->task_ids[0], same->task_ids[1]);
}

TEST_F(BrokerTest, CancelPendingAndLeased) {
  const TaskId pending = SubmitOne(Spec("echo", "p"));
  EXPECT_EQ(*broker_->CancelTask(kClient, pending), 1);
  EXPECT_EQ(State(pending), TaskState::kCancelled);
  EXPECT_EQ(*broker_->CancelTask(kClient, pending), 0);  // already finished

  const TaskId leased = SubmitOne(Spec("sleep", "10000"));
  auto w = Attach("w", 1, 1);
  auto tasks = w.channel->Take();
  ASSERT_EQ(tasks.size(), 1u);
  EXPECT_EQ(tasks[0].id, leased);  // the cancelled one was never sent
  EXPECT_EQ(*broker_->CancelTask(kClient, leased), 1);
  EXPECT_EQ(w.channel->cancels, std::vector<TaskId>{leased});
  EXPECT_EQ(State(leased), TaskState::kCancelled);
  // The slot stays taken until the worker reports.
  EXPECT_EQ(broker_->Workers()[0].running, 1);
  Report(w, tasks[0], Outcome::kCancelled, "stopped");
  EXPECT_EQ(State(leased), TaskState::kCancelled);
  EXPECT_EQ(broker_->Workers()[0].running, 0);
  EXPECT_TRUE(absl::IsNotFound(broker_->CancelTask(kClient, 12345).status()));
}

TEST_F(BrokerTest, CancelJobCancelsUnfinishedTasks) {
  auto out = Submit({Spec("echo", "1"), Spec("echo", "2"), Spec("echo", "3")});
  auto w = Attach("w", 1, 1);
  auto tasks = w.channel->Take();
  Report(w, tasks[0], Outcome::kSucceeded, "1");
  EXPECT_EQ(*broker_->CancelJob(kClient, out->job_id), 2);
  auto job = broker_->GetJob(kClient, out->job_id);
  EXPECT_EQ(job->done, 3);
  EXPECT_EQ(job->succeeded, 1);
  EXPECT_EQ(job->cancelled, 2);
}

TEST_F(BrokerTest, WatchersSeeResultsInCompletionOrder) {
  auto out = Submit({Spec("echo", "a"), Spec("echo", "b"), Spec("echo", "c")});
  auto watcher = std::make_shared<CountingWatcher>();
  ASSERT_TRUE(broker_->Watch(kClient, out->job_id, watcher).ok());
  auto w = Attach("w", 3, 3);
  auto tasks = w.channel->Take();
  ASSERT_EQ(tasks.size(), 3u);
  Report(w, tasks[2], Outcome::kSucceeded, "c");
  Report(w, tasks[0], Outcome::kSucceeded, "a");
  EXPECT_EQ(watcher->calls, 2);
  auto events = broker_->ReadJob(kClient, out->job_id, 0, 10, 1 << 20);
  ASSERT_EQ(events->results.size(), 2u);
  EXPECT_EQ(events->results[0].output, "c");
  EXPECT_EQ(events->results[1].output, "a");
  Report(w, tasks[1], Outcome::kSucceeded, "b");
  events = broker_->ReadJob(kClient, out->job_id, 2, 10, 1 << 20);
  ASSERT_EQ(events->results.size(), 1u);
  EXPECT_EQ(events->results[0].output, "b");
  EXPECT_EQ(events->progress.done, 3);
  broker_->Unwatch(out->job_id, watcher.get());
}

TEST_F(BrokerTest, BadInputIsRejectedWithAReason) {
  auto code = [&](TaskSpec s) { return Submit({s}).status().code(); };
  EXPECT_EQ(code(Spec("", "x")), absl::StatusCode::kInvalidArgument);
  TaskSpec bad_queue = Spec("echo", "x");
  bad_queue.queue = "no spaces";
  EXPECT_EQ(code(bad_queue), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Spec("echo", std::string(65, 'x'))), absl::StatusCode::kInvalidArgument);
  TaskSpec negative = Spec("echo", "x");
  negative.timeout_ms = -1;
  EXPECT_EQ(code(negative), absl::StatusCode::kInvalidArgument);
  TaskSpec attempts = Spec("echo", "x");
  attempts.max_attempts = 1000;
  EXPECT_EQ(code(attempts), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Submit({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Submit(std::vector<TaskSpec>(51, Spec("echo", "x"))).status().code(),
            absl::StatusCode::kInvalidArgument);
  const absl::Status status = Submit({Spec("echo", "ok"), Spec("", "x")}).status();
  EXPECT_NE(std::string(status.message()).find("task 1: kind is empty"), std::string::npos);
  EXPECT_TRUE(broker_->QueueStats().empty());  // nothing of a rejected batch was kept
}

// Delays and timeouts end within a century: later ones would overflow the time arithmetic (a
// delay of INT64_MAX ms ran at once).
TEST_F(BrokerTest, DelaysAndTimeoutsAreBounded) {
  auto code = [&](TaskSpec s) { return Submit({s}).status().code(); };
  constexpr int64_t kCentury = int64_t{100} * 365 * 24 * 3600 * 1000;
  TaskSpec forever = Spec("echo", "x");
  forever.delay_ms = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(code(forever), absl::StatusCode::kInvalidArgument);
  forever.delay_ms = 0;
  forever.timeout_ms = kCentury + 1;
  EXPECT_EQ(code(forever), absl::StatusCode::kInvalidArgument);
  TaskSpec century = Spec("echo", "x");
  century.delay_ms = century.timeout_ms = kCentury;
  auto accepted = Submit({century});
  ASSERT_TRUE(accepted.ok()) << accepted.status();
  EXPECT_EQ(broker_->GetTask(kClient, accepted->task_ids[0])->state, TaskState::kDelayed);
}

TEST_F(BrokerTest, FullQueueIsResourceExhausted) {
  ASSERT_TRUE(Submit(std::vector<TaskSpec>(50, Spec("echo", "x"))).ok());
  ASSERT_TRUE(Submit(std::vector<TaskSpec>(50, Spec("echo", "x"))).ok());
  EXPECT_EQ(Submit({Spec("echo", "x")}).status().code(), absl::StatusCode::kResourceExhausted);
  TaskSpec other = Spec("echo", "x");
  other.queue = "other";
  EXPECT_TRUE(Submit({other}).ok());
}

TEST_F(BrokerTest, ResultsExpireAfterRetention) {
  auto out = Submit({Spec("echo", "x")});
  const TaskId id = out->task_ids[0];
  auto w = Attach("w", 1, 1);
  Report(w, w.channel->Take()[0], Outcome::kSucceeded, "x");
  clock_.Advance(59'999);
  broker_->Tick();
  EXPECT_TRUE(broker_->GetTask(kClient, id).ok());
  clock_.Advance(1);
  broker_->Tick();
  EXPECT_TRUE(absl::IsNotFound(broker_->GetTask(kClient, id).status()));
  EXPECT_TRUE(absl::IsNotFound(broker_->GetJob(kClient, out->job_id).status()));
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

TEST_F(BrokerTest, LabelsCountAgainstThePayloadLimit) {
  TaskSpec s = Spec("echo", std::string(options_.max_payload_bytes - 8, 'p'));
  EXPECT_TRUE(Submit({s}).ok());
  s.labels = {{"zone", "eu-west"}};  // 11 bytes more
  EXPECT_EQ(Submit({s}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(BrokerTest, TaskClassesNobodyUsesAreFreed) {
  options_.max_task_classes = 3;
  Reset();
  auto w = Attach("w", 1, 10, {"echo"}, {{"zone", "a"}});
  std::vector<TaskId> ids;
  for (const char* zone : {"a", "b", "c"}) {
    TaskSpec s = Spec("echo", zone);
    s.labels = {{"zone", zone}};
    ids.push_back(SubmitOne(s));
  }
  TaskSpec fourth = Spec("echo", "d");
  fourth.labels = {{"zone", "d"}};
  EXPECT_EQ(Submit({fourth}).status().code(), absl::StatusCode::kResourceExhausted);
  // Those tasks finish and pass retention (cancelled here): their classes go with them.
  for (TaskId id : ids) EXPECT_TRUE(broker_->CancelTask(kClient, id).ok());
  Pass(options_.result_retention_ms + 100);
  EXPECT_TRUE(Submit({fourth}).ok());
  // A worker still gets what it can run, from a class made anew.
  TaskSpec again = Spec("echo", "a2");
  again.labels = {{"zone", "a"}};
  const TaskId a2 = SubmitOne(again);
  auto tasks = w.channel->Take();
  ASSERT_FALSE(tasks.empty());
  EXPECT_EQ(tasks.back().id, a2);
}

TEST_F(BrokerTest, CreditsFromAPeerCannotOverflow) {
  auto w = Attach("w", 1, 0);
  broker_->AddCredits(w.handle, std::numeric_limits<int32_t>::max());
  broker_->AddCredits(w.handle, std::numeric_limits<int32_t>::max());
  SubmitOne(Spec("echo", "a"));
  SubmitOne(Spec("echo", "b"));
  EXPECT_EQ(w.channel->Take().size(), 2u);
}

}  // namespace
}  // namespace taskmaster

namespace taskmaster {
namespace {

using testing::CountingWatcher;
using testing::FakeChannel;
using testing::kClient;
using testing::Spec;

// A persistent store whose writes complete only when the test says so.
class HeldStore final : public Store {
 public:
  std::string Epoch() const override { return "held"; }
  bool persistent() const override { return true; }
  absl::Status Load(RecoveryVisitor*) override { return absl::OkStatus(); }
  absl::Status Writable() const override { return absl::OkStatus(); }
  void Submit(SubmitRows rows, std::function<void(absl::Status)> done) override {
    submitted_tasks += rows.tasks.size();
    Flush(std::move(done));
  }
  void UpdateTask(TaskId, TaskStatusRow) override {}
  void DeleteTask(TaskId) override {}
  void DeleteJob(const std::string&) override {}
  void PutWorker(const WorkerRow&) override {}
  void DeleteWorker(const std::string&) override {}
  void Flush(std::function<void(absl::Status)> done) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!open_) {
        waiting_.push_back(std::move(done));
        return;
      }
    }
    done(absl::OkStatus());
  }
  // From now on every flush completes at once.
  void Open() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = true;
    }
    Release();
  }
  // Completes every write waiting so far, with `status`.
  void Release(absl::Status status = absl::OkStatus()) {
    std::vector<std::function<void(absl::Status)>> done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      done.swap(waiting_);
    }
    for (auto& d : done) d(status);
  }
  // Answers what it holds with an error, as a store closing with a disk that does not write, and
  // then whatever those callbacks ask for. Afterwards it calls nobody.
  void Close() override {
    for (int round = 0; round < 100; ++round) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (waiting_.empty()) break;
      }
      Release(absl::UnavailableError("closing"));
    }
    std::lock_guard<std::mutex> lock(mu_);
    closed = true;
  }

  size_t submitted_tasks = 0;
  bool closed = false;

 private:
  std::mutex mu_;
  std::vector<std::function<void(absl::Status)>> waiting_;
  bool open_ = false;
};

// The broker closes its store as it goes: a submit the store still holds is answered then (the
// client is told it was not stored), and no store callback runs after the broker is gone.
TEST(BrokerDurability, ASubmitStillBeingWrittenIsAnsweredWhenTheBrokerGoes) {
  HeldStore store;
  FakeClock clock;
  absl::StatusOr<SubmitOutcome> submitted = absl::UnknownError("not yet");
  {
    Broker broker(BrokerOptions{}, &clock, &store, GetLogger("held-test"));
    broker.Submit(kClient, {Spec("echo", "x")},
                  [&](absl::StatusOr<SubmitOutcome> r) { submitted = r; });
    EXPECT_EQ(submitted.status().code(), absl::StatusCode::kUnknown) << "still being written";
  }
  EXPECT_TRUE(store.closed);
  EXPECT_EQ(submitted.status().code(), absl::StatusCode::kUnavailable)
      << submitted.status().ToString();
}

TEST(BrokerDurability, ResultsShowOnlyOnceOnDiskAndWorkersAreAckedThen) {
  HeldStore store;
  FakeClock clock;
  Broker broker(BrokerOptions{}, &clock, &store, GetLogger("held-test"));
  absl::StatusOr<SubmitOutcome> submitted = absl::UnknownError("not yet");
  broker.Submit(kClient, {Spec("echo", "x")},
                [&](absl::StatusOr<SubmitOutcome> r) { submitted = r; });
  EXPECT_FALSE(submitted.ok()) << "not acknowledged before it is durable";
  store.Release();
  ASSERT_TRUE(submitted.ok());

  WorkerHello hello;
  hello.worker_id = "w";
  hello.kinds = {"echo"};
  auto channel = std::make_shared<FakeChannel>();
  auto handle = broker.Attach(hello, channel);
  broker.AddCredits(*handle, 1);
  auto tasks = channel->Take();
  ASSERT_EQ(tasks.size(), 1u);
  auto watcher = std::make_shared<CountingWatcher>();
  ASSERT_TRUE(broker.Watch(kClient, submitted->job_id, watcher).ok());
  broker.Report(*handle, {{tasks[0].id, tasks[0].attempt, Outcome::kSucceeded, "x", ""}});

  EXPECT_TRUE(broker.ReadJob(kClient, submitted->job_id, 0, 10, 1 << 20)->results.empty());
  EXPECT_FALSE(broker.GetTask(kClient, tasks[0].id)->settled);
  EXPECT_EQ(watcher->calls, 0);
  EXPECT_TRUE(channel->acked.empty());
  store.Release();
  EXPECT_EQ(broker.ReadJob(kClient, submitted->job_id, 0, 10, 1 << 20)->results.size(), 1u);
  EXPECT_TRUE(broker.GetTask(kClient, tasks[0].id)->settled);
  EXPECT_EQ(watcher->calls, 1);
  EXPECT_EQ(channel->acked.size(), 1u);
  store.Open();
}

TEST(BrokerDurability, SubmitIsInvisibleUntilStoredAndLeavesNoTraceWhenRefused) {
  HeldStore store;
  FakeClock clock;
  Broker broker(BrokerOptions{}, &clock, &store, GetLogger("held-test"));
  WorkerHello hello;
  hello.worker_id = "w";
  hello.kinds = {"echo"};
  auto channel = std::make_shared<FakeChannel>();
  auto handle = broker.Attach(hello, channel);
  broker.AddCredits(*handle, 10);

  absl::StatusOr<SubmitOutcome> refused = absl::UnknownError("not yet");
  TaskSpec keyed = Spec("echo", "k");
  keyed.idempotency_key = "k1";
  broker.Submit(kClient, {Spec("echo", "a"), Spec("echo", "b"), keyed},
                [&](absl::StatusOr<SubmitOutcome> r) { refused = r; });
  EXPECT_EQ(store.submitted_tasks, 3u);
  EXPECT_TRUE(channel->Take().empty()) << "nothing runs before it is on disk";
  EXPECT_TRUE(absl::IsNotFound(broker.GetTask(kClient, 1).status()));
  // The same key while the first submit is being stored: retry later, not a second task.
  absl::StatusOr<SubmitOutcome> racing = absl::UnknownError("not yet");
  broker.Submit(kClient, {keyed}, [&](absl::StatusOr<SubmitOutcome> r) { racing = r; });
  EXPECT_EQ(racing.status().code(), absl::StatusCode::kAborted) << racing.status();

  store.Release(absl::ResourceExhaustedError("disk full"));
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(absl::IsUnavailable(refused.status())) << refused.status();
  EXPECT_NE(refused.status().message().find("none of its tasks were kept"), std::string::npos);
  EXPECT_TRUE(channel->Take().empty());
  for (TaskId id : {1, 2, 3}) EXPECT_TRUE(absl::IsNotFound(broker.GetTask(kClient, id).status()));
  for (const QueueStatsView& q : broker.QueueStats()) EXPECT_EQ(q.pending, 0) << q.queue;

  // The key is free again, and a stored submit runs.
  absl::StatusOr<SubmitOutcome> stored = absl::UnknownError("not yet");
  broker.Submit(kClient, {keyed, Spec("echo", "c")},
                [&](absl::StatusOr<SubmitOutcome> r) { stored = r; });
  store.Release();
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_EQ(channel->Take().size(), 2u);
  EXPECT_TRUE(broker.GetJob(kClient, stored->job_id).ok());
  store.Open();
}

}  // namespace
}  // namespace taskmaster
