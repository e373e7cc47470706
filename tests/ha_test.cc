// High availability (ctest -L ha): masters sharing a PostgreSQL 15 server that the test starts
// itself. One serves, the others stand by; one killed, paused or cut off from the database is
// replaced, and every acknowledged task gets exactly one recorded result.
#include <signal.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <map>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "tests/ha_harness.h"

namespace taskmaster::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using std::chrono::steady_clock;

constexpr int kExitTempFail = 75;  // a master that stepped down for another

#define SKIP_WITHOUT_POSTGRES() \
  if (std::string why = TempPostgres::Unavailable(); !why.empty()) GTEST_SKIP() << why

int64_t MsSince(steady_clock::time_point t) {
  return std::chrono::duration_cast<milliseconds>(steady_clock::now() - t).count();
}

// Submits `batches` batches of `per_batch` square tasks (payloads 1, 2, ...) with idempotency
// keys, each retried until acknowledged (a master that dies mid-call leaves its outcome unknown;
// the key makes the retry safe), on a thread of its own, for two minutes at most. Keeps each
// acknowledged task id with its payload.
class KeyedSubmitter {
 public:
  KeyedSubmitter(Client* client, int batches, int per_batch)
      : client_(client), batches_(batches), per_batch_(per_batch), thread_([this] { Run(); }) {}
  ~KeyedSubmitter() { Join(); }

  void Join() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
  }
  // Waits (up to two minutes) until every batch is acknowledged or given up on.
  void Finish() {
    WaitFor([&] { return done_.load(); }, seconds(120));
    Join();
  }
  int acked_batches() const { return acked_batches_.load(); }
  // After Finish.
  const std::map<uint64_t, int64_t>& acked() const { return acked_; }

 private:
  void Run() {
    const auto give_up = steady_clock::now() + seconds(120);
    for (int b = 0; b < batches_; ++b) {
      v1::SubmitRequest request;
      for (int i = 0; i < per_batch_; ++i) {
        v1::TaskSpec* t = request.add_tasks();
        t->set_kind("square");
        t->set_payload(std::to_string(b * per_batch_ + i + 1));
        t->set_idempotency_key(absl::StrCat("batch-", b, "-", i));
      }
      absl::StatusOr<v1::SubmitResponse> response;
      do {
        response = client_->Submit(request);
        if (!response.ok()) std::this_thread::sleep_for(milliseconds(100));
      } while (!response.ok() && !stop_.load() && steady_clock::now() < give_up);
      if (!response.ok() || response->task_ids_size() != per_batch_) {
        ADD_FAILURE() << "batch " << b << ": " << response.status();
        break;
      }
      for (int i = 0; i < per_batch_; ++i) {
        acked_[response->task_ids(i)] = b * per_batch_ + i + 1;
      }
      acked_batches_.store(b + 1);
    }
    done_.store(true);
  }

  Client* const client_;
  const int batches_;
  const int per_batch_;
  std::map<uint64_t, int64_t> acked_;  // the submitting thread's until it is joined
  std::atomic<int> acked_batches_{0};
  std::atomic<bool> stop_{false};
  std::atomic<bool> done_{false};
  std::thread thread_;  // last: it runs on the fields above
};

// Waits until every acknowledged task has succeeded in the database, then checks that each has
// exactly one result, the right one, and that no task of another id succeeded twice.
void ExpectEveryResultOnce(const TempPostgres& pg, const std::map<uint64_t, int64_t>& acked) {
  const std::string count_sql = "SELECT count(*) FROM taskmaster.current_tasks WHERE state = 3";
  EXPECT_TRUE(WaitFor([&] { return pg.Sql(count_sql) == std::to_string(acked.size()); },
                      seconds(90), milliseconds(200)))
      << pg.Sql(count_sql) << " of " << acked.size() << " succeeded; by state: "
      << pg.Sql(
             "SELECT string_agg(state || ':' || n, ' ') FROM (SELECT state, count(*) n FROM "
             "taskmaster.current_tasks GROUP BY state) s");
  const std::string rows = pg.Sql(
      "SELECT id || ' ' || convert_from(output, 'UTF8') FROM taskmaster.current_tasks WHERE state "
      "= 3");
  std::map<uint64_t, std::string> results;
  for (absl::string_view line : absl::StrSplit(rows, '\n', absl::SkipEmpty())) {
    std::pair<std::string, std::string> parts = absl::StrSplit(line, absl::MaxSplits(' ', 1));
    uint64_t id = 0;
    ASSERT_TRUE(absl::SimpleAtoi(parts.first, &id)) << line;
    EXPECT_TRUE(results.emplace(id, parts.second).second) << "task " << id << " twice";
  }
  size_t right = 0;
  for (const auto& [id, n] : acked) {
    auto it = results.find(id);
    if (it != results.end() && it->second == Square(n)) ++right;
  }
  EXPECT_EQ(right, acked.size()) << "acknowledged tasks with their one right result";
}

// How many partitions master `i` serves now: its leases that have not expired.
std::string ServedBy(const TempPostgres& pg, const HaCluster& cluster, size_t i) {
  return pg.Sql(absl::StrCat("SELECT count(*) FROM taskmaster.partitions WHERE address = '",
                             cluster.address(i), "' AND expires_at > now()"));
}

// Waits until each of two masters serves two of four partitions: the first takes all four
// alone, and hands two over once the second is counted.
::testing::AssertionResult EachServesTwo(const TempPostgres& pg, const HaCluster& cluster) {
  if (WaitFor([&] { return ServedBy(pg, cluster, 0) == "2" && ServedBy(pg, cluster, 1) == "2"; },
              seconds(30))) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << ServedBy(pg, cluster, 0) << " and " << ServedBy(pg, cluster, 1) << " partitions";
}

// The Python library in the build tree (not built without /usr/bin/python3).
bool PythonLibraryBuilt() {
  return std::filesystem::exists(std::string(TASKMASTER_BINARY_DIR) + "/python/taskmaster");
}

// The seed's scenario with two masters: whichever serves squares ten numbers on the workers.
TEST(HA, SeedScenarioOnTwoMasters) {
  SKIP_WITHOUT_POSTGRES();
  TempPostgres pg;
  HaCluster cluster(&pg, 2);
  ASSERT_TRUE(cluster.StartAll().has_value());
  cluster.StartWorker("w1");
  cluster.StartWorker("w2");
  CommandResult r = cluster.Taskctl(
      {"submit", "--kind", "square", "--wait", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (int n = 1; n <= 10; ++n) EXPECT_NE(r.out.find(Square(n)), std::string::npos) << r.out;
}

// 20,000 tasks on three masters: the serving one SIGKILLed mid-burst, then its successor paused
// past its lease and resumed (it finds another serving, and its late writes are refused).
// Workers and the client, given the three addresses, follow on their own.
TEST(HA, KilledAndPausedMastersLoseNothing) {
  SKIP_WITHOUT_POSTGRES();
  TempPostgres pg;
  HaCluster cluster(&pg, 3, {"--postgres-lease-ms", "1500"});
  std::optional<size_t> first = cluster.StartAll();
  ASSERT_TRUE(first.has_value());
  cluster.StartWorker("w1", {"--threads", "4"});
  cluster.StartWorker("w2", {"--threads", "4"});
  std::unique_ptr<Client> client = cluster.NewClient();
  KeyedSubmitter submitter(client.get(), 40, 500);

  ASSERT_TRUE(WaitFor([&] { return submitter.acked_batches() >= 10; }, seconds(60)));
  const auto killed_at = steady_clock::now();
  cluster.master(*first).Signal(SIGKILL);
  cluster.master(*first).Wait(seconds(10));
  std::optional<size_t> second = cluster.Serving(seconds(20));
  ASSERT_TRUE(second.has_value());
  ASSERT_NE(*second, *first);
  std::cout << "takeover after SIGKILL: " << MsSince(killed_at) << " ms" << std::endl;

  ASSERT_TRUE(WaitFor([&] { return submitter.acked_batches() >= 20; }, seconds(60)));
  const auto paused_at = steady_clock::now();
  cluster.master(*second).Signal(SIGSTOP);
  std::optional<size_t> third;
  ASSERT_TRUE(WaitFor(
      [&] {
        third = cluster.Serving(milliseconds(100));
        return third.has_value() && *third != *second;
      },
      seconds(20), milliseconds(50)));
  std::cout << "takeover after SIGSTOP: " << MsSince(paused_at) << " ms" << std::endl;
  cluster.master(*second).Signal(SIGCONT);
  // Resumed, it finds its lease gone and steps down: nothing it still held is written.
  EXPECT_EQ(cluster.master(*second).Wait(seconds(20)), kExitTempFail)
      << cluster.master(*second).Log();
  EXPECT_NE(cluster.master(*second).Log().find("stepping down"), std::string::npos);

  submitter.Finish();
  ASSERT_EQ(submitter.acked().size(), 20'000u);
  ExpectEveryResultOnce(pg, submitter.acked());
}

// A master whose database connections are cut, and that cannot connect again, stops serving
// within its lease and another takes its work over.
TEST(HA, MasterCutFromPostgresHandsOver) {
  SKIP_WITHOUT_POSTGRES();
  TempPostgres pg;
  // Each master as a database user of its own, so that one alone can be shut out.
  pg.Sql("CREATE ROLE master_a LOGIN SUPERUSER; CREATE ROLE master_b LOGIN SUPERUSER");
  HaCluster cluster(&pg, 2, {"--postgres-lease-ms", "1500"});
  cluster.SetMasterConninfo(0, pg.conninfo("master_a"));
  cluster.SetMasterConninfo(1, pg.conninfo("master_b"));
  cluster.StartMaster(0);
  ASSERT_EQ(cluster.Serving(), std::optional<size_t>(0));
  cluster.StartMaster(1);
  cluster.StartWorker("w1", {"--threads", "4"});
  std::unique_ptr<Client> client = cluster.NewClient();
  KeyedSubmitter submitter(client.get(), 10, 500);
  ASSERT_TRUE(WaitFor([&] { return submitter.acked_batches() >= 3; }, seconds(60)));
  const auto cut_at = steady_clock::now();
  pg.Sql("ALTER ROLE master_a NOLOGIN");
  pg.Sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'master_a'");
  EXPECT_EQ(cluster.master(0).Wait(seconds(20)), kExitTempFail) << cluster.master(0).Log();
  ASSERT_EQ(cluster.Serving(seconds(20)), std::optional<size_t>(1));
  std::cout << "takeover after the cut: " << MsSince(cut_at) << " ms" << std::endl;
  submitter.Finish();
  ExpectEveryResultOnce(pg, submitter.acked());
}

// Two masters serve at once, each its share of the partitions, and one worker given both runs the
// tasks of every partition. The one killed mid-burst has its partitions taken over by the other.
TEST(HA, TwoMastersShareThePartitionsAndTakeOverEachOthers) {
  SKIP_WITHOUT_POSTGRES();
  TempPostgres pg;
  HaCluster cluster(&pg, 2, {"--postgres-lease-ms", "1500", "--postgres-partitions", "4"});
  ASSERT_TRUE(cluster.StartAll().has_value());
  ASSERT_TRUE(EachServesTwo(pg, cluster));
  cluster.StartWorker("w1", {"--threads", "4"});
  std::unique_ptr<Client> client = cluster.NewClient();
  KeyedSubmitter submitter(client.get(), 20, 250);
  ASSERT_TRUE(WaitFor([&] { return submitter.acked_batches() >= 8; }, seconds(60)));
  // Batches went to the partitions of their keys, on both masters.
  EXPECT_EQ(pg.Sql("SELECT count(DISTINCT part) FROM taskmaster.tasks"), "4");
  const auto killed_at = steady_clock::now();
  cluster.master(0).Signal(SIGKILL);
  cluster.master(0).Wait(seconds(10));
  ASSERT_TRUE(
      WaitFor([&] { return ServedBy(pg, cluster, 1) == "4"; }, seconds(20), milliseconds(20)));
  std::cout << "takeover of a killed master's partitions: " << MsSince(killed_at) << " ms"
            << std::endl;
  submitter.Finish();
  ASSERT_EQ(submitter.acked().size(), 5'000u);
  ExpectEveryResultOnce(pg, submitter.acked());
}

// Stats and Workers asked of one master count every partition: it names the master serving the
// others, and taskctl asks it too.
TEST(HA, StatsCountEveryPartitionWhicheverMasterIsAsked) {
  SKIP_WITHOUT_POSTGRES();
  TempPostgres pg;
  HaCluster cluster(&pg, 2, {"--postgres-partitions", "4"});
  ASSERT_TRUE(cluster.StartAll().has_value());
  ASSERT_TRUE(EachServesTwo(pg, cluster));
  cluster.StartWorker("w1", {"--threads", "1"});
  // Tasks of a kind no worker runs stay pending: 20 batches with keys, spread over the
  // partitions by their first keys.
  std::unique_ptr<Client> client = cluster.NewClient();
  for (int b = 0; b < 20; ++b) {
    v1::SubmitRequest request;
    for (int i = 0; i < 10; ++i) {
      v1::TaskSpec* t = request.add_tasks();
      t->set_kind("nobody-runs-this");
      t->set_idempotency_key(absl::StrCat("stats-", b, "-", i));
    }
    ASSERT_TRUE(client->Submit(request).ok());
  }
  ASSERT_EQ(pg.Sql("SELECT count(DISTINCT part) FROM taskmaster.tasks"), "4");
  for (size_t asked = 0; asked < 2; ++asked) {
    const CommandResult stats = RunCommand(
        TaskctlArgv(cluster.address(asked), cluster.dir(), {"--format", "json", "stats"}));
    ASSERT_EQ(stats.exit_code, 0) << stats.err;
    EXPECT_NE(stats.out.find("\"pending\":200"), std::string::npos) << stats.out;
    EXPECT_EQ(stats.err, "");
    // The worker holds a stream to each partition, and shows once.
    const CommandResult workers = RunCommand(
        TaskctlArgv(cluster.address(asked), cluster.dir(), {"--format", "json", "workers"}));
    ASSERT_EQ(workers.exit_code, 0) << workers.err;
    const std::vector<std::string> split = absl::StrSplit(workers.out, "\"worker_id\"");
    EXPECT_EQ(split.size(), 2u) << workers.out;
    // The Python client merges the same way.
    if (!PythonLibraryBuilt()) {
      continue;
    }
    const CommandResult python = RunCommand(
        {"/usr/bin/python3", "-m", "taskmaster", "--master", cluster.address(asked), "--token-file",
         cluster.dir().File("submit.token"), "--format", "json", "stats"},
        "", seconds(60), {"PYTHONPATH=" + std::string(TASKMASTER_BINARY_DIR) + "/python"});
    ASSERT_EQ(python.exit_code, 0) << python.err;
    EXPECT_NE(python.out.find("\"pending\": 200"), std::string::npos) << python.out;
    EXPECT_NE(python.out.find("\"partitions\": [0, 1, 2, 3]"), std::string::npos) << python.out;
    EXPECT_EQ(python.err, "");
  }
}

// The Python worker, given both masters, holds a stream for every partition and runs the tasks
// of all four, before and after one master is killed.
TEST(HA, PythonWorkerServesEveryPartition) {
  SKIP_WITHOUT_POSTGRES();
  if (!PythonLibraryBuilt()) {
    GTEST_SKIP() << "the Python library was not built (no /usr/bin/python3)";
  }
  TempPostgres pg;
  HaCluster cluster(&pg, 2, {"--postgres-lease-ms", "1500", "--postgres-partitions", "4"});
  ASSERT_TRUE(cluster.StartAll().has_value());
  ASSERT_TRUE(EachServesTwo(pg, cluster));
  Process& worker = cluster.StartPythonWorker("py");
  std::unique_ptr<Client> client = cluster.NewClient();
  KeyedSubmitter submitter(client.get(), 8, 250);
  ASSERT_TRUE(WaitFor([&] { return submitter.acked_batches() >= 4; }, seconds(60)));
  EXPECT_EQ(pg.Sql("SELECT count(DISTINCT part) FROM taskmaster.tasks"), "4");
  cluster.master(0).Signal(SIGKILL);
  cluster.master(0).Wait(seconds(10));
  ASSERT_TRUE(WaitFor([&] { return ServedBy(pg, cluster, 1) == "4"; }, seconds(20)));
  submitter.Finish();
  ASSERT_EQ(submitter.acked().size(), 2'000u);
  ExpectEveryResultOnce(pg, submitter.acked());
  EXPECT_TRUE(worker.Running()) << worker.Log();
}

// PostgreSQL restarted under load: the masters wait for it and go on; nothing acknowledged is
// lost.
TEST(HA, PostgresRestartUnderLoad) {
  SKIP_WITHOUT_POSTGRES();
  TempPostgres pg;
  HaCluster cluster(&pg, 2);
  ASSERT_TRUE(cluster.StartAll().has_value());
  cluster.StartWorker("w1", {"--threads", "4"});
  std::unique_ptr<Client> client = cluster.NewClient();
  KeyedSubmitter submitter(client.get(), 20, 250);
  ASSERT_TRUE(WaitFor([&] { return submitter.acked_batches() >= 5; }, seconds(60)));
  pg.Restart(milliseconds(1000));
  submitter.Finish();
  ExpectEveryResultOnce(pg, submitter.acked());
}

}  // namespace
}  // namespace taskmaster::testing
