// Fault tests of the master's disk: a submit killed midway, a full disk, a damaged write-ahead log,
// a failing fsync, and a store that stays bounded under steady load.
#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/mount.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"
#include "tests/harness.h"

namespace taskmaster::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

// A tmpfs of `megabytes` mounted on a fresh directory, unmounted at the end.
class SmallDisk {
 public:
  explicit SmallDisk(int megabytes) {
    mounted_ = mount("tmpfs", dir_.path().c_str(), "tmpfs", 0,
                     absl::StrCat("size=", megabytes, "m").c_str()) == 0;
  }
  ~SmallDisk() {
    if (mounted_) umount2(dir_.path().c_str(), MNT_DETACH);
  }
  bool mounted() const { return mounted_; }
  std::string File(const std::string& name) const { return dir_.File(name); }

  // Writes filler files of 1 MiB until the disk is full.
  void Fill() {
    const std::string chunk(64 * 1024, 'x');
    bool full = false;
    for (int f = 0; f < 1000 && !full; ++f) {
      std::ofstream out(File(absl::StrCat("filler-", fillers_++)), std::ios::binary);
      for (int i = 0; i < 16 && !full; ++i) full = !out.write(chunk.data(), chunk.size());
      full = full || !out.flush();
    }
  }
  // Removes at least `megabytes` of filler, newest first.
  void Free(int megabytes) {
    uintmax_t freed = 0;
    while (freed < static_cast<uintmax_t>(megabytes) << 20 && fillers_ > 0) {
      const std::string path = File(absl::StrCat("filler-", --fillers_));
      freed += std::filesystem::file_size(path);
      std::filesystem::remove(path);
    }
  }

 private:
  TempDir dir_;
  bool mounted_ = false;
  int fillers_ = 0;
};

// Jobs as stored in a stopped master's database: job → {total it claims, task rows it has}.
std::map<std::string, std::pair<int64_t, int64_t>> StoredJobs(const std::string& data_dir) {
  std::map<std::string, std::pair<int64_t, int64_t>> jobs;
  sqlite3* db = nullptr;
  if (sqlite3_open((data_dir + "/taskmaster.db").c_str(), &db) != SQLITE_OK) {
    ADD_FAILURE() << "cannot open the store in " << data_dir;
    return jobs;
  }
  const char* sql =
      "SELECT j.job_id, j.total, (SELECT count(*) FROM tasks t WHERE t.job_id = j.job_id) + "
      "(SELECT count(*) FROM job_members m WHERE m.job_id = j.job_id) FROM jobs j "
      "UNION ALL SELECT t.job_id, -1, count(*) FROM tasks t "
      "WHERE t.job_id NOT IN (SELECT job_id FROM jobs) GROUP BY t.job_id";
  sqlite3_stmt* stmt = nullptr;
  EXPECT_EQ(sqlite3_prepare_v2(db, sql, -1, &stmt, nullptr), SQLITE_OK) << sqlite3_errmsg(db);
  while (stmt && sqlite3_step(stmt) == SQLITE_ROW) {
    jobs[reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0))] = {
        sqlite3_column_int64(stmt, 1), sqlite3_column_int64(stmt, 2)};
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return jobs;
}

// Checks that every stored job has exactly the tasks it claims; returns how many tasks there are.
int64_t ExpectWholeJobs(const std::string& data_dir) {
  int64_t tasks = 0;
  for (const auto& [job, counts] : StoredJobs(data_dir)) {
    EXPECT_EQ(counts.first, counts.second)
        << "job " << job << " claims " << counts.first << " tasks and has " << counts.second
        << (counts.first < 0 ? " (the job itself is missing)" : "");
    tasks += counts.second;
  }
  return tasks;
}

v1::SubmitRequest Squares(int from, int count, const std::string& kind = "square") {
  v1::SubmitRequest request;
  for (int i = from; i < from + count; ++i) {
    v1::TaskSpec* t = request.add_tasks();
    t->set_kind(kind);
    t->set_payload(std::to_string(i));
  }
  return request;
}

TEST(Fault, SubmitKilledMidwayIsStoredWholeOrNotAtAll) {
  constexpr int kTasks = 100'000;
  std::mt19937 rng(20261129);
  int partial = 0;
  for (int attempt = 0; attempt < 4; ++attempt) {
    Cluster cluster({"--max-batch", "100000"});
    cluster.StartMaster();
    auto client = cluster.NewClient();
    // One acknowledged submit times the next, so the kill lands while it is under way.
    const auto start = std::chrono::steady_clock::now();
    auto first = client->Submit(Squares(0, kTasks));
    ASSERT_TRUE(first.ok()) << first.status();
    const auto took =
        std::chrono::duration_cast<milliseconds>(std::chrono::steady_clock::now() - start);
    absl::StatusOr<v1::SubmitResponse> second = absl::UnknownError("not answered");
    std::thread submitter([&] { second = client->Submit(Squares(kTasks, kTasks)); });
    const auto kill_after = milliseconds(rng() % std::max<int64_t>(1, took.count()));
    std::this_thread::sleep_for(kill_after);
    cluster.KillMaster(SIGKILL);
    submitter.join();

    const auto jobs = StoredJobs(cluster.data_dir());
    const int64_t rows = ExpectWholeJobs(cluster.data_dir());
    EXPECT_TRUE(jobs.contains(first->job_id()));
    EXPECT_TRUE(!second.ok() || jobs.contains(second->job_id()));
    for (const auto& [job, counts] : jobs) partial += counts.first != counts.second;
    const int64_t acknowledged = (second.ok() ? 2 : 1) * kTasks;
    int64_t recorded_acknowledged = 0;
    for (const auto* r : {&first, &second}) {
      if (r->ok() && jobs.contains((*r)->job_id())) {
        recorded_acknowledged += jobs.at((*r)->job_id()).second;
      }
    }
    std::cout << "FIGURES submit killed after " << kill_after.count() << " of " << took.count()
              << " ms: acknowledged=" << acknowledged << " recorded=" << recorded_acknowledged
              << " lost=" << acknowledged - recorded_acknowledged
              << " unacknowledged_rows=" << rows - recorded_acknowledged
              << " partial_jobs=" << partial << " extra_executions=0" << std::endl;
    cluster.StartMaster();  // and the store it left passes recovery's checks
  }
  EXPECT_EQ(partial, 0);
}

TEST(Fault, DiskFullRefusesNewWorkKeepsTheRestAndRecovers) {
  SmallDisk disk(16);
  if (!disk.mounted()) GTEST_SKIP() << "mounting a tmpfs needs root (CAP_SYS_ADMIN)";
  Cluster cluster({"--data-dir", disk.File("data")});  // with the default 4 MiB reserve
  cluster.StartMaster();
  auto client = cluster.NewClient();
  auto acked = client->Submit(Squares(0, 50));
  ASSERT_TRUE(acked.ok()) << acked.status();

  disk.Fill();
  int64_t accepted = 50;
  absl::Status refused;
  for (int i = 0; i < 200 && refused.ok(); ++i) {
    v1::SubmitRequest big;
    for (int k = 0; k < 16; ++k) {
      v1::TaskSpec* t = big.add_tasks();
      t->set_kind("echo");
      t->set_payload(std::string(32 * 1024, 'p'));
    }
    refused = client->Submit(big).status();
    if (refused.ok()) accepted += 16;
  }
  ASSERT_FALSE(refused.ok()) << "the disk never filled";
  EXPECT_TRUE(absl::IsUnavailable(refused) || absl::IsResourceExhausted(refused)) << refused;
  EXPECT_NE(std::string(refused.message()).find("full"), std::string::npos) << refused;
  // taskctl passes on what the master said, not a failure to reach it.
  CommandResult told = cluster.Taskctl({"submit", "--kind", "square"}, "1\n");
  EXPECT_NE(told.exit_code, 0);
  EXPECT_NE(told.err.find("full"), std::string::npos) << told.err;
  EXPECT_EQ(told.err.find("cannot reach"), std::string::npos) << told.err;
  // The health check says so: probes see a master that cannot take work.
  absl::StatusOr<bool> serving = client->Serving();
  ASSERT_TRUE(serving.ok()) << serving.status();
  EXPECT_FALSE(*serving);
  CommandResult health = cluster.Taskctl({"health"});
  EXPECT_EQ(health.exit_code, 1) << health.out << health.err;
  EXPECT_EQ(health.out, "NOT_SERVING\n");
  // Reads still work, and acknowledged tasks are there.
  EXPECT_TRUE(client->GetTask(acked->task_ids(0)).ok());
  EXPECT_TRUE(client->Stats().ok());

  // Results that cannot be stored are run but not shown as done. (The reserve given back at the
  // first failure made room for a while: fill that too.)
  disk.Fill();
  cluster.StartWorker("w", {"--threads", "2"});
  ASSERT_TRUE(WaitFor(
      [&] {
        auto stats = client->Stats();
        if (!stats.ok()) return false;
        int64_t open = 0;
        for (const auto& q : stats->queues()) open += q.pending() + q.leased();
        return open == 0;
      },
      seconds(30)));
  auto progress = client->GetJob(acked->job_id());
  ASSERT_TRUE(progress.ok()) << progress.status();
  EXPECT_EQ(progress->done(), 0) << "results not on disk are not done";
  auto unsaved = client->GetTask(acked->task_ids(0));
  EXPECT_TRUE(!unsaved.ok() || unsaved->state() != v1::SUCCEEDED);

  // 2 MiB freed are enough: the log was shrunk and the reserve given back while full.
  disk.Free(2);
  EXPECT_TRUE(WaitFor(
      [&] {
        auto job = client->GetJob(acked->job_id());
        return job.ok() && job->done() == 50;
      },
      seconds(30)))
      << "results are stored once space returns\n"
      << cluster.master().Log();
  absl::Status resubmitted;
  EXPECT_TRUE(WaitFor(
      [&] {
        resubmitted = client->Submit(Squares(100, 50)).status();
        return resubmitted.ok();
      },
      seconds(20)))
      << "the store takes new work once space returns: " << resubmitted;
  serving = client->Serving();
  EXPECT_TRUE(serving.ok() && *serving) << "serving again once space returns";
  accepted += 50;
  cluster.KillMaster(SIGKILL);
  const int64_t rows = ExpectWholeJobs(disk.File("data"));
  EXPECT_EQ(rows, accepted) << "refused batches left no trace";
  std::cout << "FIGURES disk full: acknowledged=" << accepted << " recorded=" << rows
            << " lost=" << accepted - std::min(rows, accepted)
            << " extra=" << std::max<int64_t>(0, rows - accepted) << std::endl;
  cluster.StartMaster();
  client = cluster.NewClient();
  auto task = client->GetTask(acked->task_ids(7));
  ASSERT_TRUE(task.ok());
  EXPECT_EQ(task->output(), Square(7));
}

TEST(Fault, DamagedWriteAheadLogStopsTheStartAndRepairAcceptsTheLoss) {
  Cluster cluster;
  cluster.StartMaster();
  auto client = cluster.NewClient();
  constexpr int kAcknowledged = 200;
  for (int b = 0; b < kAcknowledged / 20; ++b)
    ASSERT_TRUE(client->Submit(Squares(b * 20, 20)).ok());
  cluster.KillMaster(SIGKILL);
  const std::string data = cluster.data_dir();
  const std::string wal = data + "/taskmaster.db-wal";
  ASSERT_TRUE(std::filesystem::exists(wal));
  const std::string snapshot = cluster.dir().File("snapshot");
  std::filesystem::copy(data, snapshot, std::filesystem::copy_options::recursive);

  const std::vector<std::pair<std::string, std::function<void()>>> damages = {
      {"log cut 7 bytes short",
       [&] { std::filesystem::resize_file(wal, std::filesystem::file_size(wal) - 7); }},
      {"log byte flipped mid-way",
       [&] {
         std::string bytes = ReadFile(wal);
         bytes[bytes.size() / 2] ^= 0x10;
         WriteFile(wal, bytes);
       }},
      {"log deleted", [&] { std::filesystem::remove(wal); }}};
  for (const auto& [name, damage] : damages) {
    std::filesystem::remove_all(data);
    std::filesystem::copy(snapshot, data, std::filesystem::copy_options::recursive);
    damage();
    CommandResult refused = RunCommand(cluster.MasterArgv(), "", seconds(5));
    EXPECT_EQ(refused.exit_code, 1) << name << ": " << refused.err;
    EXPECT_NE(refused.err.find("were lost"), std::string::npos) << name << ": " << refused.err;
    CommandResult repair =
        RunCommand({Binary("taskmaster"), "--repair", "--data-dir", data}, "", seconds(30));
    EXPECT_EQ(repair.exit_code, 0) << name << ": " << repair.err;
    EXPECT_NE(repair.out.find("had lost its last"), std::string::npos)
        << name << ": " << repair.out;
    const int64_t rows = ExpectWholeJobs(data);
    std::cout << "FIGURES " << name << ": acknowledged=" << kAcknowledged << " recorded=" << rows
              << " lost=" << kAcknowledged - rows
              << " refused_to_start=" << (refused.exit_code == 1) << " extra_executions=0"
              << std::endl;
    cluster.StartMaster();  // the repaired store starts
    cluster.KillMaster(SIGTERM);
  }
}

TEST(Fault, FailedFsyncStopsTheMasterAndLosesNothingAcknowledged) {
  Cluster cluster;
  const std::string trigger = cluster.dir().File("fail-fsync");
  cluster.SetEnv(FaultShimEnv("", trigger));
  cluster.StartMaster();
  auto client = cluster.NewClient();
  auto acked = client->Submit(Squares(0, 100));
  ASSERT_TRUE(acked.ok()) << acked.status();
  WriteFile(trigger, "");
  auto failed = client->Submit(Squares(100, 100));
  EXPECT_FALSE(failed.ok()) << "a batch whose fsync failed is never acknowledged";
  EXPECT_EQ(cluster.master().Wait(seconds(20)), 70) << cluster.master().Log();
  EXPECT_NE(cluster.master().Log().find("stopping the master"), std::string::npos);
  std::filesystem::remove(trigger);
  const int64_t rows = ExpectWholeJobs(cluster.data_dir());
  cluster.StartMaster();
  client = cluster.NewClient();
  for (uint64_t id : acked->task_ids()) EXPECT_TRUE(client->GetTask(id).ok()) << id;
  // The second batch was never acknowledged: the master stopped before it answered, so the
  // client cannot tell whether it was stored (retrying with idempotency keys is safe).
  EXPECT_TRUE(absl::IsUnavailable(failed.status())) << failed.status();
  std::cout << "FIGURES failed fsync: acknowledged=100 recorded=" << rows
            << " lost=" << 100 - std::min<int64_t>(rows, 100)
            << " unanswered_batch_stored=" << (rows == 200) << " extra_executions=0" << std::endl;
}

TEST(Fault, StoreStaysBoundedUnderSteadyLoad) {
  Cluster cluster({"--result-retention-ms", "200"});
  cluster.StartMaster();
  cluster.StartWorker("w", {"--threads", "2", "--prefetch", "32"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto client = cluster.NewClient();
  auto store_bytes = [&] {
    uintmax_t total = 0;
    for (const auto& e : std::filesystem::directory_iterator(cluster.dir().File("data"))) {
      total += e.file_size();
    }
    return total;
  };
  uintmax_t after_warmup = 0;
  for (int wave = 0; wave < 12; ++wave) {
    v1::SubmitRequest request;
    for (int i = 0; i < 2000; ++i) {
      v1::TaskSpec* t = request.add_tasks();
      t->set_kind("echo");
      t->set_payload(std::string(200, 'a' + wave % 26));
    }
    auto submitted = client->Submit(request);
    ASSERT_TRUE(submitted.ok());
    ASSERT_TRUE(client->WatchJob(submitted->job_id(), [](const v1::JobEvent&) {}).ok());
    // Past retention (200 ms) the wave is forgotten, and deleted from the store.
    absl::Status gone;
    ASSERT_TRUE(WaitFor(
        [&] {
          gone = client->GetJob(submitted->job_id()).status();
          return absl::IsNotFound(gone);
        },
        seconds(10)))
        << "wave " << wave << " outlived its retention: " << gone;
    if (wave == 3) after_warmup = store_bytes();
  }
  const uintmax_t at_end = store_bytes();
  std::cout << "FIGURES store bytes after 4 waves: " << after_warmup << ", after 12: " << at_end
            << std::endl;
  EXPECT_LE(at_end, after_warmup * 3 / 2 + (1 << 20)) << "24,000 tasks went through";
}

}  // namespace
}  // namespace taskmaster::testing
