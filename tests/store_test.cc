// The SQLite store under the broker: what a restart recovers, and what the store refuses.
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <sys/stat.h>

#include <atomic>
#include <filesystem>
#include <functional>
#include <future>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "master/core/broker.h"
#include "master/store/completer.h"
#include "master/store/sqlite_store.h"
#include "tests/fakes.h"
#include "tests/harness.h"

namespace taskmaster {
namespace {

using testing::ReadFile;
using testing::TempDir;
using testing::WriteFile;

using testing::FakeChannel;
using testing::kClient;
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
    absl::Status opened = TryOpen();
    ASSERT_TRUE(opened.ok()) << opened;
  }

  absl::Status TryOpen() {
    auto store = OpenSqliteStore({dir_.path(), SyncMode::kNormal});
    if (!store.ok()) return store.status();
    store_ = std::move(*store);
    broker_ = std::make_unique<Broker>(options_, &clock_, store_.get(), GetLogger("store-test"));
    return broker_->Recover();
  }

  void Close() {
    broker_.reset();
    store_.reset();
  }

  // Changes the closed store behind taskmaster's back.
  void Sql(const std::string& sql) {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(dir_.File("taskmaster.db").c_str(), &db), SQLITE_OK);
    EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr), SQLITE_OK) << sql;
    sqlite3_close(db);
  }

  // Closes the store after `damage`, expects the start to be refused naming `expected`.
  // Returns whether the start was refused.
  bool ExpectRefused(const std::function<void()>& damage, const std::string& expected) {
    Close();
    damage();
    absl::Status opened = TryOpen();
    EXPECT_TRUE(absl::IsDataLoss(opened)) << opened;
    EXPECT_NE(std::string(opened.message()).find(expected), std::string::npos) << opened;
    EXPECT_NE(std::string(opened.message()).find("--repair"), std::string::npos) << opened;
    Close();
    return absl::IsDataLoss(opened);
  }

  // Tasks the open store serves (none of these tests runs any).
  int64_t PendingTasks() {
    int64_t pending = 0;
    for (const QueueStatsView& q : broker_->QueueStats()) pending += q.pending;
    return pending;
  }

  // What --repair moved aside, and how many of those records are tasks.
  std::pair<std::string, int64_t> Rejected() {
    std::string text;
    for (const auto& entry : std::filesystem::directory_iterator(dir_.path())) {
      if (entry.path().filename().string().starts_with("rejected-")) text += ReadFile(entry.path());
    }
    int64_t tasks = 0;
    for (size_t at = text.find("\"table\":\"tasks\""); at != std::string::npos;
         at = text.find("\"table\":\"tasks\"", at + 1)) {
      ++tasks;
    }
    return {text, tasks};
  }

  SubmitOutcome Submit(std::vector<TaskSpec> specs, const Caller& caller = kClient) {
    std::promise<absl::StatusOr<SubmitOutcome>> done;
    broker_->Submit(caller, std::move(specs),
                    [&](absl::StatusOr<SubmitOutcome> r) { done.set_value(r); });
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
    hello.secret = secrets_[id];  // kept across restarts, as a worker keeps it
    auto channel = std::make_shared<FakeChannel>();
    auto handle = broker_->Attach(hello, channel);
    EXPECT_TRUE(handle.ok()) << handle.status();
    if (channel->welcome) secrets_[id] = channel->welcome->secret;
    if (credits > 0) broker_->AddCredits(*handle, credits);
    return {*handle, channel};
  }

  std::map<std::string, std::string> secrets_;  // worker id → the secret of its last welcome

  void Pass(int64_t ms) { testing::PassTime(clock_, *broker_, ms); }

  TaskView Task(TaskId id) {
    auto t = broker_->GetTask(kClient, id);
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

// Two jobs of marked payloads, on disk: {A0, A1, A2} and {B0, B1}.
std::vector<SubmitOutcome> SubmitMarked(
    const std::function<SubmitOutcome(std::vector<TaskSpec>)>& submit) {
  return {submit({Spec("square", "PAYLOAD-A0"), Spec("square", "PAYLOAD-A1"),
                  Spec("square", "PAYLOAD-A2")}),
          submit({Spec("square", "PAYLOAD-B0"), Spec("square", "PAYLOAD-B1")})};
}

TEST_F(StoreTest, AFlippedByteStopsTheStartAndRepairMovesTheRecordAside) {
  auto jobs = SubmitMarked([this](auto specs) { return Submit(std::move(specs)); });
  Durable();
  const TaskId damaged = jobs[0].task_ids[1];
  const bool refused = ExpectRefused(
      [&] {
        // Closing checkpointed the log: the payload is in the database file itself.
        std::string bytes = ReadFile(dir_.File("taskmaster.db"));
        const size_t at = bytes.find("PAYLOAD-A1");
        ASSERT_NE(at, std::string::npos);
        bytes[at + 8] ^= 0x04;  // 'A' becomes 'E'
        WriteFile(dir_.File("taskmaster.db"), bytes);
      },
      absl::StrCat("task ", damaged, ": checksum mismatch"));

  auto report = RepairSqliteStore({dir_.path()});
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_NE(report->find("moved 1 records (0 jobs, 1 tasks, 0 job members, 0 workers)"),
            std::string::npos)
      << *report;
  EXPECT_NE(report->find("1 jobs missing tasks"), std::string::npos) << *report;
  const auto [rejected, moved] = Rejected();
  EXPECT_NE(rejected.find(absl::StrCat("\"id\":", damaged)), std::string::npos) << rejected;

  Open();
  std::cout << "FIGURES flipped byte in the database: acknowledged=5 refused_to_start=" << refused
            << " recorded_after_repair=" << PendingTasks() << " moved_aside=" << moved << std::endl;
  EXPECT_TRUE(absl::IsNotFound(broker_->GetTask(kClient, damaged).status()));
  EXPECT_EQ(broker_->GetJob(kClient, jobs[0].job_id)->total, 2);
  EXPECT_EQ(Task(jobs[0].task_ids[2]).payload, "PAYLOAD-A2");
  EXPECT_EQ(broker_->GetJob(kClient, jobs[1].job_id)->total, 2);
  Restart();  // and it stays sound
}

TEST_F(StoreTest, RecordsChangedOrRemovedBehindItsBackStopTheStart) {
  auto jobs = SubmitMarked([this](auto specs) { return Submit(std::move(specs)); });
  Durable();
  Close();
  const std::string clean = ReadFile(dir_.File("taskmaster.db"));
  const TaskId a0 = jobs[0].task_ids[0], a1 = jobs[0].task_ids[1];
  const std::string change_kind = absl::StrCat("UPDATE tasks SET kind='rm-rf' WHERE id=", a1);
  const std::string drop_task = absl::StrCat("DELETE FROM tasks WHERE id=", a0);
  const std::string drop_job = absl::StrCat("DELETE FROM jobs WHERE job_id='", jobs[1].job_id, "'");
  int refused = 0;
  for (const auto& [damage, expected] : std::vector<std::pair<std::string, std::string>>{
           {change_kind, absl::StrCat("task ", a1, ": checksum mismatch in what was submitted")},
           {absl::StrCat("UPDATE tasks SET state=3 WHERE id=", a1),
            absl::StrCat("task ", a1, ": checksum mismatch in its status")},
           {drop_task, absl::StrCat("job ", jobs[0].job_id, ": it has 2 of its 3 tasks")},
           {drop_job, absl::StrCat("its job ", jobs[1].job_id, " is not stored")}}) {
    refused += ExpectRefused(
        // `damage` by reference: clang 14 cannot capture a structured binding.
        [&, &damage = damage] {
          WriteFile(dir_.File("taskmaster.db"), clean);
          Sql(damage);
        },
        expected);
  }
  WriteFile(dir_.File("taskmaster.db"), clean);
  Sql(change_kind + ";" + drop_task + ";" + drop_job);
  auto report = RepairSqliteStore({dir_.path()});
  ASSERT_TRUE(report.ok()) << report.status();
  // Job A keeps one task of three; job B's two tasks lost their job.
  EXPECT_NE(report->find("moved 3 records (0 jobs, 3 tasks"), std::string::npos) << *report;
  Open();
  std::cout << "FIGURES records changed or removed behind its back: acknowledged=5 "
               "refused_to_start="
            << refused << "_of_4 recorded_after_repair=" << PendingTasks()
            << " moved_aside=" << Rejected().second << " removed_by_hand=1" << std::endl;
  EXPECT_EQ(broker_->GetJob(kClient, jobs[0].job_id)->total, 1);
  EXPECT_TRUE(absl::IsNotFound(broker_->GetJob(kClient, jobs[1].job_id).status()));
  EXPECT_TRUE(absl::IsNotFound(broker_->GetTask(kClient, a1).status()));
}

TEST_F(StoreTest, AStoreThatLostCommittedWritesIsRefused) {
  // A copy of the database file without its write-ahead log, as a deleted or truncated WAL
  // leaves it: the commits since the last checkpoint are gone.
  Submit({Spec("square", "1")});
  Durable();
  Close();
  Open();  // the first job is checkpointed into the file now
  Submit({Spec("square", "2"), Spec("square", "3")});
  Durable();
  TempDir copy;
  std::filesystem::copy_file(dir_.File("taskmaster.db"), copy.File("taskmaster.db"));
  std::filesystem::copy_file(dir_.File("COMMITS"), copy.File("COMMITS"));
  auto lost = OpenSqliteStore({copy.path()});
  ASSERT_FALSE(lost.ok());
  EXPECT_TRUE(absl::IsDataLoss(lost.status())) << lost.status();
  EXPECT_NE(std::string(lost.status().message()).find("write-ahead log"), std::string::npos)
      << lost.status();
  auto report = RepairSqliteStore({copy.path()});
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_NE(report->find("had lost its last"), std::string::npos) << *report;
  auto repaired = OpenSqliteStore({copy.path()});
  EXPECT_TRUE(repaired.ok()) << repaired.status();

  // A database deleted outright, its mark left behind.
  TempDir gone;
  std::filesystem::copy_file(dir_.File("COMMITS"), gone.File("COMMITS"));
  auto empty = OpenSqliteStore({gone.path()});
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(std::string(empty.status().message()).find("was deleted"), std::string::npos)
      << empty.status();
}

// Opens the store in `dir` with a broker that recovered it, and hands the broker to `use`.
void WithRecoveredBroker(const TempDir& dir, const std::function<void(Broker&)>& use) {
  auto store = OpenSqliteStore({dir.path()});
  ASSERT_TRUE(store.ok()) << store.status();
  FakeClock clock;
  Broker broker(BrokerOptions{}, &clock, store->get(), GetLogger("store-test"));
  ASSERT_TRUE(broker.Recover().ok());
  use(broker);
}

// Close runs every callback the store holds before it returns; a call after it is answered at
// once, by the caller's own thread, so no callback ever runs after Close.
TEST(SqliteStore, CloseAnswersEveryCallbackBeforeItReturns) {
  TempDir dir;
  auto store = OpenSqliteStore({dir.path()});
  ASSERT_TRUE(store.ok()) << store.status();
  std::atomic<int> answered{0};
  for (int i = 0; i < 50; ++i) {
    SubmitRows rows;
    rows.job = {"job-" + std::to_string(i), 0, 0, ""};
    (*store)->Submit(std::move(rows), [&](absl::Status s) {
      EXPECT_TRUE(s.ok()) << s;
      answered++;
    });
    (*store)->Flush([&](absl::Status) { answered++; });
  }
  (*store)->Close();
  EXPECT_EQ(answered.load(), 100);
  absl::Status after;
  (*store)->Flush([&](absl::Status s) { after = s; });
  EXPECT_TRUE(after.ok()) << "everything was written: " << after;
  (*store)->Close();  // idempotent
}

TEST(Completer, RunsCallbacksInOrderAndThoseTheyPostBeforeClosing) {
  std::vector<int> ran;
  Completer completer;
  for (int i = 0; i < 3; ++i) {
    std::vector<Completer::Callback> callbacks;
    callbacks.push_back([&, i](absl::Status) {
      ran.push_back(i);
      if (i == 2) {  // one posted by a callback while the completer closes
        std::vector<Completer::Callback> more;
        more.push_back([&](absl::Status s) { ran.push_back(s.ok() ? 3 : -1); });
        EXPECT_TRUE(completer.Post(std::move(more), absl::OkStatus()));
      }
    });
    ASSERT_TRUE(completer.Post(std::move(callbacks), absl::OkStatus()));
  }
  completer.Close();
  EXPECT_EQ(ran, (std::vector<int>{0, 1, 2, 3}));
  std::vector<Completer::Callback> late;
  late.push_back([&](absl::Status) { ran.push_back(4); });
  EXPECT_FALSE(completer.Post(std::move(late), absl::OkStatus()));
  ASSERT_EQ(late.size(), 1u) << "refused callbacks stay with the caller";
  EXPECT_EQ(ran.size(), 4u) << "nothing runs after Close";
}

TEST(SqliteStore, Version1DatabaseIsMigrated) {
  TempDir dir;
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(dir.File("taskmaster.db").c_str(), &db), SQLITE_OK);
  // Schema version 1 as it was released, with one job of one finished task.
  const char* v1 = R"sql(
PRAGMA journal_mode=WAL;
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE jobs(job_id TEXT PRIMARY KEY, total INTEGER NOT NULL, created_ms INTEGER NOT NULL)
  WITHOUT ROWID;
CREATE TABLE tasks(
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, queue TEXT NOT NULL, kind TEXT NOT NULL,
  labels TEXT NOT NULL, payload BLOB NOT NULL, priority INTEGER NOT NULL,
  max_attempts INTEGER NOT NULL, timeout_ms INTEGER NOT NULL, created_ms INTEGER NOT NULL,
  idempotency_key TEXT NOT NULL,
  state INTEGER NOT NULL, attempts INTEGER NOT NULL, not_before_ms INTEGER NOT NULL,
  finished_ms INTEGER NOT NULL, seq INTEGER NOT NULL, completion_seq INTEGER NOT NULL,
  output BLOB NOT NULL, error TEXT NOT NULL, worker TEXT NOT NULL, worker_id TEXT NOT NULL);
CREATE TABLE job_members(job_id TEXT NOT NULL, task_id INTEGER NOT NULL,
  position INTEGER NOT NULL, PRIMARY KEY(job_id, task_id)) WITHOUT ROWID;
INSERT INTO meta VALUES('epoch', 'db-0123abcd');
INSERT INTO jobs VALUES('job-1', 1, 1000);
INSERT INTO tasks VALUES(7, 'job-1', 'default', 'square', '', '4', 0, 3, 1000, 1000, '',
  3, 1, 0, 2000, 1, 1, '4*4=16', '', 'w', '');
PRAGMA application_id=1414353713;
PRAGMA user_version=1;
)sql";
  ASSERT_EQ(sqlite3_exec(db, v1, nullptr, nullptr, nullptr), SQLITE_OK) << sqlite3_errmsg(db);
  sqlite3_close(db);
  for (int start = 0; start < 2; ++start) {  // migrated, then opened as it is
    WithRecoveredBroker(dir, [](Broker& broker) {
      EXPECT_EQ(broker.epoch(), "db-0123abcd");
      auto task = broker.GetTask(kClient, 7);
      ASSERT_TRUE(task.ok()) << task.status();
      EXPECT_EQ(task->output, "4*4=16");
    });
  }
}

TEST(SqliteStore, Version2DatabaseIsMigrated) {
  TempDir dir;
  std::string job_id;
  WithRecoveredBroker(dir, [&](Broker& broker) {
    std::promise<absl::StatusOr<SubmitOutcome>> done;
    broker.Submit(kClient, {Spec("square", "4")},
                  [&](absl::StatusOr<SubmitOutcome> r) { done.set_value(r); });
    auto submitted = done.get_future().get();
    ASSERT_TRUE(submitted.ok());
    job_id = submitted->job_id;
  });
  // Version 2 was version 3 without tenants.
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(dir.File("taskmaster.db").c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "ALTER TABLE jobs DROP COLUMN tenant; PRAGMA user_version=2;", nullptr,
                         nullptr, nullptr),
            SQLITE_OK)
      << sqlite3_errmsg(db);
  sqlite3_close(db);
  for (int start = 0; start < 2; ++start) {  // migrated, then opened as it is
    WithRecoveredBroker(dir, [&](Broker& broker) {
      EXPECT_TRUE(broker.GetJob(kClient, job_id).ok());  // the default tenant's
      EXPECT_TRUE(absl::IsNotFound(broker.GetJob(Caller{"acme"}, job_id).status()));
    });
  }
}

TEST(SqliteStore, TheDataDirectoryIsTheOwnersOnly) {
  TempDir parent;
  const std::string dir = parent.File("data");
  const mode_t old_umask = umask(0);  // the most permissive a user could run with
  {
    auto store = OpenSqliteStore({dir});
    umask(old_umask);
    ASSERT_TRUE(store.ok()) << store.status();
    auto mode = [](const std::string& path) {
      struct stat st {};
      EXPECT_EQ(stat(path.c_str(), &st), 0) << path;
      return st.st_mode & 0777;
    };
    EXPECT_EQ(mode(dir), 0700u);
    for (const char* file : {"taskmaster.db", "taskmaster.db-wal", "LOCK", "COMMITS"}) {
      EXPECT_EQ(mode(dir + "/" + file), 0600u) << file;
    }
  }
  // Writable by others: refused.
  ASSERT_EQ(chmod(dir.c_str(), 0777), 0);
  auto open = OpenSqliteStore({dir});
  ASSERT_FALSE(open.ok());
  EXPECT_NE(std::string(open.status().message()).find("written by other users"), std::string::npos)
      << open.status();
  ASSERT_EQ(chmod(dir.c_str(), 0700), 0);
  // A LOCK that is a symbolic link is not followed.
  std::filesystem::remove(dir + "/LOCK");
  std::filesystem::create_symlink(parent.File("elsewhere"), dir + "/LOCK");
  EXPECT_FALSE(OpenSqliteStore({dir}).ok());
  EXPECT_FALSE(std::filesystem::exists(parent.File("elsewhere")));
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
