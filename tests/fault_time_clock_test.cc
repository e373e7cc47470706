// Fault tests of time and silence: clocks stepped under the daemons (through the fault shim),
// master and workers paused with SIGSTOP, and a master killed while results stream in.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"
#include "tests/fault_time_common.h"
#include "tests/harness.h"

namespace taskmaster::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using Steady = std::chrono::steady_clock;

v1::SubmitRequest Tasks(const std::string& kind, const std::string& payload, int count,
                        int32_t max_attempts, int64_t delay_ms = 0) {
  v1::SubmitRequest request;
  for (int i = 0; i < count; ++i) {
    v1::TaskSpec* t = request.add_tasks();
    t->set_kind(kind);
    t->set_payload(payload == "#" ? std::to_string(i) : payload);
    t->set_max_attempts(max_attempts);
    t->set_delay_ms(delay_ms);
  }
  return request;
}

// Steps the wall clock of the processes that preload the shim with `file`.
void StepClock(const std::string& file, int64_t by_seconds) {
  WriteFile(file, std::to_string(by_seconds) + "\n");
  // Not a hope but the shim's bound: it re-reads the file at the first wall-clock read 10 ms or
  // more after its last read, so from 10 ms on every read sees the step. The daemons say nothing
  // a test could wait for instead.
  std::this_thread::sleep_for(milliseconds(50));
}

// The task as the master reports it now; a default TaskInfo (and a failure) when it cannot.
v1::TaskInfo TaskOf(Client& client, uint64_t id) {
  auto task = client.GetTask(id);
  EXPECT_TRUE(task.ok()) << "task " << id << ": " << task.status();
  return task.ok() ? *task : v1::TaskInfo();
}

// Whether process `pid` has `path` open.
bool HasOpen(pid_t pid, const std::filesystem::path& path) {
  std::error_code ec;
  std::filesystem::directory_iterator fd("/proc/" + std::to_string(pid) + "/fd", ec);
  for (; !ec && fd != std::filesystem::directory_iterator(); fd.increment(ec)) {
    std::error_code unreadable;
    if (std::filesystem::read_symlink(fd->path(), unreadable) == path) return true;
  }
  return false;
}

bool WaitForState(Client& client, uint64_t id, v1::TaskState state, milliseconds timeout) {
  return WaitFor(
      [&] {
        auto t = client.GetTask(id);
        return t.ok() && t->state() == state;
      },
      timeout);
}

TEST(FaultTime, MasterClockStepsChangeNoTimer) {
  Cluster cluster({"--lease-timeout-ms", "3000"});
  const std::string clock = cluster.dir().File("clock");
  WriteFile(clock, "0\n");
  cluster.SetEnv(FaultShimEnv(clock, ""));
  cluster.StartMaster();
  cluster.SetEnv({});
  cluster.StartWorker("w", {"--threads", "2"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto client = cluster.NewClient();

  // An hour forward: a running task keeps its lease, a 4 s delay stays 4 s.
  auto running = client->Submit(Tasks("sleep", "2000", 1, 1));
  ASSERT_TRUE(running.ok()) << running.status();
  ASSERT_TRUE(WaitForState(*client, running->task_ids(0), v1::LEASED, seconds(10)));
  const auto delayed_at = Steady::now();
  auto delayed = client->Submit(Tasks("square", "3", 1, 1, 4'000));
  ASSERT_TRUE(delayed.ok());
  StepClock(clock, 3600);
  ASSERT_TRUE(WaitForState(*client, running->task_ids(0), v1::SUCCEEDED, seconds(10)))
      << TaskOf(*client, running->task_ids(0)).error();
  EXPECT_EQ(TaskOf(*client, running->task_ids(0)).attempts(), 1);
  EXPECT_EQ(TaskOf(*client, delayed->task_ids(0)).state(), v1::DELAYED) << "not early";
  ASSERT_TRUE(WaitForState(*client, delayed->task_ids(0), v1::SUCCEEDED, seconds(10)));
  const auto delay_took = Steady::now() - delayed_at;
  EXPECT_GE(delay_took, milliseconds(3'900));

  // An hour back: a worker that stops answering loses its lease after one lease period, and a
  // 1.5 s delay does not become an hour.
  StepClock(clock, -3600);
  auto stuck = client->Submit(Tasks("sleep", "60000", 1, 1));
  ASSERT_TRUE(stuck.ok()) << stuck.status();
  ASSERT_TRUE(WaitForState(*client, stuck->task_ids(0), v1::LEASED, seconds(10)));
  cluster.worker(0).Signal(SIGSTOP);
  const auto stopped_at = Steady::now();
  EXPECT_TRUE(WaitForState(*client, stuck->task_ids(0), v1::DEAD, seconds(15)));
  const auto expired_after = Steady::now() - stopped_at;
  EXPECT_LE(expired_after, milliseconds(2 * 3000 + 1000));
  cluster.StartWorker("w2", {"--threads", "1"});
  const auto short_at = Steady::now();
  auto short_delay = client->Submit(Tasks("square", "4", 1, 1, 1'500));
  ASSERT_TRUE(short_delay.ok()) << short_delay.status();
  EXPECT_TRUE(WaitForState(*client, short_delay->task_ids(0), v1::SUCCEEDED, seconds(10)));
  const auto short_took = Steady::now() - short_at;
  cluster.worker(0).Signal(SIGCONT);
  std::cout << "FIGURES master clock +1h/-1h: acknowledged=4 lease_kept=1 delay_4s_took_ms="
            << std::chrono::duration_cast<milliseconds>(delay_took).count()
            << " stopped_worker_expired_after_ms="
            << std::chrono::duration_cast<milliseconds>(expired_after).count()
            << " delay_1500ms_took_ms="
            << std::chrono::duration_cast<milliseconds>(short_took).count() << std::endl;
}

TEST(FaultTime, WorkerClockStepsKeepItsHeartbeats) {
  Cluster cluster({"--lease-timeout-ms", "2000"});
  cluster.StartMaster();
  const std::string clock = cluster.dir().File("clock");
  WriteFile(clock, "0\n");
  cluster.SetEnv(FaultShimEnv(clock, ""));
  cluster.StartWorker("w", {"--threads", "1", "--log-level", "debug"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto client = cluster.NewClient();
  auto task = client->Submit(Tasks("sleep", "5000", 1, 1));
  ASSERT_TRUE(task.ok()) << task.status();
  ASSERT_TRUE(WaitForState(*client, task->task_ids(0), v1::LEASED, seconds(10)));
  StepClock(clock, 3600);
  // The worker runs a lease period at the stepped time: the fault's length, not a wait.
  std::this_thread::sleep_for(milliseconds(2'000));
  StepClock(clock, -3600);
  ASSERT_TRUE(WaitForState(*client, task->task_ids(0), v1::SUCCEEDED, seconds(15)))
      << TaskOf(*client, task->task_ids(0)).error();
  const auto runs = Executions({cluster.worker(0).Log()});
  EXPECT_EQ(TaskOf(*client, task->task_ids(0)).attempts(), 1);
  EXPECT_EQ(ExtraExecutions(runs), 0);
  std::cout << "FIGURES worker clock +1h/-1h: acknowledged=1 recorded=1 lost=0 extra_executions="
            << ExtraExecutions(runs) << std::endl;
}

TEST(FaultTime, PausedMasterPunishesNoWorker) {
  Cluster cluster({"--lease-timeout-ms", "2000"});
  cluster.StartMaster();
  cluster.StartWorker("w", {"--threads", "8", "--log-level", "debug"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto client = cluster.NewClient();
  auto job = client->Submit(Tasks("sleep", "3000", 8, 1));
  ASSERT_TRUE(job.ok());
  ASSERT_TRUE(WaitFor(
      [&] {
        auto stats = client->Stats();
        return stats.ok() && stats->queues_size() > 0 && stats->queues(0).leased() == 8;
      },
      seconds(10)));
  cluster.master().Signal(SIGSTOP);
  // Paused for twice the lease: the fault's length, not a wait.
  std::this_thread::sleep_for(milliseconds(2 * 2000));
  cluster.master().Signal(SIGCONT);
  std::map<uint64_t, v1::TaskInfo> results;
  ASSERT_TRUE(client
                  ->WatchJob(job->job_id(),
                             [&](const v1::JobEvent& e) {
                               for (const auto& t : e.results()) results[t.id()] = t;
                             })
                  .ok());
  int dead = 0, succeeded = 0;
  for (const auto& [id, t] : results) {
    dead += t.state() == v1::DEAD;
    succeeded += t.state() == v1::SUCCEEDED;
    EXPECT_EQ(t.state(), v1::SUCCEEDED) << id << ": " << t.error();
  }
  const auto runs = Executions({cluster.worker(0).Log()});
  std::cout << "FIGURES master paused for 2 leases: acknowledged=8 succeeded=" << succeeded
            << " dead=" << dead << " lost=" << 8 - static_cast<int>(results.size())
            << " extra_executions=" << ExtraExecutions(runs)
            << " (the worker stops its tasks when it cannot tell a paused master from a lost one)"
            << std::endl;
}

TEST(FaultTime, PausedWorkerIsReplacedAndItsLateRunIsNotRecorded) {
  Cluster cluster({"--lease-timeout-ms", "2000"});
  cluster.StartMaster();
  cluster.StartWorker("w1", {"--threads", "1", "--log-level", "debug"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto client = cluster.NewClient();

  // A pause shorter than the lease changes nothing.
  auto brief = client->Submit(Tasks("sleep", "2500", 1, 1));
  ASSERT_TRUE(brief.ok()) << brief.status();
  ASSERT_TRUE(WaitForState(*client, brief->task_ids(0), v1::LEASED, seconds(10)));
  cluster.worker(0).Signal(SIGSTOP);
  std::this_thread::sleep_for(milliseconds(800));  // the pause's length, not a wait
  cluster.worker(0).Signal(SIGCONT);
  ASSERT_TRUE(WaitForState(*client, brief->task_ids(0), v1::SUCCEEDED, seconds(10)));
  EXPECT_EQ(TaskOf(*client, brief->task_ids(0)).attempts(), 1);

  // A pause longer than the lease: another worker takes over, and the paused one, resumed,
  // stops the task it lost instead of finishing it.
  auto task = client->Submit(Tasks("sleep", "3000", 1, 2));
  ASSERT_TRUE(task.ok()) << task.status();
  ASSERT_TRUE(WaitForState(*client, task->task_ids(0), v1::LEASED, seconds(10)));
  cluster.worker(0).Signal(SIGSTOP);
  cluster.StartWorker("w2", {"--threads", "1", "--log-level", "debug"});
  ASSERT_TRUE(WaitForState(*client, task->task_ids(0), v1::SUCCEEDED, seconds(20)));
  auto done = client->GetTask(task->task_ids(0));
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->worker(), "w2");
  EXPECT_EQ(done->attempts(), 2);
  cluster.worker(0).Signal(SIGCONT);
  // Resumed, the paused worker drops the task (its lease is gone: it fences itself, or obeys
  // the master's cancel), or, if the handler wakes first and returns, sends a result the master
  // drops. Either way the recorded result stays the one of w2.
  ASSERT_TRUE(cluster.WaitForWorkers(2, seconds(20))) << cluster.worker(0).Log();
  auto after = client->GetTask(task->task_ids(0));
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->worker(), "w2");
  EXPECT_EQ(after->attempts(), 2);
  EXPECT_EQ(after->output(), done->output());
  const std::string ran = absl::StrCat("task ", task->task_ids(0), " attempt 1 (sleep): ");
  const std::string log = cluster.worker(0).Log();
  const char* how = log.find(ran + "SUCCEEDED") != std::string::npos ? "finished_it_late_unrecorded"
                    : log.find(ran) != std::string::npos             ? "stopped_it"
                                                                     : "dropped_it_unstarted";
  auto runs = Executions({log, cluster.worker(1).Log()});
  std::cout << "FIGURES worker paused past its lease: acknowledged=2 recorded=2 lost=0 "
               "executions_of_the_lost_task="
            << runs[task->task_ids(0)] << " paused_worker_" << how << std::endl;
}

TEST(FaultTime, MasterAnswersHeartbeats) {
  Cluster cluster;
  cluster.StartMaster();
  auto channel = grpc::CreateChannel(cluster.address(), grpc::InsecureChannelCredentials());
  auto stub = v1::WorkerService::NewStub(channel);
  grpc::ClientContext context;
  context.AddMetadata("authorization", std::string("Bearer ") + kWorkToken);
  context.set_deadline(std::chrono::system_clock::now() + seconds(20));
  auto stream = stub->Connect(&context);
  v1::WorkerMessage hello;
  hello.mutable_hello()->set_worker_id("raw-worker");
  hello.mutable_hello()->add_kinds("square");
  hello.mutable_hello()->set_slots(1);
  ASSERT_TRUE(stream->Write(hello));
  v1::MasterMessage in;
  ASSERT_TRUE(stream->Read(&in));
  ASSERT_TRUE(in.has_welcome());
  EXPECT_TRUE(in.welcome().echoes_heartbeats());
  v1::WorkerMessage beat;
  beat.set_heartbeat(true);
  beat.set_heartbeat_at(123'456);
  ASSERT_TRUE(stream->Write(beat));
  bool echoed = false;
  for (int i = 0; i < 20 && !echoed && stream->Read(&in); ++i) {
    echoed = in.heartbeat_echo() == 123'456;
  }
  EXPECT_TRUE(echoed) << "the master answers a heartbeat once the leases are extended";
  context.TryCancel();
  stream->Finish().IgnoreError();
}

TEST(FaultTime, AWorkerFacingASilentMasterReconnectsAfreshAndKeepsItsTask) {
  Cluster cluster({"--lease-timeout-ms", "5000"});
  cluster.StartMaster();
  cluster.StartWorker("w", {"--threads", "1", "--log-level", "debug"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto client = cluster.NewClient();
  auto task = client->Submit(Tasks("sleep", "3000", 1, 1));
  ASSERT_TRUE(task.ok()) << task.status();
  ASSERT_TRUE(WaitForState(*client, task->task_ids(0), v1::LEASED, seconds(10)));
  // Silent for longer than three heartbeats (200 ms apart), well within the lease: the pause's
  // length, not a wait.
  cluster.master().Signal(SIGSTOP);
  std::this_thread::sleep_for(milliseconds(1'500));
  cluster.master().Signal(SIGCONT);
  ASSERT_TRUE(WaitForState(*client, task->task_ids(0), v1::SUCCEEDED, seconds(15)));
  const std::string log = cluster.worker(0).Log();
  EXPECT_NE(log.find("reconnecting on a fresh connection"), std::string::npos) << log;
  auto done = client->GetTask(task->task_ids(0));
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->attempts(), 1);
  const int extra = ExtraExecutions(Executions({log}));
  EXPECT_EQ(extra, 0);
  std::cout << "FIGURES master silent for 1.5 s (lease 5 s): acknowledged=1 recorded=1 lost=0 "
               "attempts="
            << done->attempts() << " extra_executions=" << extra << std::endl;
}

// A master killed while 60,000 results stream in, then again while it recovers: workers
// report what they hold (running, and results not yet acknowledged), so nothing runs twice.
TEST(FaultTime, MasterKilledWhileResultsStreamInRunsNothingTwice) {
  Cluster cluster({"--reconnect-grace-ms", "5000"});
  cluster.StartMaster();
  cluster.StartWorker("w1", {"--threads", "2", "--log-level", "debug"});
  cluster.StartWorker("w2", {"--threads", "2", "--log-level", "debug"});
  ASSERT_TRUE(cluster.WaitForWorkers(2));
  auto client = cluster.NewClient();
  std::vector<std::string> jobs;
  for (int b = 0; b < 3; ++b) {
    auto job = client->Submit(Tasks("square", "#", 20'000, 3));
    ASSERT_TRUE(job.ok()) << job.status();
    jobs.push_back(job->job_id());
  }
  int64_t held = 0;
  ASSERT_TRUE(WaitFor(
      [&] {
        auto stats = client->Stats();
        if (!stats.ok() || stats->queues_size() == 0) return false;
        held = stats->queues(0).leased();
        return stats->queues(0).succeeded() >= 5'000;
      },
      seconds(30)));
  cluster.KillMaster(SIGKILL);
  // Killed again while it recovers: once it has its store open, before it listens (it writes
  // its port file after recovery). When the kill comes too late, it is tried again.
  const std::filesystem::path db =
      std::filesystem::weakly_canonical(cluster.data_dir() + "/taskmaster.db");
  const std::string port_file = cluster.dir().File("port");
  bool killed_while_recovering = false;
  int tries = 0;
  while (!killed_while_recovering && tries < 5) {
    std::filesystem::remove(port_file);
    Process recovering(cluster.MasterArgv(),
                       cluster.dir().File(absl::StrCat("recovering-", tries++, ".log")));
    const bool opened =
        WaitFor([&] { return HasOpen(recovering.pid(), db); }, seconds(20), milliseconds(1));
    recovering.Signal(SIGKILL);
    ASSERT_TRUE(recovering.Wait(seconds(10)).has_value());
    ASSERT_TRUE(opened) << "the recovering master never opened its store:\n" << recovering.Log();
    killed_while_recovering = !std::filesystem::exists(port_file);
  }
  ASSERT_TRUE(killed_while_recovering) << "each of " << tries << " kills came after recovery";
  cluster.StartMaster();
  client = cluster.NewClient();
  int64_t recorded = 0;
  for (const std::string& job : jobs) {
    ASSERT_TRUE(client
                    ->WatchJob(job,
                               [&](const v1::JobEvent& e) {
                                 for (const auto& t : e.results()) {
                                   recorded += t.state() == v1::SUCCEEDED;
                                 }
                               })
                    .ok());
  }
  const auto runs = Executions({cluster.worker(0).Log(), cluster.worker(1).Log()});
  const int extra = ExtraExecutions(runs);
  std::cout << "FIGURES master killed twice while results streamed in: acknowledged=60000 "
               "recorded="
            << recorded << " lost=" << 60'000 - recorded << " extra_executions=" << extra
            << " held_by_workers_at_the_kill=" << held << " kills_to_land_one_in_recovery=" << tries
            << std::endl;
  EXPECT_EQ(recorded, 60'000);
  EXPECT_EQ(extra, 0);
}

}  // namespace
}  // namespace taskmaster::testing
