// End-to-end tests of work going through the real binaries: taskctl's commands, tasks shared by
// workers and surviving killed workers or a restarted master, drains, cancels and clean stops.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"
#include "tests/harness.h"
#include "tests/integration_common.h"

namespace taskmaster::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

bool TaskIs(const Client& client, uint64_t id, v1::TaskState state) {
  auto task = client.GetTask(id);
  return task.ok() && task->state() == state;
}

// Follows a job to its end; returns its results by task id, failing on any duplicate.
std::map<uint64_t, v1::TaskInfo> Collect(const Client& client, const std::string& job_id) {
  std::map<uint64_t, v1::TaskInfo> results;
  absl::Status status = client.WatchJob(job_id, [&](const v1::JobEvent& event) {
    for (const v1::TaskInfo& t : event.results()) {
      EXPECT_TRUE(results.emplace(t.id(), t).second) << "task " << t.id() << " reported twice";
    }
  });
  EXPECT_TRUE(status.ok()) << status;
  return results;
}

TEST(Integration, SeedScenarioThroughTaskctl) {
  Cluster cluster;
  cluster.StartMaster();
  cluster.StartWorker("w1", {"--threads", "2"});
  cluster.StartWorker("w2", {"--threads", "2"});
  ASSERT_TRUE(cluster.WaitForWorkers(2));

  std::mt19937 rng(12345);
  std::vector<std::string> args = {"submit", "--kind", "square", "--wait"};
  std::multiset<std::string> expected;
  for (int i = 0; i < 10; ++i) {
    const int n = static_cast<int>(rng() % 10001);
    args.push_back(std::to_string(n));
    expected.insert(Square(n));
  }
  CommandResult r = cluster.Taskctl(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> lines = absl::StrSplit(r.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 11u) << r.out;
  EXPECT_EQ(lines[0].rfind("job-", 0), 0u) << "the job id comes first: " << lines[0];
  EXPECT_EQ(std::multiset<std::string>(lines.begin() + 1, lines.end()), expected);

  // status, stats and workers answer, in text and JSON.
  CommandResult status = cluster.Taskctl({"status", lines[0]});
  EXPECT_EQ(status.exit_code, 0);
  EXPECT_NE(status.out.find("succeeded: 10"), std::string::npos) << status.out;
  CommandResult stats = cluster.Taskctl({"--format", "json", "stats"});
  EXPECT_EQ(stats.exit_code, 0);
  EXPECT_NE(stats.out.find("\"succeeded\":10"), std::string::npos) << stats.out;
  EXPECT_NE(stats.out.find("\"duplicate_results\":0"), std::string::npos) << stats.out;
  CommandResult workers = cluster.Taskctl({"workers"});
  EXPECT_NE(workers.out.find("w1"), std::string::npos);
  EXPECT_NE(workers.out.find("w2"), std::string::npos);
}

TEST(Integration, SubmitAndWatchInOneCall) {
  Cluster cluster;
  cluster.StartMaster();
  cluster.StartWorker("w1", {"--threads", "2"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto client = cluster.NewClient();
  std::map<uint64_t, std::string> outputs;
  auto job = client->SubmitAndWatch(Batch("square", {"5", "6", "7"}), [&](const v1::JobEvent& e) {
    for (const v1::TaskInfo& t : e.results())
      EXPECT_TRUE(outputs.emplace(t.id(), t.output()).second);
  });
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->rfind("job-", 0), 0u);
  std::set<std::string> got;
  for (const auto& [id, output] : outputs) got.insert(output);
  EXPECT_EQ(got, (std::set<std::string>{Square(5), Square(6), Square(7)}));
  auto refused = client->SubmitAndWatch(Batch("", {"x"}), [](const v1::JobEvent&) {});
  EXPECT_TRUE(absl::IsInvalidArgument(refused.status())) << refused.status();
}

TEST(Integration, PayloadsFromStdinAndFailuresSetTheExitCode) {
  Cluster cluster;
  cluster.StartMaster();
  cluster.StartWorker("w1", {"--threads", "2"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  CommandResult r = cluster.Taskctl({"--format", "json", "submit", "--kind", "square", "--wait"},
                                    "3\nnot-a-number\n");
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.out.find("\"output\":\"3*3=9\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"state\":\"DEAD\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("must be a decimal integer"), std::string::npos) << r.out;
}

// More input than one submit may hold (--max-batch, 100,000) streams into one job of several
// calls, followed with --wait as it grows.
// Read from stdin (on a thread of its own, as a pipe may keep it waiting) and from a regular file
// (read as batches fill).
class InputOfAnySize : public ::testing::TestWithParam<bool> {};

TEST_P(InputOfAnySize, StreamsIntoOneJob) {
  const bool from_file = GetParam();
  Cluster cluster;
  cluster.StartMaster();
  cluster.StartWorker("w1", {"--threads", "2"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  constexpr int kTasks = 200'000;
  std::string input;
  for (int i = 0; i < kTasks; ++i) absl::StrAppend(&input, i, "\n");
  std::vector<std::string> args = {"submit", "--kind", "square", "--wait"};
  if (from_file) {
    WriteFile(cluster.dir().File("numbers"), input);
    args.insert(args.end(), {"--file", cluster.dir().File("numbers")});
    input.clear();
  }
  CommandResult r = cluster.Taskctl(args, input);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> lines = absl::StrSplit(r.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), kTasks + 1u) << r.err;
  const std::string job = lines[0];
  std::set<std::string> results(lines.begin() + 1, lines.end());
  EXPECT_EQ(results.size(), static_cast<size_t>(kTasks)) << "each result once";
  EXPECT_TRUE(results.contains(Square(0)));
  EXPECT_TRUE(results.contains(Square(kTasks - 1)));
  CommandResult status = cluster.Taskctl({"--format", "json", "status", job});
  EXPECT_NE(status.out.find("\"total\":200000"), std::string::npos) << status.out;
  EXPECT_NE(status.out.find("\"open\":false"), std::string::npos) << status.out;
}

INSTANTIATE_TEST_SUITE_P(Integration, InputOfAnySize, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "File" : "Stdin"; });

// Once with the default of one RPC thread, and once with two, whose completion queues share the
// calls (and a worker's stream and the job it serves may land on different ones).
class TwoWorkers : public ::testing::TestWithParam<int> {};

TEST_P(TwoWorkers, ShareTwoThousandTasksExactlyOnce) {
  Cluster cluster({"--rpc-threads", std::to_string(GetParam())});
  cluster.StartMaster();
  cluster.StartWorker("w1", {"--threads", "2"});
  cluster.StartWorker("w2", {"--threads", "2"});
  ASSERT_TRUE(cluster.WaitForWorkers(2));
  auto client = cluster.NewClient();
  std::vector<std::string> payloads;
  for (int i = 0; i < 2000; ++i) payloads.push_back(std::to_string(i));
  // `square` takes microseconds: both workers get a share because each holds only a few credits
  // at a time (its threads and a short prefetch), and the master hands out tasks against credits.
  auto submitted = client->Submit(Batch("square", payloads));
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  ASSERT_EQ(submitted->task_ids_size(), 2000);
  auto results = Collect(*client, submitted->job_id());
  ASSERT_EQ(results.size(), 2000u);
  std::map<std::string, int> per_worker;
  for (int i = 0; i < 2000; ++i) {
    const v1::TaskInfo& t = results.at(submitted->task_ids(i));
    EXPECT_EQ(t.state(), v1::SUCCEEDED);
    EXPECT_EQ(t.output(), Square(i));
    EXPECT_EQ(t.attempts(), 1);
    per_worker[t.worker()]++;
  }
  EXPECT_EQ(per_worker.size(), 2u) << "both workers ran tasks";
}

INSTANTIATE_TEST_SUITE_P(RpcThreads, TwoWorkers, ::testing::Values(1, 2));

TEST(Integration, KilledWorkersTaskFinishesElsewhere) {
  Cluster cluster({"--reconnect-grace-ms", "300", "--lease-timeout-ms", "3000"});
  cluster.StartMaster();
  Process& doomed = cluster.StartWorker("doomed", {"--threads", "1", "--prefetch", "0"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto client = cluster.NewClient();
  auto submitted = client->Submit(Batch("sleep", {"1500"}));
  ASSERT_TRUE(submitted.ok());
  const uint64_t id = submitted->task_ids(0);
  ASSERT_TRUE(WaitFor([&] { return TaskIs(*client, id, v1::LEASED); }, seconds(10)));
  cluster.StartWorker("survivor", {"--threads", "1"});
  ASSERT_TRUE(cluster.WaitForWorkers(2));
  doomed.Signal(SIGKILL);
  auto results = Collect(*client, submitted->job_id());
  ASSERT_EQ(results.size(), 1u);
  const v1::TaskInfo& t = results.at(id);
  EXPECT_EQ(t.state(), v1::SUCCEEDED);
  EXPECT_EQ(t.worker(), "survivor");
  EXPECT_EQ(t.attempts(), 2);
}

TEST(Integration, WorkerOutlivesMasterRestart) {
  Cluster cluster;
  cluster.StartMaster();
  Process& worker = cluster.StartWorker("steady", {"--threads", "2"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  cluster.KillMaster(SIGKILL);
  // The master comes back once the worker has noticed it was gone.
  ASSERT_TRUE(WaitFor([&] { return worker.Log().find("lost the master") != std::string::npos; },
                      seconds(10)))
      << worker.Log();
  cluster.StartMaster();
  ASSERT_TRUE(cluster.WaitForWorkers(1)) << "the worker came back on its own";
  auto client = cluster.NewClient();
  auto submitted = client->Submit(Batch("square", {"11", "12"}));
  ASSERT_TRUE(submitted.ok());
  auto results = Collect(*client, submitted->job_id());
  ASSERT_EQ(results.size(), 2u);
  EXPECT_EQ(results.at(submitted->task_ids(0)).output(), Square(11));
  EXPECT_TRUE(worker.Running());
}

TEST(Integration, WorkerDrainsOnSigterm) {
  Cluster cluster;
  cluster.StartMaster();
  Process& draining = cluster.StartWorker(
      "draining", {"--threads", "1", "--prefetch", "2", "--log-level", "debug"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto client = cluster.NewClient();
  auto submitted = client->Submit(Batch("sleep", {"1000", "1000", "1000"}));
  ASSERT_TRUE(submitted.ok());
  ASSERT_TRUE(WaitFor(
      [&] {
        auto workers = client->Workers();
        return workers.ok() && workers->workers_size() == 1 && workers->workers(0).running() == 3;
      },
      seconds(10)));
  // Leased is not started: until its thread takes one, the worker would give all three back.
  ASSERT_TRUE(WaitFor([&] { return draining.Log().find("starting task") != std::string::npos; },
                      seconds(10)))
      << draining.Log();
  draining.Signal(SIGTERM);
  EXPECT_EQ(draining.Wait(seconds(20)), 0) << draining.Log();
  // The worker ran one of the three (which one is its pool's choice) and gave the others back.
  int finished = 0;
  int returned = 0;
  for (uint64_t id : submitted->task_ids()) {
    auto task = client->GetTask(id);
    ASSERT_TRUE(task.ok()) << task.status();
    if (task->state() == v1::SUCCEEDED) {
      ++finished;
    } else {
      EXPECT_EQ(task->state(), v1::PENDING) << "task " << id;
      EXPECT_EQ(task->attempts(), 0) << "task " << id << " given back without using an attempt";
      ++returned;
    }
  }
  EXPECT_EQ(finished, 1) << "the running task finished";
  EXPECT_EQ(returned, 2);
  cluster.StartWorker("next", {"--threads", "2"});
  auto results = Collect(*client, submitted->job_id());
  EXPECT_EQ(results.size(), 3u);
}

TEST(Integration, CancelStopsARunningTask) {
  Cluster cluster;
  cluster.StartMaster();
  cluster.StartWorker("w", {"--threads", "1"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  CommandResult submitted =
      cluster.Taskctl({"--format", "json", "submit", "--kind", "sleep", "60000"});
  ASSERT_EQ(submitted.exit_code, 0) << submitted.err;
  const std::vector<uint64_t> ids = SubmittedIds(submitted);
  ASSERT_EQ(ids.size(), 1u) << submitted.out;
  const uint64_t id = ids[0];
  auto client = cluster.NewClient();
  ASSERT_TRUE(WaitFor([&] { return TaskIs(*client, id, v1::LEASED); }, seconds(10)));
  CommandResult cancel = cluster.Taskctl({"cancel", std::to_string(id)});
  EXPECT_EQ(cancel.exit_code, 0) << cancel.err;
  EXPECT_NE(cancel.out.find("cancelled 1 task"), std::string::npos) << cancel.out;
  // The worker stopped it: its slot is free again long before the minute is up.
  EXPECT_TRUE(WaitFor(
      [&] {
        auto workers = client->Workers();
        return workers.ok() && workers->workers_size() == 1 && workers->workers(0).running() == 0;
      },
      seconds(10)));
  EXPECT_TRUE(TaskIs(*client, id, v1::CANCELLED));
}

TEST(Integration, MasterStopsCleanlyOnSigtermAndWaitSaysWhatHappened) {
  // A long shutdown deadline: the master must not need it to end its streams.
  Cluster cluster({"--store", "memory", "--shutdown-timeout-ms", "30000"});
  cluster.StartMaster();
  Process& worker = cluster.StartWorker("w", {"--threads", "2"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  // A task that runs for a minute, and one done at once that shows the follower is following.
  CommandResult submitted = cluster.Taskctl({"submit", "--kind", "sleep", "1", "60000"});
  ASSERT_EQ(submitted.exit_code, 0) << submitted.err;
  const std::string job = submitted.out.substr(0, submitted.out.find('\n'));
  // A follower of the job, across the master's restart.
  Process wait({Binary("taskctl"), "--master", cluster.address(), "--token-file",
                cluster.dir().File("submit.token"), "wait", job},
               cluster.dir().File("wait.log"));
  ASSERT_TRUE(
      WaitFor([&] { return wait.Log().find("slept 1 ms") != std::string::npos; }, seconds(20)))
      << wait.Log();
  const auto start = std::chrono::steady_clock::now();
  cluster.KillMaster(SIGTERM);
  EXPECT_EQ(cluster.master().Wait(milliseconds(0)), 0) << cluster.master().Log();
  EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(3));
  EXPECT_NE(cluster.master().Log().find("stopped"), std::string::npos);
  EXPECT_TRUE(worker.Running());
  cluster.StartMaster();
  // The memory store forgot the job: wait says so instead of hanging or inventing results.
  EXPECT_EQ(wait.Wait(seconds(20)), 2) << wait.Log();
  EXPECT_NE(wait.Log().find("memory store"), std::string::npos) << wait.Log();
  ASSERT_TRUE(cluster.WaitForWorkers(1));
}

TEST(Integration, LargePayloadsTravelInMessagesUnderTheLimit) {
  // 40 tasks of 1 MiB each taken by one worker at once: as one message they would be 40 MiB,
  // over the 8 MiB message limit set on every side.
  Cluster cluster({"--max-message-bytes", "8388608"});
  cluster.StartMaster();
  ClientOptions options;
  options.master.address = cluster.address();
  options.master.max_message_bytes = 8 << 20;
  options.token = kSubmitToken;
  auto client = Client::Connect(options);
  ASSERT_TRUE(client.ok());
  std::vector<std::string> jobs;
  for (int batch = 0; batch < 8; ++batch) {  // 5 MiB per submit
    v1::SubmitRequest request;
    for (int i = 0; i < 5; ++i) {
      v1::TaskSpec* t = request.add_tasks();
      t->set_kind("echo");
      t->set_payload(std::string(1 << 20, static_cast<char>('a' + batch)));
    }
    auto submitted = (*client)->Submit(request);
    ASSERT_TRUE(submitted.ok()) << submitted.status();
    jobs.push_back(submitted->job_id());
  }
  // All 40 are ready when the worker comes: its first credits take them in one go.
  cluster.StartWorker("big",
                      {"--threads", "2", "--prefetch", "60", "--max-message-bytes", "8388608"});
  ASSERT_TRUE(WaitFor(
      [&] {
        for (const std::string& job : jobs) {
          auto info = (*client)->GetJob(job);
          if (!info.ok() || info->done() < info->total()) return false;
        }
        return true;
      },
      seconds(30)));
  size_t results = 0;
  for (const std::string& job : jobs) {
    absl::Status status = (*client)->WatchJob(job, [&](const v1::JobEvent& e) {
      for (const v1::TaskInfo& t : e.results()) {
        EXPECT_EQ(t.state(), v1::SUCCEEDED) << t.error();
        EXPECT_EQ(t.output().size(), 1u << 20);
        ++results;
      }
    });
    ASSERT_TRUE(status.ok()) << status;
  }
  EXPECT_EQ(results, 40u);
}

}  // namespace
}  // namespace taskmaster::testing
