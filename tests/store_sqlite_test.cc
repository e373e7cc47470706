// The SQLite store on its own: closing, the completer, migrations of older schemas, the data
// directory's permissions and lock, and databases it refuses and leaves untouched.
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <sys/stat.h>

#include <atomic>
#include <filesystem>
#include <functional>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/logging.h"
#include "master/core/broker.h"
#include "master/store/completer.h"
#include "master/store/sqlite_store.h"
#include "tests/fakes.h"
#include "tests/harness.h"

namespace taskmaster {
namespace {

using testing::kClient;
using testing::ReadFile;
using testing::Spec;
using testing::TempDir;
using testing::WriteFile;

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
    rows.job.job_id = "job-" + std::to_string(i);
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

TEST(Completer, RunsCallbacksOnTheCallerOnlyWhenNothingPostedEarlierWaits) {
  Completer completer;
  const std::thread::id caller = std::this_thread::get_id();
  std::thread::id ran_on;
  std::vector<Completer::Callback> first;
  first.push_back([&](absl::Status) { ran_on = std::this_thread::get_id(); });
  ASSERT_TRUE(completer.RunOrPost(std::move(first), absl::OkStatus()));
  EXPECT_EQ(ran_on, caller) << "nothing waited: it ran here, at once";
  // Behind a callback still queued or running on the completer's thread: after it, there.
  absl::Mutex mu;
  std::vector<int> ran;
  absl::Notification release;
  std::vector<Completer::Callback> slow;
  slow.push_back([&](absl::Status) {
    release.WaitForNotification();
    absl::MutexLock lock(&mu);
    ran.push_back(1);
  });
  ASSERT_TRUE(completer.Post(std::move(slow), absl::OkStatus()));
  std::vector<Completer::Callback> next;
  next.push_back([&](absl::Status) {
    absl::MutexLock lock(&mu);
    ran.push_back(2);
    ran_on = std::this_thread::get_id();
  });
  ASSERT_TRUE(completer.RunOrPost(std::move(next), absl::OkStatus()));
  release.Notify();
  completer.Close();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(ran, (std::vector<int>{1, 2}));
  EXPECT_NE(ran_on, caller);
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
  // Version 2 was version 4 without tenants and jobs of several batches.
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(dir.File("taskmaster.db").c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db,
                         "ALTER TABLE jobs DROP COLUMN tenant; ALTER TABLE jobs DROP COLUMN open; "
                         "ALTER TABLE jobs DROP COLUMN batches; PRAGMA user_version=2;",
                         nullptr, nullptr, nullptr),
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

// An open job survives a restart with its batches: the next one is taken, a repeated one is not.
TEST(SqliteStore, AnOpenJobIsRecoveredOpenWithItsBatches) {
  TempDir dir;
  std::string job_id;
  auto submit = [](Broker& broker, const SubmitTarget& target, std::vector<TaskSpec> specs) {
    std::promise<absl::StatusOr<SubmitOutcome>> done;
    broker.Submit(kClient, target, std::move(specs),
                  [&](absl::StatusOr<SubmitOutcome> r) { done.set_value(r); });
    return done.get_future().get();
  };
  WithRecoveredBroker(dir, [&](Broker& broker) {
    auto opened = submit(broker, {"", 0, true}, {Spec("square", "1"), Spec("square", "2")});
    ASSERT_TRUE(opened.ok()) << opened.status();
    job_id = opened->job_id;
    ASSERT_TRUE(submit(broker, {job_id, 1, true}, {Spec("square", "3")}).ok());
  });
  WithRecoveredBroker(dir, [&](Broker& broker) {
    auto job = broker.GetJob(kClient, job_id);
    ASSERT_TRUE(job.ok()) << job.status();
    EXPECT_TRUE(job->open);
    EXPECT_EQ(job->total, 3);
    EXPECT_TRUE(submit(broker, {job_id, 1, true}, {Spec("square", "3")})->duplicate);
    ASSERT_TRUE(submit(broker, {job_id, 2, false}, {Spec("square", "4")}).ok());
  });
  WithRecoveredBroker(dir, [&](Broker& broker) {
    auto job = broker.GetJob(kClient, job_id);
    ASSERT_TRUE(job.ok()) << job.status();
    EXPECT_FALSE(job->open);
    EXPECT_EQ(job->total, 4);
  });
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
