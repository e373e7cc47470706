// The SQLite store under the broker across restarts: every state, tenants, leases, worker ids,
// idempotency keys, retention and a followed job's order come back as they were.
#include <gtest/gtest.h>

#include <future>
#include <memory>
#include <string>
#include <vector>

#include "master/core/broker.h"
#include "tests/fakes.h"
#include "tests/store_fixture.h"

namespace taskmaster {
namespace {

using testing::FakeChannel;
using testing::kClient;
using testing::Spec;
using testing::StoreTest;

TEST_F(StoreTest, RestartRecoversEveryState) {
  const std::string epoch = broker_->epoch();
  TaskSpec delayed = Spec("square", "1");
  delayed.delay_ms = 60'000;
  TaskSpec keyed = Spec("square", "2");
  keyed.idempotency_key = "key-2";
  TaskSpec high = Spec("square", "3");
  high.priority = 9;
  TaskSpec retrying = Spec("fail", "boom");
  retrying.max_attempts = 5;
  retrying.priority = 10;
  auto job = Submit({delayed, keyed, high, retrying, Spec("square", "4"), Spec("square", "5"),
                     Spec("sleep", "10"), Spec("square", "6")});
  const auto& ids = job.task_ids;
  // Leases: the failing task and "3" by priority; then "2" is leased, run and recorded.
  auto w = Attach("w1", 2);
  auto first = w.channel->Take();
  ASSERT_EQ(first.size(), 2u);
  EXPECT_EQ(first[0].id, ids[3]);
  TaskReport failed{first[0].id, first[0].attempt, Outcome::kFailed, "", "boom 1"};
  TaskReport done{first[1].id, first[1].attempt, Outcome::kSucceeded, "3*3=9", ""};
  broker_->Report(w.handle, {failed, done});
  broker_->AddCredits(w.handle, 2);
  auto second = w.channel->Take();
  ASSERT_EQ(second.size(), 2u);  // "2" and "4"; both stay leased
  EXPECT_EQ(second[0].id, ids[1]);
  EXPECT_EQ(*broker_->CancelTask(kClient, ids[6]), 1);
  Durable();
  const int64_t delayed_until = Task(ids[0]).not_before_ms;

  Restart();
  EXPECT_EQ(broker_->epoch(), epoch);
  EXPECT_EQ(Task(ids[0]).state, TaskState::kDelayed);
  EXPECT_EQ(Task(ids[0]).not_before_ms, delayed_until);
  EXPECT_EQ(Task(ids[3]).state, TaskState::kDelayed);
  EXPECT_EQ(Task(ids[3]).attempts, 1);
  EXPECT_EQ(Task(ids[3]).error, "boom 1");
  EXPECT_EQ(Task(ids[2]).state, TaskState::kSucceeded);
  EXPECT_EQ(Task(ids[2]).output, "3*3=9");
  EXPECT_EQ(Task(ids[6]).state, TaskState::kCancelled);
  EXPECT_EQ(Task(ids[1]).state, TaskState::kLeased);
  EXPECT_EQ(Task(ids[4]).state, TaskState::kLeased);
  auto progress = broker_->GetJob(kClient, job.job_id);
  EXPECT_EQ(progress->done, 2);
  EXPECT_EQ(progress->succeeded, 1);
  EXPECT_EQ(progress->cancelled, 1);
  auto events = broker_->ReadJob(kClient, job.job_id, 0, 10, 1 << 20);
  ASSERT_EQ(events->results.size(), 2u);
  EXPECT_EQ(events->results[0].id, ids[2]);  // completion order kept
  EXPECT_EQ(events->results[1].id, ids[6]);

  // The key still answers with the first task.
  EXPECT_EQ(Submit({keyed}).task_ids[0], ids[1]);

  // w1 comes back holding "2" but not "4": "2" stays its own, "4" returns unused.
  auto back = Attach("w1", 0, {{ids[1], 1}});
  EXPECT_EQ(Task(ids[1]).state, TaskState::kLeased);
  EXPECT_EQ(Task(ids[4]).state, TaskState::kPending);
  EXPECT_EQ(Task(ids[4]).attempts, 0);
  broker_->Report(back.handle, {{ids[1], 1, Outcome::kSucceeded, "2*2=4", ""}});
  EXPECT_EQ(Task(ids[1]).output, "2*2=4");

  // The rest go out in their old order: "4" (back at its place), "5", "6".
  broker_->AddCredits(back.handle, 3);
  std::vector<TaskId> order;
  for (const auto& t : back.channel->Take()) order.push_back(t.id);
  EXPECT_EQ(order, (std::vector<TaskId>{ids[4], ids[5], ids[7]}));
}

TEST_F(StoreTest, TenantsKeepTheirJobsKeysAndCountsAcrossARestart) {
  options_.tenant_limits.max_pending = 2;
  Restart();
  const Caller acme{"acme"}, beta{"beta"};
  TaskSpec keyed = Spec("square", "3");
  keyed.idempotency_key = "k";
  const SubmitOutcome job = Submit({keyed, Spec("square", "4")}, acme);
  Durable();
  Restart();
  EXPECT_TRUE(broker_->GetJob(acme, job.job_id).ok());
  EXPECT_TRUE(absl::IsNotFound(broker_->GetJob(beta, job.job_id).status()));
  EXPECT_TRUE(absl::IsNotFound(broker_->GetTask(beta, job.task_ids[0]).status()));
  // The key is still acme's, and acme's two unfinished tasks still count.
  EXPECT_EQ(Submit({keyed}, acme).task_ids, std::vector<TaskId>{job.task_ids[0]});
  EXPECT_NE(Submit({keyed}, beta).task_ids[0], job.task_ids[0]);
  std::promise<absl::Status> refused;
  broker_->Submit(acme, {Spec("square", "5")},
                  [&](absl::StatusOr<SubmitOutcome> r) { refused.set_value(r.status()); });
  EXPECT_TRUE(absl::IsResourceExhausted(refused.get_future().get()));
}

TEST_F(StoreTest, LeasesOfAWorkerThatNeverReturnsAreRequeuedCounted) {
  auto job = Submit({Spec("square", "7")});
  auto w = Attach("gone", 1);
  ASSERT_EQ(w.channel->Take().size(), 1u);
  Durable();
  Restart();
  const TaskId id = job.task_ids[0];
  EXPECT_EQ(Task(id).state, TaskState::kLeased);
  // Its grace has passed, but it may still run the task for a lease period from the restart.
  Pass(options_.reconnect_grace_ms);
  EXPECT_EQ(Task(id).state, TaskState::kLeased);
  Pass(options_.lease_timeout_ms - options_.reconnect_grace_ms);
  EXPECT_EQ(Task(id).state, TaskState::kPending);
  EXPECT_EQ(Task(id).attempts, 1);
  auto other = Attach("other", 1);
  auto got = other.channel->Take();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].attempt, 2);
  // The worker is forgotten on disk too: the next restart waits for nobody but "other".
  Durable();
  Restart();
  EXPECT_EQ(broker_->Workers().size(), 1u);
}

TEST_F(StoreTest, AWorkerKeepsItsIdAcrossARestartOnlyWithItsSecret) {
  Submit({Spec("square", "5")});
  auto w = Attach("w1", 1);
  ASSERT_EQ(w.channel->Take().size(), 1u);
  Durable();
  Restart();
  WorkerHello thief;
  thief.worker_id = "w1";
  thief.kinds = {"square"};
  thief.master_epoch = broker_->epoch();
  EXPECT_EQ(broker_->Attach(thief, std::make_shared<FakeChannel>()).status().code(),
            absl::StatusCode::kPermissionDenied);
  Attach("w1", 0);  // with the secret it was given: welcome
}

TEST_F(StoreTest, RepeatedIdempotencyKeysInABatchAreOneTaskAcrossARestart) {
  TaskSpec a = Spec("square", "3");
  a.idempotency_key = "same";
  auto first = Submit({a, a, a});
  EXPECT_EQ(first.task_ids, (std::vector<TaskId>(3, first.task_ids[0])));
  auto second = Submit({a, Spec("square", "4"), a});
  EXPECT_EQ(second.task_ids[0], first.task_ids[0]);
  EXPECT_EQ(second.task_ids[2], first.task_ids[0]);
  EXPECT_EQ(broker_->GetJob(kClient, first.job_id)->total, 1);
  EXPECT_EQ(broker_->GetJob(kClient, second.job_id)->total, 2);
  Durable();
  Restart();  // every job has exactly the records it claims
  EXPECT_EQ(broker_->GetJob(kClient, second.job_id)->total, 2);
  auto w = Attach("w", 1);
  auto tasks = w.channel->Take();
  ASSERT_EQ(tasks.size(), 1u);
  broker_->Report(w.handle, {{tasks[0].id, tasks[0].attempt, Outcome::kSucceeded, "9", ""}});
  broker_->AddCredits(w.handle, 1);
  tasks = w.channel->Take();
  ASSERT_EQ(tasks.size(), 1u);
  broker_->Report(w.handle, {{tasks[0].id, tasks[0].attempt, Outcome::kSucceeded, "16", ""}});
  Durable();
  EXPECT_EQ(broker_->GetJob(kClient, first.job_id)->done, 1);
  EXPECT_EQ(broker_->GetJob(kClient, second.job_id)->done, 2);
}

TEST_F(StoreTest, RetentionDeletesFinishedJobsFromDisk) {
  options_.result_retention_ms = 1'000;
  Restart();
  auto job = Submit({Spec("square", "8")});
  auto w = Attach("w", 1);
  auto t = w.channel->Take();
  broker_->Report(w.handle, {{t[0].id, t[0].attempt, Outcome::kSucceeded, "8*8=64", ""}});
  clock_.Advance(1'000);
  broker_->Tick();
  Durable();
  Restart();
  EXPECT_TRUE(absl::IsNotFound(broker_->GetJob(kClient, job.job_id).status()));
  EXPECT_TRUE(absl::IsNotFound(broker_->GetTask(kClient, job.task_ids[0]).status()));
  // Ids are never reused.
  EXPECT_GT(Submit({Spec("square", "9")}).task_ids[0], job.task_ids[0]);
}

TEST_F(StoreTest, FollowingJobKeepsItsOrderAcrossRestart) {
  TaskSpec keyed = Spec("square", "10");
  keyed.idempotency_key = "k10";
  auto first = Submit({keyed});
  auto w = Attach("w", 1);
  auto t = w.channel->Take();
  broker_->Report(w.handle, {{t[0].id, t[0].attempt, Outcome::kSucceeded, "10*10=100", ""}});
  auto second = Submit({Spec("square", "11"), keyed});
  broker_->AddCredits(w.handle, 1);
  t = w.channel->Take();
  ASSERT_EQ(t.size(), 1u);
  broker_->Report(w.handle, {{t[0].id, t[0].attempt, Outcome::kSucceeded, "11*11=121", ""}});
  Durable();
  auto before = broker_->ReadJob(kClient, second.job_id, 0, 10, 1 << 20);
  ASSERT_EQ(before->results.size(), 2u);
  Restart();
  auto after = broker_->ReadJob(kClient, second.job_id, 0, 10, 1 << 20);
  ASSERT_EQ(after->results.size(), before->results.size());
  for (size_t i = 0; i < before->results.size(); ++i) {
    EXPECT_EQ(after->results[i].id, before->results[i].id);
  }
  EXPECT_EQ(after->progress.done, 2);
}

}  // namespace
}  // namespace taskmaster
