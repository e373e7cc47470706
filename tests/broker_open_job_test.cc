// Broker unit tests of jobs built from several submits: batches in order, each once, the job
// complete only once closed, bounds on open jobs, and the master closing one left idle.
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

std::vector<TaskSpec> Squares(int from, int count) {
  std::vector<TaskSpec> specs;
  for (int i = from; i < from + count; ++i) specs.push_back(Spec("square", std::to_string(i)));
  return specs;
}

TEST_F(BrokerTest, AJobOfSeveralBatchesCompletesOnlyOnceClosed) {
  auto opened = SubmitTo({"", 0, /*keep_open=*/true}, Squares(0, 3));
  ASSERT_TRUE(opened.ok()) << opened.status();
  const std::string job = opened->job_id;
  EXPECT_EQ(opened->batch, 0);
  auto w = Attach("w", 4, 100);
  for (const auto& t : w.channel->Take()) Report(w, t, Outcome::kSucceeded, "r");
  // Every task so far is done, but the job is open: not complete, and not expiring.
  auto view = broker_->GetJob(kClient, job);
  ASSERT_TRUE(view.ok());
  EXPECT_TRUE(view->open);
  EXPECT_EQ(view->done, 3);
  EXPECT_EQ(view->total, 3);

  Pass(options_.result_retention_ms + 1000);  // an open job is never past retention
  ASSERT_TRUE(broker_->GetJob(kClient, job).ok());
  auto second = SubmitTo({job, 1, true}, Squares(3, 2));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->job_id, job);
  EXPECT_EQ(second->batch, 1);
  ASSERT_EQ(second->task_ids.size(), 2u);
  EXPECT_EQ(broker_->GetTask(kClient, second->task_ids[0])->job_id, job);

  auto watcher = std::make_shared<CountingWatcher>();
  ASSERT_TRUE(broker_->Watch(kClient, job, watcher).ok());
  // An empty last batch closes the job; its followers hear of it.
  auto closed = SubmitTo({job, 2, false}, {});
  ASSERT_TRUE(closed.ok()) << closed.status();
  EXPECT_GE(watcher->calls, 1);
  view = broker_->GetJob(kClient, job);
  EXPECT_FALSE(view->open);
  EXPECT_EQ(view->total, 5);
  EXPECT_EQ(view->done, 3);
  for (const auto& t : w.channel->Take()) Report(w, t, Outcome::kSucceeded, "r");
  EXPECT_EQ(broker_->GetJob(kClient, job)->done, 5);
  auto read = broker_->ReadJob(kClient, job, 0, 100, 1 << 20);
  ASSERT_TRUE(read.ok());
  EXPECT_EQ(read->results.size(), 5u);
  Pass(options_.result_retention_ms + 1000);  // closed and complete: forgotten at retention
  EXPECT_TRUE(absl::IsNotFound(broker_->GetJob(kClient, job).status()));
}

TEST_F(BrokerTest, BatchesApplyInOrderAndEachOnce) {
  auto opened = SubmitTo({"", 0, true}, Squares(0, 2));
  ASSERT_TRUE(opened.ok());
  const std::string job = opened->job_id;
  auto first = SubmitTo({job, 1, true}, Squares(2, 2));
  ASSERT_TRUE(first.ok());
  // The same batch again (its answer was lost): applied once, said so.
  auto again = SubmitTo({job, 1, true}, Squares(2, 2));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->duplicate);
  EXPECT_TRUE(again->task_ids.empty());
  EXPECT_EQ(broker_->GetJob(kClient, job)->total, 4);
  // Out of order, or long past: refused with the number it expects.
  auto skipped = SubmitTo({job, 3, true}, Squares(4, 1));
  EXPECT_EQ(skipped.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(skipped.status().message().find("takes batch 2 next"), std::string::npos)
      << skipped.status();
  EXPECT_EQ(SubmitTo({job, 0, true}, Squares(4, 1)).status().code(),
            absl::StatusCode::kInvalidArgument)
      << "batch 0 is the call that opened it, and has no job id";
  EXPECT_EQ(SubmitTo({job, -1, true}, Squares(4, 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SubmitTo({job, 2, true}, {}).status().code(), absl::StatusCode::kInvalidArgument)
      << "only the call that closes a job may be empty";
  ASSERT_TRUE(SubmitTo({job, 2, false}, Squares(4, 1)).ok());
  // Closed: no more batches, though the closing one may be retried.
  auto late = SubmitTo({job, 3, true}, Squares(5, 1));
  EXPECT_EQ(late.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(late.status().message().find("is closed"), std::string::npos) << late.status();
  EXPECT_TRUE(SubmitTo({job, 2, false}, Squares(4, 1))->duplicate);
  EXPECT_EQ(broker_->GetJob(kClient, job)->total, 5);
}

TEST_F(BrokerTest, BatchesOfAJobAreItsTenantsAndBoundLikeAnySubmit) {
  const Caller acme{"acme"}, beta{"beta"}, admin{"acme-admin", /*sees_all=*/true};
  auto opened = SubmitTo({"", 0, true}, Squares(0, 1), acme);
  ASSERT_TRUE(opened.ok());
  const std::string job = opened->job_id;
  EXPECT_TRUE(absl::IsNotFound(SubmitTo({job, 1, true}, Squares(1, 1), beta).status()));
  EXPECT_TRUE(absl::IsPermissionDenied(SubmitTo({job, 1, true}, Squares(1, 1), admin).status()));
  EXPECT_TRUE(absl::IsNotFound(SubmitTo({"job-00000000", 1, true}, Squares(1, 1)).status()));
  // Each batch has the limits of one submit.
  EXPECT_TRUE(absl::IsInvalidArgument(
      SubmitTo({job, 1, true}, Squares(0, static_cast<int>(options_.max_batch) + 1), acme)
          .status()));
  EXPECT_TRUE(absl::IsInvalidArgument(SubmitTo({job, 1, true}, {Spec("", "x")}, acme).status()));
  // A batch number without a job, and an empty new job, make no sense.
  EXPECT_TRUE(absl::IsInvalidArgument(SubmitTo({"", 2, true}, Squares(0, 1)).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(SubmitTo({"", 0, true}, {}).status()));
  // Nothing refused was applied.
  auto view = broker_->GetJob(acme, job);
  EXPECT_EQ(view->total, 1);
  EXPECT_TRUE(SubmitTo({job, 1, false}, Squares(1, 1), acme).ok());
}

TEST_F(BrokerTest, ABatchRepeatsOnlyItsOwnJobsIdempotencyKeys) {
  TaskSpec other = Spec("square", "7");
  other.idempotency_key = "seven";
  ASSERT_TRUE(Submit({other}).ok());
  TaskSpec mine = Spec("square", "8");
  mine.idempotency_key = "eight";
  auto opened = SubmitTo({"", 0, true}, {mine});
  ASSERT_TRUE(opened.ok());
  // Its own key again: the same task, not a second one.
  auto repeat = SubmitTo({opened->job_id, 1, true}, {mine});
  ASSERT_TRUE(repeat.ok()) << repeat.status();
  EXPECT_EQ(repeat->task_ids, opened->task_ids);
  // Another job's: refused, as its place in this job's completion order could not be kept.
  auto foreign = SubmitTo({opened->job_id, 2, true}, {other});
  EXPECT_EQ(foreign.status().code(), absl::StatusCode::kFailedPrecondition) << foreign.status();
  EXPECT_EQ(broker_->GetJob(kClient, opened->job_id)->total, 1);
}

TEST_F(BrokerTest, OpenJobsAreBoundedAndClosedWhenLeftIdle) {
  options_.max_open_jobs = 3;
  options_.tenant_max_open_jobs = 2;
  options_.open_job_timeout_ms = 30'000;
  Reset();
  auto a = SubmitTo({"", 0, true}, Squares(0, 1));
  auto b = SubmitTo({"", 0, true}, Squares(1, 1));
  ASSERT_TRUE(a.ok() && b.ok());
  auto c = SubmitTo({"", 0, true}, Squares(2, 1));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted) << c.status();
  EXPECT_NE(c.status().message().find("--tenant-max-open-jobs"), std::string::npos) << c.status();
  ASSERT_TRUE(SubmitTo({"", 0, true}, Squares(2, 1), Caller{"beta"}).ok()) << "its own share";
  auto d = SubmitTo({"", 0, true}, Squares(2, 1), Caller{"gamma"});
  EXPECT_NE(d.status().message().find("--max-open-jobs"), std::string::npos) << d.status();
  EXPECT_TRUE(Submit(Squares(2, 1)).ok()) << "a closed job is not bounded by it";

  auto watcher = std::make_shared<CountingWatcher>();
  ASSERT_TRUE(broker_->Watch(kClient, a->job_id, watcher).ok());
  Pass(20'000);
  ASSERT_TRUE(SubmitTo({b->job_id, 1, true}, Squares(3, 1)).ok());  // b is in use
  Pass(15'000);
  EXPECT_FALSE(broker_->GetJob(kClient, a->job_id)->open) << "idle past the timeout";
  EXPECT_GE(watcher->calls, 1);
  EXPECT_TRUE(broker_->GetJob(kClient, b->job_id)->open);
  // Its client's next batch is refused, not taken for one applied before.
  auto late = SubmitTo({a->job_id, 1, true}, Squares(4, 1));
  EXPECT_EQ(late.status().code(), absl::StatusCode::kFailedPrecondition) << late.status();
  EXPECT_NE(late.status().message().find("is closed"), std::string::npos) << late.status();
  // A slot is free again.
  EXPECT_TRUE(SubmitTo({"", 0, true}, Squares(5, 1)).ok());
  Pass(31'000);
  EXPECT_FALSE(broker_->GetJob(kClient, b->job_id)->open);
}

// A master that did not run (paused, starved) does not count that time against open jobs.
TEST_F(BrokerTest, APausedMasterClosesNoOpenJobForIdling) {
  options_.open_job_timeout_ms = 30'000;
  Reset();
  auto opened = SubmitTo({"", 0, true}, Squares(0, 1));
  ASSERT_TRUE(opened.ok());
  clock_.Advance(120'000);  // no tick ran meanwhile
  broker_->Tick();
  EXPECT_TRUE(broker_->GetJob(kClient, opened->job_id)->open);
  Pass(31'000);
  EXPECT_FALSE(broker_->GetJob(kClient, opened->job_id)->open) << "idle since the pause";
}

}  // namespace
}  // namespace taskmaster
