#pragma once

// The fixture of the store tests (store_*_test.cc): a broker over the SQLite store in a temp
// directory, restarted as a crash would leave it, and ways to damage the closed store.

#include <gtest/gtest.h>
#include <sqlite3.h>

#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "common/logging.h"
#include "master/core/broker.h"
#include "master/store/sqlite_store.h"
#include "tests/fakes.h"
#include "tests/harness.h"

namespace taskmaster::testing {

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

}  // namespace taskmaster::testing
