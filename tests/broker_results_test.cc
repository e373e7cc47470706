// Broker unit tests of a task's course after its submit: delays, waiting for a worker, results,
// retries and failures, cancellation, watchers and retention of results.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "master/core/broker.h"
#include "tests/broker_fixture.h"
#include "tests/fakes.h"

namespace taskmaster {
namespace {

using testing::BrokerTest;
using testing::CountingWatcher;
using testing::kClient;
using testing::Spec;

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

TEST_F(BrokerTest, ADelayedTaskShowsWhenItIsDueThenWaitsFromThen) {
  TaskSpec s = Spec("square", "7");
  s.delay_ms = 3'000;
  const int64_t submitted = clock_.NowMs();
  const TaskId id = SubmitOne(s);
  EXPECT_EQ(broker_->GetTask(kClient, id)->not_before_ms, submitted + 3'000);
  clock_.Advance(3'000);
  broker_->Tick();
  EXPECT_EQ(State(id), TaskState::kPending);
  EXPECT_EQ(broker_->GetTask(kClient, id)->not_before_ms, 0);
  clock_.Advance(500);
  // Waiting since it became due, not since it was submitted.
  EXPECT_EQ(broker_->QueueStats()[0].oldest_ready_age_ms, 500);
  ASSERT_TRUE(broker_->CancelTask(kClient, id).ok());
  auto task = broker_->GetTask(kClient, id);
  EXPECT_EQ(task->finished_ms, submitted + 3'500);
  EXPECT_EQ(task->not_before_ms, 0);
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

}  // namespace
}  // namespace taskmaster
