// The PostgreSQL store under the broker (ctest -L ha): what a master wrote comes back to the next
// one that takes the lease, a commit after a takeover is refused, and a standby waits.
#include <gtest/gtest.h>

#include <future>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "common/logging.h"
#include "master/core/broker.h"
#include "master/store/postgres_store.h"
#include "tests/fakes.h"
#include "tests/ha_harness.h"

namespace taskmaster::testing {
namespace {

#define SKIP_WITHOUT_POSTGRES() \
  if (std::string why = TempPostgres::Unavailable(); !why.empty()) GTEST_SKIP() << why

// Master `id`'s store on the test's PostgreSQL, with short timers.
std::unique_ptr<PostgresStore> OpenStore(const TempPostgres& pg, const std::string& id,
                                         size_t max_statement_bytes = size_t{64} << 20) {
  PostgresStoreOptions o;
  o.conninfo = pg.conninfo();
  o.master_id = id;
  o.lease_ms = 1'000;
  o.retry_interval_ms = 50;
  o.max_statement_bytes = max_statement_bytes;
  auto opened = OpenPostgresStore(o);
  EXPECT_TRUE(opened.ok()) << opened.status();
  return opened.ok() ? std::move(*opened) : nullptr;
}

// A master's store and broker on the test's PostgreSQL, holding the lease.
struct PgMaster {
  PgMaster(const TempPostgres& pg, const std::string& id, FakeClock* clock,
           const BrokerOptions& options, size_t max_statement_bytes = size_t{64} << 20) {
    store = OpenStore(pg, id, max_statement_bytes);
    if (!store) return;
    absl::Status acquired = store->Acquire(
        "127.0.0.1:1", [] { return false; }, [] { return true; },
        [](const PostgresStore::Owner&) {},
        [this](const absl::Status& why) { lost.set_value(why); });
    EXPECT_TRUE(acquired.ok()) << acquired;
    broker = std::make_unique<Broker>(options, clock, store.get(), GetLogger("ha-store-test"));
    absl::Status recovered = broker->Recover();
    EXPECT_TRUE(recovered.ok()) << recovered;
  }

  absl::StatusOr<SubmitOutcome> Submit(std::vector<TaskSpec> specs) {
    std::promise<absl::StatusOr<SubmitOutcome>> done;
    broker->Submit(kClient, std::move(specs),
                   [&](absl::StatusOr<SubmitOutcome> r) { done.set_value(r); });
    return done.get_future().get();
  }

  void Durable() {
    std::promise<absl::Status> done;
    broker->WhenDurable([&](absl::Status s) { done.set_value(s); });
    EXPECT_TRUE(done.get_future().get().ok());
  }

  TaskView Task(TaskId id) {
    auto t = broker->GetTask(kClient, id);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : TaskView{};
  }

  std::unique_ptr<PostgresStore> store;
  std::unique_ptr<Broker> broker;
  std::promise<absl::Status> lost;
};

struct Attached {
  Broker::WorkerHandle handle;
  std::shared_ptr<FakeChannel> channel;
};

// Attaches worker `id`, showing the secret its last welcome gave it (kept in `secret`, as a
// worker keeps it across masters).
Attached Attach(Broker& broker, const std::string& id, std::string* secret, int32_t credits,
                std::vector<TaskRef> held = {}) {
  WorkerHello hello;
  hello.worker_id = id;
  hello.name = id;
  hello.kinds = {"square", "fail"};
  hello.slots = 2;
  hello.held = std::move(held);
  hello.master_epoch = broker.epoch();
  hello.secret = *secret;
  auto channel = std::make_shared<FakeChannel>();
  auto handle = broker.Attach(hello, channel);
  EXPECT_TRUE(handle.ok()) << handle.status();
  if (!handle.ok()) return {{}, channel};
  if (channel->welcome) *secret = channel->welcome->secret;
  if (credits > 0) broker.AddCredits(*handle, credits);
  return {*handle, channel};
}

class PostgresStoreTest : public ::testing::Test {
 protected:
  PostgresStoreTest() {
    options_.lease_timeout_ms = 10'000;
    options_.retry_backoff_ms = 30'000;
    options_.recovery_hold_ms = 3'000;
  }
  BrokerOptions options_;
  FakeClock clock_;
};

// What one master wrote, the next one loads: pending, delayed, retried, succeeded and cancelled
// tasks, their job, idempotency keys, and the workers it awaits; a lease (not written) comes
// back with the worker that holds it.
TEST_F(PostgresStoreTest, TheNextMasterLoadsWhatTheFirstWrote) {
  SKIP_WITHOUT_POSTGRES();
  TempPostgres pg;
  std::vector<TaskId> ids;
  std::string job_id;
  std::string secret;  // w1's
  {
    PgMaster first(pg, "first", &clock_, options_);
    TaskSpec delayed = Spec("square", "1");
    delayed.delay_ms = 60'000;
    TaskSpec keyed = Spec("square", "2");
    keyed.idempotency_key = "key-2";
    TaskSpec failing = Spec("fail", "boom", /*priority=*/9);
    failing.max_attempts = 5;
    auto job = first.Submit({delayed, keyed, failing, Spec("square", "4", 5), Spec("square", "5")});
    ASSERT_TRUE(job.ok()) << job.status();
    ids = job->task_ids;
    job_id = job->job_id;
    auto w = Attach(*first.broker, "w1", &secret, 3);
    auto leased = w.channel->Take();
    ASSERT_EQ(leased.size(), 3u);  // "boom", "4", then "2" (the oldest)
    first.broker->Report(w.handle,
                         {{leased[0].id, leased[0].attempt, Outcome::kFailed, "", "boom 1"},
                          {leased[1].id, leased[1].attempt, Outcome::kSucceeded, "4*4=16", ""}});
    EXPECT_EQ(*first.broker->CancelTask(kClient, ids[4]), 1);
    first.Durable();
  }  // a clean stop: the lease is given up

  PgMaster second(pg, "second", &clock_, options_);
  EXPECT_EQ(second.Task(ids[0]).state, TaskState::kDelayed);
  EXPECT_EQ(second.Task(ids[2]).state, TaskState::kDelayed);
  EXPECT_EQ(second.Task(ids[2]).attempts, 1);
  EXPECT_EQ(second.Task(ids[2]).error, "boom 1");
  EXPECT_EQ(second.Task(ids[3]).state, TaskState::kSucceeded);
  EXPECT_EQ(second.Task(ids[3]).output, "4*4=16");
  EXPECT_EQ(second.Task(ids[4]).state, TaskState::kCancelled);
  // Its lease was not written: pending until w1 comes back holding it.
  EXPECT_EQ(second.Task(ids[1]).state, TaskState::kPending);
  auto progress = second.broker->GetJob(kClient, job_id);
  ASSERT_TRUE(progress.ok());
  EXPECT_EQ(progress->total, 5);
  EXPECT_EQ(progress->done, 2);
  auto again = second.Submit({[] {
    TaskSpec keyed = Spec("square", "2");
    keyed.idempotency_key = "key-2";
    return keyed;
  }()});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->task_ids[0], ids[1]);
  // w1 was attached: dispatch waits for it, and it claims the task it still holds.
  auto back = Attach(*second.broker, "w1", &secret, 0, {{ids[1], 1}});
  EXPECT_EQ(second.Task(ids[1]).state, TaskState::kLeased);
  second.broker->Report(back.handle, {{ids[1], 1, Outcome::kSucceeded, "2*2=4", ""}});
  second.Durable();
  EXPECT_EQ(second.Task(ids[1]).output, "2*2=4");
  EXPECT_EQ(second.Task(ids[1]).attempts, 1);
}

// A commit of one row writes its fields as scalars, a larger one an array of records (see
// PostgresStoreImpl::Write): a task and its result written alone load back exactly as those
// written in a batch.
TEST_F(PostgresStoreTest, ARowWrittenAloneLoadsBackAsOneWrittenInABatch) {
  SKIP_WITHOUT_POSTGRES();
  TempPostgres pg;
  auto spec = [](const std::string& key) {
    TaskSpec s = Spec("square", std::string("\0\xff payload", 10), /*priority=*/7);
    s.timeout_ms = 1'234;
    s.max_attempts = 4;
    s.idempotency_key = key;
    return s;
  };
  TaskId alone = 0;
  std::vector<TaskId> batch;
  {
    PgMaster first(pg, "first", &clock_, options_);
    auto one = first.Submit({spec("alone")});
    ASSERT_TRUE(one.ok()) << one.status();
    alone = one->task_ids[0];
    auto two = first.Submit({spec("batch-1"), spec("batch-2")});
    ASSERT_TRUE(two.ok()) << two.status();
    batch = two->task_ids;
    std::string secret;
    auto w = Attach(*first.broker, "w1", &secret, 3);
    std::map<TaskId, LeasedTask> leased;
    for (LeasedTask& t : w.channel->Take()) leased[t.id] = t;
    ASSERT_EQ(leased.size(), 3u);
    const std::string output("\0\xfe output", 9);
    first.broker->Report(w.handle,
                         {{alone, leased[alone].attempt, Outcome::kSucceeded, output, ""}});
    first.Durable();
    first.broker->Report(w.handle,
                         {{batch[0], leased[batch[0]].attempt, Outcome::kSucceeded, output, ""},
                          {batch[1], leased[batch[1]].attempt, Outcome::kSucceeded, output, ""}});
    first.Durable();
  }
  PgMaster second(pg, "second", &clock_, options_);
  const TaskView a = second.Task(alone);
  EXPECT_EQ(a.state, TaskState::kSucceeded);
  EXPECT_EQ(a.output, std::string("\0\xfe output", 9));
  EXPECT_EQ(a.payload, std::string("\0\xff payload", 10));
  for (TaskId id : batch) {
    const TaskView b = second.Task(id);
    EXPECT_EQ(std::tie(b.queue, b.kind, b.state, b.attempts, b.max_attempts, b.priority, b.payload,
                       b.output, b.error, b.worker, b.created_ms, b.finished_ms, b.not_before_ms),
              std::tie(a.queue, a.kind, a.state, a.attempts, a.max_attempts, a.priority, a.payload,
                       a.output, a.error, a.worker, a.created_ms, a.finished_ms, a.not_before_ms))
        << id;
  }
  // Their jobs and idempotency keys too.
  auto again = second.Submit({spec("alone")});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->task_ids, std::vector<TaskId>{alone});
  auto job = second.broker->GetJob(kClient, again->job_id);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->done, 1);
  again = second.Submit({spec("batch-1"), spec("batch-2")});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->task_ids, batch);
}

// A commit whose rows outgrow one statement (PostgreSQL takes at most 1 GB in one; here a
// kilobyte) is written in several, in the one transaction, and loads back whole.
TEST_F(PostgresStoreTest, ACommitLargerThanAStatementIsWrittenInSeveral) {
  SKIP_WITHOUT_POSTGRES();
  TempPostgres pg;
  std::vector<TaskId> ids;
  {
    PgMaster first(pg, "first", &clock_, options_, /*max_statement_bytes=*/1'000);
    std::vector<TaskSpec> specs;
    for (int i = 0; i < 40; ++i) specs.push_back(Spec("square", std::string(200, 'a' + i % 26)));
    auto job = first.Submit(specs);
    ASSERT_TRUE(job.ok()) << job.status();
    ids = job->task_ids;
    std::string secret;
    auto w = Attach(*first.broker, "w1", &secret, 40);
    std::vector<TaskReport> reports;
    for (const auto& leased : w.channel->Take()) {
      reports.push_back({leased.id, leased.attempt, Outcome::kSucceeded,
                         std::string(300, 'z') + std::to_string(leased.id), ""});
    }
    ASSERT_EQ(reports.size(), 40u);
    first.broker->Report(w.handle, std::move(reports));
    first.Durable();
  }
  EXPECT_EQ(pg.Sql("SELECT count(*) FROM taskmaster.tasks"), "40");
  PgMaster second(pg, "second", &clock_, options_);
  for (TaskId id : ids) {
    const TaskView t = second.Task(id);
    EXPECT_EQ(t.state, TaskState::kSucceeded) << id;
    EXPECT_EQ(t.output, std::string(300, 'z') + std::to_string(id));
  }
}

// Once another master took the lease over, the former holder's commits are refused: the submit
// is answered with the error, and the store says the lease is lost.
TEST_F(PostgresStoreTest, ACommitAfterATakeoverIsRefused) {
  SKIP_WITHOUT_POSTGRES();
  TempPostgres pg;
  PgMaster master(pg, "paused", &clock_, options_);
  ASSERT_TRUE(master.Submit({Spec("square", "1")}).ok());
  // What a standby's takeover does once the lease expired.
  pg.Sql("UPDATE taskmaster.partitions SET owner = 'other', version = version + 1");
  auto refused = master.Submit({Spec("square", "2")});
  EXPECT_TRUE(absl::IsUnavailable(refused.status())) << refused.status();
  EXPECT_NE(refused.status().message().find("taken over by another master"), std::string::npos)
      << refused.status();
  auto lost = master.lost.get_future();
  ASSERT_EQ(lost.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_FALSE(lost.get().ok());
  // And it stays refused: nothing it holds is written any more.
  auto later = master.Submit({Spec("square", "3")});
  EXPECT_FALSE(later.ok());
  EXPECT_FALSE(master.store->Writable().ok());
  EXPECT_EQ(pg.Sql("SELECT count(*) FROM taskmaster.tasks"), "1");
}

// A second master waits while the lease is held and live, naming its holder.
TEST_F(PostgresStoreTest, AStandbyWaitsAndNamesTheHolder) {
  SKIP_WITHOUT_POSTGRES();
  TempPostgres pg;
  PgMaster holder(pg, "holder", &clock_, options_);
  std::unique_ptr<PostgresStore> standby = OpenStore(pg, "standby");
  ASSERT_TRUE(standby);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(1'500);
  PostgresStore::Owner seen;
  absl::Status acquired = standby->Acquire(
      "127.0.0.1:2", [&] { return std::chrono::steady_clock::now() > give_up; },
      [] { return true; }, [&](const PostgresStore::Owner& owner) { seen = owner; },
      [](const absl::Status&) {});
  EXPECT_TRUE(absl::IsCancelled(acquired)) << acquired;
  EXPECT_EQ(seen.master_id, "holder");
  EXPECT_EQ(seen.address, "127.0.0.1:1");
  EXPECT_TRUE(seen.live);
}

// A master cut off (or paused) in the middle of a commit holds its lease row's lock for as long
// as its session lives, and PostgreSQL ends only sessions idle in a transaction, not one cut off
// mid-send: once its lease expired, the master taking over ends that master's sessions.
TEST_F(PostgresStoreTest, ATakeoverEndsTheSessionsOfTheExpiredHolder) {
  SKIP_WITHOUT_POSTGRES();
  TempPostgres pg;
  { PgMaster first(pg, "first", &clock_, options_); }  // creates the schema and the lease row
  pg.Sql(
      "UPDATE taskmaster.partitions SET owner = 'ghost', version = version + 1, "
      "expires_at = now() - interval '1 second'");
  // The ghost's session, inside its commit, holding the row's lock.
  TempDir dir;
  Process ghost(
      {"psql", "-X", "-q", "-d", pg.conninfo() + " application_name=taskmaster:ghost", "-c",
       "BEGIN; SELECT 1 FROM taskmaster.partitions WHERE id = 0 FOR UPDATE; "
       "SELECT pg_sleep(120); COMMIT;"},
      dir.File("ghost.log"));
  ASSERT_TRUE(WaitFor(
      [&] {
        return pg.Sql(
                   "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                   "'taskmaster:ghost' AND query LIKE '%pg_sleep%'") == "1";
      },
      std::chrono::seconds(20)));
  std::unique_ptr<PostgresStore> next = OpenStore(pg, "next");
  ASSERT_TRUE(next);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  absl::Status acquired = next->Acquire(
      "127.0.0.1:3", [&] { return std::chrono::steady_clock::now() > give_up; },
      [] { return true; }, [](const PostgresStore::Owner&) {}, [](const absl::Status&) {});
  EXPECT_TRUE(acquired.ok()) << acquired;
  EXPECT_TRUE(ghost.Wait(std::chrono::seconds(10)).has_value()) << "the ghost's session lives on";
  EXPECT_EQ(pg.Sql("SELECT owner FROM taskmaster.partitions WHERE id = 0"), "next");
}

}  // namespace
}  // namespace taskmaster::testing
