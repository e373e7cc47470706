// The SQLite store under the broker: what a restart recovers, and what the store refuses.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <filesystem>
#include <future>

#include "common/logging.h"
#include "master/broker.h"
#include "tests/fakes.h"
#include "tests/harness.h"

namespace taskmaster {
namespace {

using testing::ReadFile;
using testing::TempDir;
using testing::WriteFile;

using testing::FakeChannel;
using testing::Spec;

class StoreTest : public ::testing::Test {
 protected:
  StoreTest() {
    options_.lease_timeout_ms = 10'000;
    options_.reconnect_grace_ms = 5'000;
    options_.retry_backoff_ms = 30'000;
    options_.result_retention_ms = 3'600'000;
    Open();
  }

  // Closes the master's state as a crash would leave it (after the last commit) and reopens it.
  void Restart() {
    broker_.reset();
    store_.reset();
    Open();
  }

  void Open() {
    auto store = OpenSqliteStore({dir_.path(), SyncMode::kNormal});
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    broker_ = std::make_unique<Broker>(options_, &clock_, store_.get(), GetLogger("store-test"));
    absl::Status recovered = broker_->Recover();
    ASSERT_TRUE(recovered.ok()) << recovered;
  }

  SubmitOutcome Submit(std::vector<TaskSpec> specs) {
    std::promise<absl::StatusOr<SubmitOutcome>> done;
    broker_->Submit(std::move(specs), [&](absl::StatusOr<SubmitOutcome> r) { done.set_value(r); });
    auto result = done.get_future().get();
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? *result : SubmitOutcome{};
  }

  void Durable() {
    std::promise<absl::Status> done;
    broker_->WhenDurable([&](absl::Status s) { done.set_value(s); });
    EXPECT_TRUE(done.get_future().get().ok());
  }

  struct Attached {
    Broker::WorkerHandle handle;
    std::shared_ptr<FakeChannel> channel;
  };

  Attached Attach(const std::string& id, int32_t credits, std::vector<TaskRef> held = {}) {
    WorkerHello hello;
    hello.worker_id = id;
    hello.name = id;
    hello.kinds = {"square", "fail", "sleep"};
    hello.slots = 1;
    hello.held = std::move(held);
    hello.master_epoch = broker_->epoch();
    auto channel = std::make_shared<FakeChannel>();
    auto handle = broker_->Attach(hello, channel);
    EXPECT_TRUE(handle.ok());
    if (credits > 0) broker_->AddCredits(*handle, credits);
    return {*handle, channel};
  }

  TaskView Task(TaskId id) {
    auto t = broker_->GetTask(id);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : TaskView{};
  }

  BrokerOptions options_;
  FakeClock clock_;
  TempDir dir_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<Broker> broker_;
};

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
  EXPECT_EQ(*broker_->CancelTask(ids[6]), 1);
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
  auto progress = broker_->GetJob(job.job_id);
  EXPECT_EQ(progress->done, 2);
  EXPECT_EQ(progress->succeeded, 1);
  EXPECT_EQ(progress->cancelled, 1);
  auto events = broker_->ReadJob(job.job_id, 0, 10, 1 << 20);
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

TEST_F(StoreTest, LeasesOfAWorkerThatNeverReturnsAreRequeuedCounted) {
  auto job = Submit({Spec("square", "7")});
  auto w = Attach("gone", 1);
  ASSERT_EQ(w.channel->Take().size(), 1u);
  Durable();
  Restart();
  const TaskId id = job.task_ids[0];
  EXPECT_EQ(Task(id).state, TaskState::kLeased);
  clock_.Advance(5'000);
  broker_->Tick();
  EXPECT_EQ(Task(id).state, TaskState::kPending);
  EXPECT_EQ(Task(id).attempts, 1);
  auto other = Attach("other", 1);
  auto got = other.channel->Take();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].attempt, 2);
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
  EXPECT_TRUE(absl::IsNotFound(broker_->GetJob(job.job_id).status()));
  EXPECT_TRUE(absl::IsNotFound(broker_->GetTask(job.task_ids[0]).status()));
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
  auto before = broker_->ReadJob(second.job_id, 0, 10, 1 << 20);
  ASSERT_EQ(before->results.size(), 2u);
  Restart();
  auto after = broker_->ReadJob(second.job_id, 0, 10, 1 << 20);
  ASSERT_EQ(after->results.size(), before->results.size());
  for (size_t i = 0; i < before->results.size(); ++i) {
    EXPECT_EQ(after->results[i].id, before->results[i].id);
  }
  EXPECT_EQ(after->progress.done, 2);
}

TEST(SqliteStore, SecondMasterOnTheSameDirectoryIsRefused) {
  TempDir dir;
  auto first = OpenSqliteStore({dir.path()});
  ASSERT_TRUE(first.ok());
  auto second = OpenSqliteStore({dir.path()});
  ASSERT_FALSE(second.ok());
  EXPECT_NE(std::string(second.status().message()).find("in use by another master"),
            std::string::npos)
      << second.status();
  first->reset();
  EXPECT_TRUE(OpenSqliteStore({dir.path()}).ok()) << "free again once the first one is gone";
}

TEST(SqliteStore, CorruptDatabaseIsRefusedAndLeftUntouched) {
  TempDir dir;
  std::string garbage(8192, '\0');
  for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<char>(i * 7 + 3);
  WriteFile(dir.File("taskmaster.db"), garbage);
  auto store = OpenSqliteStore({dir.path()});
  ASSERT_FALSE(store.ok());
  EXPECT_NE(std::string(store.status().message()).find("left untouched"), std::string::npos)
      << store.status();
  EXPECT_EQ(ReadFile(dir.File("taskmaster.db")), garbage);
}

TEST(SqliteStore, ForeignOrNewerSchemaIsRefusedAndLeftUntouched) {
  TempDir dir;
  {
    auto store = OpenSqliteStore({dir.path()});
    ASSERT_TRUE(store.ok());
  }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(dir.File("taskmaster.db").c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "PRAGMA user_version=99", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  const std::string before = ReadFile(dir.File("taskmaster.db"));
  auto newer = OpenSqliteStore({dir.path()});
  ASSERT_FALSE(newer.ok());
  EXPECT_NE(std::string(newer.status().message()).find("schema version 99"), std::string::npos)
      << newer.status();
  EXPECT_EQ(ReadFile(dir.File("taskmaster.db")), before);

  TempDir other;
  ASSERT_EQ(sqlite3_open(other.File("taskmaster.db").c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "CREATE TABLE t(x)", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  auto foreign = OpenSqliteStore({other.path()});
  ASSERT_FALSE(foreign.ok());
  EXPECT_NE(std::string(foreign.status().message()).find("not a taskmaster database"),
            std::string::npos);
}

}  // namespace
}  // namespace taskmaster
