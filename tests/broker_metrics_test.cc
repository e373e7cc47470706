// What the broker counts and times for metrics and the status page: queue counters by state,
// the oldest ready task's age, waits and run times by kind, the latest failures.
#include "tests/broker_fixture.h"

namespace taskmaster::testing {
namespace {

QueueStatsView QueueNamed(const BrokerMetrics& m, const std::string& queue) {
  for (const QueueStatsView& q : m.queues) {
    if (q.queue == queue) return q;
  }
  ADD_FAILURE() << "no queue " << queue;
  return {};
}

const KindTimesView* KindNamed(const BrokerMetrics& m, const std::string& kind) {
  for (const KindTimesView& k : m.kinds) {
    if (k.kind == kind) return &k;
  }
  return nullptr;
}

TEST_F(BrokerTest, MetricsCountTasksByStateAndOutcome) {
  TaskSpec delayed = Spec("square", "1");
  delayed.delay_ms = 60'000;
  SubmitOne(delayed);
  TaskSpec flaky = Spec("square", "2");
  flaky.max_attempts = 2;
  SubmitOne(flaky);
  SubmitOne(Spec("square", "3"));
  BrokerMetrics m = broker_->Metrics();
  QueueStatsView q = QueueNamed(m, "default");
  EXPECT_EQ(q.submitted, 3);
  EXPECT_EQ(q.pending, 3);
  EXPECT_EQ(q.delayed, 1);

  auto w = Attach("w", 2, 2);
  auto tasks = w.channel->Take();
  ASSERT_EQ(tasks.size(), 2u);
  Report(w, tasks[0], Outcome::kFailed, "boom");  // flaky: retried after its backoff
  Report(w, tasks[1], Outcome::kSucceeded, "3*3=9");
  q = QueueNamed(broker_->Metrics(), "default");
  EXPECT_EQ(q.pending, 2);
  EXPECT_EQ(q.delayed, 2);
  EXPECT_EQ(q.leased, 0);
  EXPECT_EQ(q.succeeded, 1);
  EXPECT_EQ(q.failed, 1);
  EXPECT_EQ(q.retried, 1);
  EXPECT_EQ(q.redelivered, 0);

  // Its second attempt is leased, and the worker goes silent: the lease is lost, which is the
  // last attempt, so the task dies.
  Pass(1'000);
  broker_->AddCredits(w.handle, 1);
  ASSERT_EQ(w.channel->Take().size(), 1u);
  EXPECT_EQ(QueueNamed(broker_->Metrics(), "default").leased, 1);
  Pass(10'000);
  m = broker_->Metrics();
  q = QueueNamed(m, "default");
  EXPECT_EQ(q.leased, 0);
  EXPECT_EQ(q.failed, 2);
  EXPECT_EQ(q.retried, 1);
  EXPECT_EQ(q.dead, 1);
  ASSERT_EQ(m.failures.size(), 2u);
  EXPECT_TRUE(m.failures[0].dead);  // newest first
  EXPECT_EQ(m.failures[0].attempt, 2);
  EXPECT_EQ(m.failures[0].worker, "w");
  EXPECT_FALSE(m.failures[1].dead);
  EXPECT_EQ(m.failures[1].error, "boom");
  EXPECT_EQ(m.failures[1].kind, "square");
}

TEST_F(BrokerTest, MetricsCountRedeliveredLeases) {
  SubmitOne(Spec("square", "4"));
  auto a = Attach("a", 1, 1);
  ASSERT_EQ(a.channel->Take().size(), 1u);
  Pass(10'000);
  const QueueStatsView q = QueueNamed(broker_->Metrics(), "default");
  EXPECT_EQ(q.redelivered, 1);
  EXPECT_EQ(q.retried, 1);
  EXPECT_EQ(q.pending, 1);
}

TEST_F(BrokerTest, OldestReadyAgeFollowsTheHeadOfTheQueue) {
  SubmitOne(Spec("square", "1"));
  EXPECT_EQ(QueueNamed(broker_->Metrics(), "default").oldest_ready_age_ms, 0);
  clock_.Advance(2'000);
  SubmitOne(Spec("square", "2"));
  clock_.Advance(500);
  EXPECT_EQ(QueueNamed(broker_->Metrics(), "default").oldest_ready_age_ms, 2'500);
  auto w = Attach("w", 1, 1);  // takes the older one
  ASSERT_EQ(w.channel->Take().size(), 1u);
  EXPECT_EQ(QueueNamed(broker_->Metrics(), "default").oldest_ready_age_ms, 500);
  // What Stats answers is the same.
  EXPECT_EQ(broker_->QueueStats()[0].oldest_ready_age_ms, 500);
}

// Cancelled tasks at the head of a list, however many, do not hide the live ones behind them.
TEST_F(BrokerTest, OldestReadyAgeLooksPastCancelledTasks) {
  options_.max_batch = 200;
  options_.max_queue_length = 1'000;
  Reset();
  std::vector<TaskSpec> first(100, Spec("square", "1"));
  auto cancelled = Submit(first);
  ASSERT_TRUE(cancelled.ok());
  clock_.Advance(4'000);
  SubmitOne(Spec("square", "2"));
  ASSERT_TRUE(broker_->CancelJob(kClient, cancelled->job_id).ok());
  clock_.Advance(1'000);
  EXPECT_EQ(QueueNamed(broker_->Metrics(), "default").oldest_ready_age_ms, 1'000);
}

// A task given back keeps its place at the head, and counts from its submission, not its return.
TEST_F(BrokerTest, OldestReadyAgeCountsAGivenBackTaskFromItsSubmission) {
  const TaskId id = SubmitOne(Spec("square", "1"));
  auto w = Attach("w", 1, 1);
  auto tasks = w.channel->Take();
  ASSERT_EQ(tasks.size(), 1u);
  clock_.Advance(3'000);
  Report(w, tasks[0], Outcome::kReturned);
  EXPECT_EQ(State(id), TaskState::kPending);
  EXPECT_EQ(QueueNamed(broker_->Metrics(), "default").oldest_ready_age_ms, 3'000);
}

TEST_F(BrokerTest, MetricsTimeWaitsAndRunsByKind) {
  SubmitOne(Spec("square", "1"));
  clock_.Advance(1'500);
  auto w = Attach("w", 1, 1);
  auto tasks = w.channel->Take();
  ASSERT_EQ(tasks.size(), 1u);
  clock_.Advance(250);
  Report(w, tasks[0], Outcome::kSucceeded, "1");
  const BrokerMetrics m = broker_->Metrics();
  const KindTimesView* square = KindNamed(m, "square");
  ASSERT_NE(square, nullptr);
  EXPECT_EQ(square->wait_seconds.count(), 1u);
  EXPECT_DOUBLE_EQ(square->wait_seconds.sum(), 1.5);
  EXPECT_EQ(square->run_seconds.count(), 1u);
  EXPECT_DOUBLE_EQ(square->run_seconds.sum(), 0.25);
}

TEST_F(BrokerTest, MetricsKeepAFixedNumberOfKindsApart) {
  options_.max_metric_kinds = 2;
  Reset();
  for (const char* kind : {"a", "b", "c", "d"}) SubmitOne(Spec(kind, "x"));
  const BrokerMetrics m = broker_->Metrics();
  ASSERT_EQ(m.kinds.size(), 3u);
  EXPECT_NE(KindNamed(m, "a"), nullptr);
  EXPECT_NE(KindNamed(m, "b"), nullptr);
  EXPECT_NE(KindNamed(m, kOtherKinds), nullptr);
}

TEST_F(BrokerTest, RecentFailuresAreBoundedAndCutShort) {
  options_.recent_failures = 3;
  options_.max_batch = 50;
  Reset();
  auto w = Attach("w", 1, 0);
  for (int i = 0; i < 5; ++i) {
    TaskSpec s = Spec("square", std::to_string(i));
    s.max_attempts = 1;
    SubmitOne(s);
    broker_->AddCredits(w.handle, 1);
    auto tasks = w.channel->Take();
    ASSERT_EQ(tasks.size(), 1u);
    Report(w, tasks[0], Outcome::kFailed, std::string(2'000, 'e') + std::to_string(i));
  }
  const BrokerMetrics m = broker_->Metrics();
  ASSERT_EQ(m.failures.size(), 3u);
  EXPECT_EQ(m.failures[0].error.size(), 512u);
  EXPECT_GT(m.failures[0].task_id, m.failures[2].task_id);
}

TEST_F(BrokerTest, WorkersShowHowLongAgoTheyWereHeard) {
  auto w = Attach("w", 1, 1);
  clock_.Advance(7'000);
  EXPECT_EQ(broker_->Workers().at(0).heartbeat_age_ms, 7'000);
  broker_->Heartbeat(w.handle);
  EXPECT_EQ(broker_->Workers().at(0).heartbeat_age_ms, 0);
}

}  // namespace
}  // namespace taskmaster::testing
