// Broker unit tests of what a submit is given: priorities, tenants and their limits,
// idempotency keys, validation of specs and bounds of queues and task classes.
#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_replace.h"
#include "master/core/broker.h"
#include "tests/broker_fixture.h"
#include "tests/fakes.h"

namespace taskmaster {
namespace {

using testing::BrokerTest;
using testing::CountingWatcher;
using testing::kClient;
using testing::Spec;

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

}  // namespace
}  // namespace taskmaster
