// Fault tests: real processes on loopback, killed with SIGKILL, restarted on the same data
// directory. What was acknowledged must end with exactly one result, and nothing a client saw
// may be lost.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mount.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tests/harness.h"

namespace taskmaster::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

std::string Square(int64_t n) { return absl::StrCat(n, "*", n, "=", n * n); }

struct Figures {
  int64_t acknowledged = 0;
  int64_t recorded = 0;
  int64_t duplicates_executed = 0;  // attempts beyond the first, summed over tasks
};

// Submits `batches` batches of `batch_size` square tasks with idempotency keys, retrying each
// until it is acknowledged, while 2 workers run them and the master is SIGKILLed `kills` times
// at random moments (and a worker once, when `kill_worker`). Then checks every acknowledged task
// and every result seen before a kill.
Figures BurstWithKills(int batches, int batch_size, int kills, bool kill_worker, uint32_t seed) {
  Cluster cluster({"--reconnect-grace-ms", "2000", "--lease-timeout-ms", "5000"});
  cluster.StartMaster();
  cluster.StartWorker("w1", {"--threads", "2"});
  cluster.StartWorker("w2", {"--threads", "2"});
  EXPECT_TRUE(cluster.WaitForWorkers(2));
  ClientOptions options;
  options.master.address = cluster.address();
  options.token = kSubmitToken;
  options.rpc_timeout = seconds(5);
  options.reconnect_timeout = seconds(60);
  auto client = Client::Connect(options);

  std::mutex mu;
  std::map<uint64_t, std::string> expected;  // acknowledged task → its result
  std::vector<std::string> jobs;
  std::atomic<int> acked_batches{0};
  std::thread submitter([&] {
    const auto give_up = std::chrono::steady_clock::now() + seconds(120);
    for (int b = 0; b < batches; ++b) {
      v1::SubmitRequest request;
      for (int i = 0; i < batch_size; ++i) {
        v1::TaskSpec* t = request.add_tasks();
        t->set_kind("square");
        t->set_payload(std::to_string(b * batch_size + i));
        t->set_idempotency_key(absl::StrCat("burst-", b, "-", i));
      }
      while (std::chrono::steady_clock::now() < give_up) {
        auto response = (*client)->Submit(request);
        if (response.ok()) {
          std::lock_guard<std::mutex> lock(mu);
          jobs.push_back(response->job_id());
          for (int i = 0; i < batch_size; ++i) {
            expected[response->task_ids(i)] = Square(b * batch_size + i);
          }
          break;
        }
        std::this_thread::sleep_for(milliseconds(50));
      }
      acked_batches++;
      std::this_thread::sleep_for(milliseconds(40));  // a burst that kills can land in
    }
  });

  std::mt19937 rng(seed);
  std::map<uint64_t, std::string> seen;  // results a client saw before a kill
  for (int k = 0; k < kills; ++k) {
    std::this_thread::sleep_for(milliseconds(100 + rng() % 500));
    std::vector<uint64_t> sample;
    {
      std::lock_guard<std::mutex> lock(mu);
      for (const auto& [id, output] : expected) {
        if (rng() % 50 == 0) sample.push_back(id);
      }
    }
    for (uint64_t id : sample) {
      auto task = (*client)->GetTask(id);
      if (task.ok() && task->state() == v1::SUCCEEDED) seen[id] = task->output();
    }
    std::cout << "kill " << k + 1 << ": " << acked_batches.load() << " of " << batches
              << " batches acknowledged" << std::endl;
    cluster.KillMaster(SIGKILL);
    if (kill_worker && k == 0) cluster.worker(0).Signal(SIGKILL);
    std::this_thread::sleep_for(milliseconds(rng() % 300));
    cluster.StartMaster();
    if (kill_worker && k == 0) cluster.StartWorker("w1-again", {"--threads", "2"});
  }
  submitter.join();
  EXPECT_EQ(acked_batches.load(), batches);

  Figures f;
  std::map<uint64_t, v1::TaskInfo> results;
  for (const std::string& job : jobs) {
    absl::Status status = (*client)->WatchJob(job, [&](const v1::JobEvent& event) {
      for (const v1::TaskInfo& t : event.results()) results[t.id()] = t;
    });
    EXPECT_TRUE(status.ok()) << status;
  }
  f.acknowledged = static_cast<int64_t>(expected.size());
  for (const auto& [id, output] : expected) {
    auto it = results.find(id);
    if (it == results.end()) {
      ADD_FAILURE() << "acknowledged task " << id << " has no result";
      continue;
    }
    EXPECT_EQ(it->second.state(), v1::SUCCEEDED) << id << ": " << it->second.error();
    EXPECT_EQ(it->second.output(), output) << id;
    f.recorded++;
    f.duplicates_executed += std::max(0, it->second.attempts() - 1);
  }
  for (const auto& [id, output] : seen) EXPECT_EQ(results.at(id).output(), output) << id;
  return f;
}

void Report(const char* name, int kills, const Figures& f) {
  std::cout << "FIGURES " << name << ": kills=" << kills << " acknowledged=" << f.acknowledged
            << " results_recorded=" << f.recorded
            << " duplicates_executed=" << f.duplicates_executed << std::endl;
  ::testing::Test::RecordProperty("acknowledged", static_cast<int>(f.acknowledged));
  ::testing::Test::RecordProperty("results_recorded", static_cast<int>(f.recorded));
  ::testing::Test::RecordProperty("duplicates_executed", static_cast<int>(f.duplicates_executed));
}

TEST(Fault, MasterKilledMidBurstLosesNothingAcknowledged) {
  Figures f = BurstWithKills(20, 1000, 1, /*kill_worker=*/true, 1);
  EXPECT_EQ(f.acknowledged, 20'000);
  EXPECT_EQ(f.recorded, 20'000);
  Report("one kill", 1, f);
}

TEST(FaultSlow, MasterKilledRepeatedlyAtRandomMoments) {
  Figures f = BurstWithKills(20, 1000, 6, /*kill_worker=*/false, std::random_device{}());
  EXPECT_EQ(f.acknowledged, 20'000);
  EXPECT_EQ(f.recorded, 20'000);
  Report("repeated kills", 6, f);
}

TEST(Fault, RestartKeepsDelayedRetryingAndCancelledTasks) {
  Cluster cluster({"--retry-backoff-ms", "3600000"});
  cluster.StartMaster();
  cluster.StartWorker("w", {"--threads", "1"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto client = cluster.NewClient();
  v1::SubmitRequest request;
  v1::TaskSpec* delayed = request.add_tasks();
  delayed->set_kind("square");
  delayed->set_payload("1");
  delayed->set_delay_ms(3'600'000);
  v1::TaskSpec* retrying = request.add_tasks();
  retrying->set_kind("fail");
  retrying->set_payload("try again");
  retrying->set_max_attempts(3);
  v1::TaskSpec* waiting = request.add_tasks();
  waiting->set_kind("resize");
  waiting->set_payload("img");
  v1::TaskSpec* cancelled = request.add_tasks();
  cancelled->set_kind("resize");
  cancelled->set_payload("img2");
  auto submitted = client->Submit(request);
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  const uint64_t retry_id = submitted->task_ids(1);
  ASSERT_TRUE(WaitFor([&] { return client->GetTask(retry_id)->attempts() == 1; }, seconds(10)));
  ASSERT_EQ(*client->CancelTask(submitted->task_ids(3)), 1);
  std::vector<v1::TaskInfo> before;
  for (uint64_t id : submitted->task_ids()) before.push_back(*client->GetTask(id));

  cluster.KillMaster(SIGKILL);
  cluster.StartMaster();
  client = cluster.NewClient();  // the old channel may still be backing off
  for (const v1::TaskInfo& b : before) {
    auto after = client->GetTask(b.id());
    ASSERT_TRUE(after.ok()) << after.status();
    EXPECT_EQ(after->state(), b.state()) << b.id();
    EXPECT_EQ(after->attempts(), b.attempts()) << b.id();
    EXPECT_EQ(after->not_before_ms(), b.not_before_ms()) << b.id();
    EXPECT_EQ(after->error(), b.error()) << b.id();
  }
  EXPECT_EQ(before[0].state(), v1::DELAYED);
  EXPECT_EQ(before[1].state(), v1::DELAYED);  // retry backoff
  EXPECT_EQ(before[1].error(), "try again");
  EXPECT_EQ(before[2].state(), v1::PENDING);
  EXPECT_EQ(before[3].state(), v1::CANCELLED);
  auto job = client->GetJob(submitted->job_id());
  EXPECT_EQ(job->cancelled(), 1);
}

TEST(Fault, WaitFollowsAJobAcrossAMasterKill) {
  Cluster cluster;
  cluster.StartMaster();
  cluster.StartWorker("w", {"--threads", "2"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  std::string input;
  for (int i = 0; i < 30; ++i) input += "100\n";
  CommandResult submitted = cluster.Taskctl({"submit", "--kind", "sleep"}, input);
  ASSERT_EQ(submitted.exit_code, 0) << submitted.err;
  const std::string job = submitted.out.substr(0, submitted.out.find('\n'));
  Process wait({TASKCTL_BIN, "--master", cluster.address(), "--token-file",
                cluster.dir().File("submit.token"), "wait", job},
               cluster.dir().File("wait.log"));
  std::this_thread::sleep_for(milliseconds(500));
  cluster.KillMaster(SIGKILL);
  std::this_thread::sleep_for(milliseconds(300));
  cluster.StartMaster();
  ASSERT_EQ(wait.Wait(seconds(60)), 0) << wait.Log();
  int lines = 0;
  const std::string log = wait.Log();
  for (absl::string_view line : absl::StrSplit(log, '\n')) {
    if (line == "slept 100 ms") ++lines;
  }
  EXPECT_EQ(lines, 30) << "each result once:\n" << wait.Log();
}

TEST(Fault, RunningTaskSurvivesAMasterKillWithoutASecondRun) {
  Cluster cluster({"--reconnect-grace-ms", "5000"});
  cluster.StartMaster();
  cluster.StartWorker("steady", {"--threads", "1"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto client = cluster.NewClient();
  v1::SubmitRequest request;
  v1::TaskSpec* t = request.add_tasks();
  t->set_kind("sleep");
  t->set_payload("1500");
  auto submitted = client->Submit(request);
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  const uint64_t id = submitted->task_ids(0);
  ASSERT_TRUE(WaitFor([&] { return client->GetTask(id)->state() == v1::LEASED; }, seconds(10)));
  cluster.KillMaster(SIGKILL);
  cluster.StartMaster();
  client = cluster.NewClient();
  // The worker comes back still holding the task: it keeps it, and its result is recorded.
  ASSERT_TRUE(WaitFor(
      [&] {
        auto task = client->GetTask(id);
        return task.ok() && task->state() == v1::SUCCEEDED;
      },
      seconds(20)));
  auto task = client->GetTask(id);
  EXPECT_EQ(task->attempts(), 1) << "run once";
  EXPECT_EQ(task->worker(), "steady");
  EXPECT_EQ(task->output(), "slept 1500 ms");
}

TEST(Fault, SecondMasterOnTheSameDataDirectoryRefuses) {
  Cluster cluster;
  cluster.StartMaster();
  CommandResult second =
      RunCommand({TASKMASTER_BIN, "--listen", "127.0.0.1:0", "--tokens",
                  cluster.dir().File("tokens"), "--data-dir", cluster.dir().File("data")});
  EXPECT_NE(second.exit_code, 0);
  EXPECT_NE(second.err.find("in use by another master"), std::string::npos) << second.err;
  EXPECT_TRUE(cluster.master().Running());
}

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

  // Writes a filler file until the disk is full.
  void Fill() {
    std::ofstream out(File("filler"), std::ios::binary);
    const std::string chunk(64 * 1024, 'x');
    for (int i = 0; i < 100'000 && out.write(chunk.data(), chunk.size()); ++i) {
    }
  }
  void Free() { std::filesystem::remove(File("filler")); }

 private:
  TempDir dir_;
  bool mounted_ = false;
};

TEST(Fault, DiskFullRefusesNewWorkKeepsTheRestAndRecovers) {
  SmallDisk disk(8);
  if (!disk.mounted()) GTEST_SKIP() << "mounting a tmpfs needs root (CAP_SYS_ADMIN)";
  Cluster cluster({"--data-dir", disk.File("data")});
  cluster.StartMaster();
  auto client = cluster.NewClient();
  v1::SubmitRequest small;
  for (int i = 0; i < 50; ++i) {
    v1::TaskSpec* t = small.add_tasks();
    t->set_kind("square");
    t->set_payload(std::to_string(i));
  }
  auto acked = client->Submit(small);
  ASSERT_TRUE(acked.ok()) << acked.status();

  disk.Fill();
  v1::SubmitRequest big;
  for (int i = 0; i < 16; ++i) {
    v1::TaskSpec* t = big.add_tasks();
    t->set_kind("echo");
    t->set_payload(std::string(32 * 1024, 'p'));
  }
  absl::Status refused;
  for (int i = 0; i < 200 && refused.ok(); ++i) refused = client->Submit(big).status();
  ASSERT_FALSE(refused.ok()) << "the disk never filled";
  EXPECT_TRUE(absl::IsUnavailable(refused) || absl::IsResourceExhausted(refused)) << refused;
  EXPECT_NE(std::string(refused.message()).find("full"), std::string::npos) << refused;
  // Reads still work, and acknowledged tasks are there.
  EXPECT_TRUE(client->GetTask(acked->task_ids(0)).ok());
  EXPECT_TRUE(client->Stats().ok());

  disk.Free();
  EXPECT_TRUE(WaitFor([&] { return client->Submit(small).ok(); }, seconds(20)))
      << "the store writes again once space returns";
  cluster.StartWorker("w", {"--threads", "2"});
  auto results = std::map<uint64_t, std::string>();
  ASSERT_TRUE((*client)
                  .WatchJob(acked->job_id(),
                            [&](const v1::JobEvent& e) {
                              for (const auto& t : e.results()) results[t.id()] = t.output();
                            })
                  .ok());
  EXPECT_EQ(results.size(), 50u);
  cluster.KillMaster(SIGKILL);
  cluster.StartMaster();
  client = cluster.NewClient();
  auto task = client->GetTask(acked->task_ids(7));
  ASSERT_TRUE(task.ok());
  EXPECT_EQ(task->output(), Square(7));
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
    std::this_thread::sleep_for(milliseconds(400));  // past retention: the wave is deleted
    if (wave == 3) after_warmup = store_bytes();
  }
  const uintmax_t at_end = store_bytes();
  std::cout << "FIGURES store bytes after 4 waves: " << after_warmup << ", after 12: " << at_end
            << std::endl;
  EXPECT_LE(at_end, after_warmup * 3 / 2 + (1 << 20)) << "24,000 tasks went through";
}

}  // namespace
}  // namespace taskmaster::testing
