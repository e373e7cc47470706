// End-to-end tests: the real taskmaster, taskworker and taskctl binaries on loopback ports chosen
// by the OS, with real tokens.
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"
#include "taskmaster/v1/taskmaster.grpc.pb.h"
#include "tests/harness.h"

namespace taskmaster::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

v1::SubmitRequest Batch(const std::string& kind, const std::vector<std::string>& payloads,
                        int32_t max_attempts = 0) {
  v1::SubmitRequest request;
  for (const std::string& p : payloads) {
    v1::TaskSpec* t = request.add_tasks();
    t->set_kind(kind);
    t->set_payload(p);
    t->set_max_attempts(max_attempts);
  }
  return request;
}

// The task ids `taskctl --format json submit` printed (none when it failed).
std::vector<uint64_t> SubmittedIds(const CommandResult& submitted) {
  const nlohmann::json out = nlohmann::json::parse(
      submitted.out.substr(0, submitted.out.find('\n')), nullptr, /*allow_exceptions=*/false);
  if (!out.is_object() || !out.contains("task_ids")) return {};
  return out["task_ids"].get<std::vector<uint64_t>>();
}

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

TEST(Integration, TwoWorkersShareTwoThousandTasksExactlyOnce) {
  Cluster cluster;
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

TEST(Integration, TokensAreCheckedWithRoles) {
  Cluster cluster;
  cluster.StartMaster();
  auto request = Batch("echo", {"x"});
  EXPECT_TRUE(absl::IsUnauthenticated(cluster.NewClient("")->Submit(request).status()));
  EXPECT_TRUE(absl::IsUnauthenticated(
      cluster.NewClient("wrong-token-0123456789")->Submit(request).status()));
  auto wrong_role = cluster.NewClient(kWorkToken)->Submit(request).status();
  EXPECT_TRUE(absl::IsPermissionDenied(wrong_role)) << wrong_role;
  EXPECT_TRUE(cluster.NewClient(kAdminToken)->Submit(request).ok());

  // taskctl says what to fix.
  WriteFile(cluster.dir().File("bad.token"), "nope-nope-nope-nope\n");
  CommandResult r = RunCommand({Binary("taskctl"), "--master", cluster.address(), "--token-file",
                                cluster.dir().File("bad.token"), "stats"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("refused the token"), std::string::npos) << r.err;

  // A worker with a submit token is refused, and the token never reaches the logs.
  Process bad_worker({Binary("taskworker"), "--master", cluster.address(), "--token-file",
                      cluster.dir().File("submit.token"), "--name", "intruder"},
                     cluster.dir().File("intruder.log"));
  EXPECT_TRUE(
      WaitFor([&] { return bad_worker.Log().find("may not call Connect") != std::string::npos; },
              seconds(10)))
      << bad_worker.Log();
  auto workers = cluster.NewClient()->Workers();
  ASSERT_TRUE(workers.ok()) << workers.status();
  EXPECT_TRUE(workers->workers().empty());
  EXPECT_NE(cluster.master().Log().find("refused a worker stream"), std::string::npos);
  bad_worker.Signal(SIGTERM);
  EXPECT_EQ(bad_worker.Wait(seconds(10)), 0);
  EXPECT_EQ(bad_worker.Log().find(kSubmitToken), std::string::npos);
  EXPECT_EQ(cluster.master().Log().find(kSubmitToken), std::string::npos);
}

TEST(Integration, MasterRefusesToRunOpenUnlessTold) {
  CommandResult no_tokens = RunCommand({Binary("taskmaster"), "--listen", "127.0.0.1:0"});
  EXPECT_NE(no_tokens.exit_code, 0);
  EXPECT_NE(no_tokens.err.find("--insecure"), std::string::npos) << no_tokens.err;
  CommandResult open = RunCommand(
      {Binary("taskmaster"), "--insecure", "--listen", "0.0.0.0:0", "--store", "memory"});
  EXPECT_NE(open.exit_code, 0);
  EXPECT_NE(open.err.find("loopback"), std::string::npos) << open.err;
  TempDir dir;
  WriteFile(dir.File("tokens"), "submit short\n");
  CommandResult bad =
      RunCommand({Binary("taskmaster"), "--listen", "127.0.0.1:0", "--tokens", dir.File("tokens")});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("line 1"), std::string::npos) << bad.err;
}

TEST(Integration, TokensInClearOffLoopbackOnlyWhenAskedFor) {
  TempDir dir;
  WriteFile(dir.File("tokens"), std::string("submit ") + kSubmitToken + "\n");
  std::filesystem::permissions(dir.File("tokens"), std::filesystem::perms::owner_read);
  CommandResult refused = RunCommand({Binary("taskmaster"), "--listen", "0.0.0.0:0", "--tokens",
                                      dir.File("tokens"), "--store", "memory"});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_NE(refused.err.find("--allow-plaintext"), std::string::npos) << refused.err;
  Process allowed({Binary("taskmaster"), "--listen", "0.0.0.0:0", "--tokens", dir.File("tokens"),
                   "--store", "memory", "--allow-plaintext", "--port-file", dir.File("port")},
                  dir.File("master.log"));
  EXPECT_TRUE(
      WaitFor([&] { return std::filesystem::exists(dir.File("port")); }, std::chrono::seconds(20)))
      << allowed.Log();
  // A client about to send its token in clear off loopback says so.
  WriteFile(dir.File("token"), std::string(kSubmitToken) + "\n");
  std::filesystem::permissions(dir.File("token"), std::filesystem::perms::owner_read);
  // (0.0.0.0 is this host, reached without leaving it, but not a loopback address.)
  CommandResult warned = RunCommand(
      {Binary("taskctl"), "--master", "0.0.0.0:1", "--token-file", dir.File("token"), "stats"});
  EXPECT_NE(warned.err.find("in clear"), std::string::npos) << warned.err;
}

// A worker that asks for tasks and never reads its stream: the master cuts it off instead of
// buffering for it without bound, and its tasks go to an honest worker.
TEST(Integration, AWorkerThatNeverReadsIsCutOff) {
  Cluster cluster({"--max-message-bytes", "4194304", "--max-worker-buffer-bytes", "8388608",
                   "--reconnect-grace-ms", "500", "--lease-timeout-ms", "2000"});
  cluster.StartMaster();
  auto stub = v1::WorkerService::NewStub(
      grpc::CreateChannel(cluster.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.AddMetadata("authorization", std::string("Bearer ") + kWorkToken);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub->Connect(&context);
  v1::WorkerMessage hello;
  hello.mutable_hello()->set_worker_id("never-reads");
  hello.mutable_hello()->add_kinds("echo");
  hello.mutable_hello()->set_slots(1'000);
  hello.set_credits(1'000);
  ASSERT_TRUE(stream->Write(hello));
  auto client = cluster.NewClient();
  std::vector<uint64_t> ids;
  for (int b = 0; b < 8; ++b) {
    auto job =
        client->Submit(Batch("echo", std::vector<std::string>(6, std::string(512 << 10, 'p'))));
    ASSERT_TRUE(job.ok()) << job.status();
    ids.insert(ids.end(), job->task_ids().begin(), job->task_ids().end());
  }
  // The master ends the stream (a stream that is not read cannot take a status: it is cancelled)
  // and forgets the worker's connection.
  EXPECT_TRUE(WaitFor(
      [&] {
        auto workers = client->Workers();
        return workers.ok() && workers->workers_size() == 1 && !workers->workers(0).connected();
      },
      std::chrono::seconds(20)));
  EXPECT_NE(cluster.master().Log().find("cut off worker stream"), std::string::npos);
  context.TryCancel();
  stream->Finish().IgnoreError();
  cluster.StartWorker("honest", {"--threads", "2", "--max-message-bytes", "4194304"});
  EXPECT_TRUE(WaitFor(
      [&] {
        for (uint64_t id : ids) {
          auto t = client->GetTask(id);
          if (!t.ok() || t->state() != v1::SUCCEEDED) return false;
        }
        return true;
      },
      std::chrono::seconds(30)));
}

TEST(Integration, PeerTextReachesNoTerminalOrLogRaw) {
  Cluster cluster;
  cluster.StartMaster();
  const std::string name = "evil\x1B[2J\x1B[31m";  // clears a terminal, turns it red
  cluster.StartWorker(name, {"--threads", "1"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  CommandResult listed = cluster.Taskctl({"workers"});
  EXPECT_EQ(listed.exit_code, 0) << listed.err;
  EXPECT_EQ(listed.out.find('\x1B'), std::string::npos) << listed.out;
  EXPECT_NE(listed.out.find("evil\\x1B[2J"), std::string::npos) << listed.out;
  CommandResult failed = cluster.Taskctl(
      {"submit", "--kind", "fail", "--max-attempts", "1", "--wait", "bad\x1B[2Jthing"});
  EXPECT_EQ(failed.out.find('\x1B'), std::string::npos) << failed.out;
  EXPECT_EQ(failed.err.find('\x1B'), std::string::npos) << failed.err;
  EXPECT_EQ(cluster.master().Log().find('\x1B'), std::string::npos);
}

// A master that ends the stream whenever a result arrives, as one would that cannot read it.
class RefusingMaster final : public v1::WorkerService::Service {
 public:
  grpc::Status Connect(
      grpc::ServerContext*,
      grpc::ServerReaderWriter<v1::MasterMessage, v1::WorkerMessage>* stream) override {
    v1::WorkerMessage in;
    if (!stream->Read(&in)) return grpc::Status::OK;
    v1::MasterMessage welcome;
    welcome.mutable_welcome()->set_master_epoch("refusing");
    welcome.mutable_welcome()->set_heartbeat_interval_ms(200);
    welcome.mutable_welcome()->set_lease_timeout_ms(60'000);
    stream->Write(welcome);
    while (stream->Read(&in)) {
      if (in.credits() > 0 && !task_sent_.exchange(true)) {
        v1::MasterMessage out;
        v1::Task* t = out.add_tasks();
        t->set_task_id(1);
        t->set_attempt(1);
        t->set_kind("echo");
        t->set_payload("poison");
        stream->Write(out);
      }
      if (in.results_size() > 0) {
        ++refusals;
        return grpc::Status(grpc::StatusCode::INTERNAL, "cannot parse the message");
      }
    }
    return grpc::Status::OK;
  }
  std::atomic<int> refusals{0};

 private:
  std::atomic<bool> task_sent_{false};
};

TEST(Integration, AResultTheMasterKeepsRefusingIsGivenUp) {
  RefusingMaster master;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&master);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_TRUE(server && port > 0);
  TempDir dir;
  Process worker({Binary("taskworker"), "--master", "127.0.0.1:" + std::to_string(port),
                  "--threads", "1", "--reconnect-max-ms", "200"},
                 dir.File("worker.log"));
  EXPECT_TRUE(WaitFor([&] { return master.refusals.load() >= 5; }, std::chrono::seconds(30)))
      << worker.Log();
  // Given up after five: no sixth resend, and the worker says so.
  EXPECT_TRUE(WaitFor(
      [&] { return worker.Log().find("giving up on the result of task 1") != std::string::npos; },
      std::chrono::seconds(10)))
      << worker.Log();
  // Room for a resend that must not come: a fixed window on purpose, as there is no event to wait
  // for when checking that something does not happen.
  std::this_thread::sleep_for(std::chrono::seconds(1));
  EXPECT_EQ(master.refusals.load(), 5);
  EXPECT_TRUE(worker.Running());
  server->Shutdown(std::chrono::system_clock::now());
}

TEST(Integration, APortFileThatCannotBeWrittenStopsTheMaster) {
  CommandResult r = RunCommand({Binary("taskmaster"), "--insecure", "--store", "memory", "--listen",
                                "127.0.0.1:0", "--port-file", "/nonexistent-dir/port"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("cannot write the port file"), std::string::npos) << r.err;
}

TEST(Integration, InsecureMasterSaysSoAndServesLoopback) {
  TempDir dir;
  Process master({Binary("taskmaster"), "--insecure", "--listen", "127.0.0.1:0", "--port-file",
                  dir.File("port"), "--store", "memory"},
                 dir.File("master.log"));
  ASSERT_TRUE(WaitFor([&] { return !ReadFile(dir.File("port")).empty(); }, seconds(20)));
  EXPECT_NE(master.Log().find("INSECURE"), std::string::npos);
  const std::string port = std::to_string(std::stoi(ReadFile(dir.File("port"))));
  CommandResult r = RunCommand({Binary("taskctl"), "--master", "127.0.0.1:" + port, "stats"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  master.Signal(SIGTERM);
  EXPECT_EQ(master.Wait(seconds(10)), 0);
}

TEST(Integration, BadInputIsInvalidArgumentAndTheMasterCarriesOn) {
  Cluster cluster({"--max-payload-bytes", "16"});
  cluster.StartMaster();
  auto client = cluster.NewClient();
  auto oversized = client->Submit(Batch("echo", {std::string(17, 'x')})).status();
  EXPECT_TRUE(absl::IsInvalidArgument(oversized)) << oversized;
  v1::SubmitRequest bad_queue = Batch("echo", {"x"});
  bad_queue.mutable_tasks(0)->set_queue("white space");
  EXPECT_TRUE(absl::IsInvalidArgument(client->Submit(bad_queue).status()));
  CommandResult r = cluster.Taskctl({"submit", "--kind", "echo", "--timeout", "-1", "x"});
  EXPECT_EQ(r.exit_code, 2);
  CommandResult empty_kind = cluster.Taskctl({"submit", "--kind", "", "x"});
  EXPECT_EQ(empty_kind.exit_code, 2);
  EXPECT_NE(empty_kind.err.find("kind is empty"), std::string::npos) << empty_kind.err;
  // Still serving.
  EXPECT_TRUE(client->Submit(Batch("echo", {"fine"})).ok());
  // An unknown kind is accepted, and status says why it waits.
  CommandResult unknown =
      cluster.Taskctl({"--format", "json", "submit", "--kind", "resize", "img"});
  EXPECT_EQ(unknown.exit_code, 0) << unknown.err;
  EXPECT_NE(unknown.err.find("no connected worker runs kind 'resize'"), std::string::npos)
      << unknown.err;
  const std::vector<uint64_t> ids = SubmittedIds(unknown);
  ASSERT_EQ(ids.size(), 1u) << unknown.out;
  auto info = client->GetTask(ids[0]);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_NE(info->waiting_for().find("no connected worker"), std::string::npos);
}

TEST(Integration, AnIdempotencyKeyReusedForOtherWorkIsRefused) {
  Cluster cluster;
  cluster.StartMaster();
  cluster.StartWorker("w", {"--threads", "1"});
  CommandResult first =
      cluster.Taskctl({"submit", "--kind", "square", "--key", "k7", "--wait", "7"});
  ASSERT_EQ(first.exit_code, 0) << first.err;
  EXPECT_NE(first.out.find("7*7=49"), std::string::npos) << first.out;
  // The same work again answers with the first task's result.
  CommandResult again =
      cluster.Taskctl({"submit", "--kind", "square", "--key", "k7", "--wait", "7"});
  EXPECT_EQ(again.exit_code, 0) << again.err;
  EXPECT_NE(again.out.find("7*7=49"), std::string::npos) << again.out;
  // Other work under the same key is an error, not the first task's result.
  CommandResult other =
      cluster.Taskctl({"submit", "--kind", "square", "--key", "k7", "--wait", "8"});
  EXPECT_NE(other.exit_code, 0);
  EXPECT_EQ(other.out.find("7*7=49"), std::string::npos) << other.out;
  EXPECT_NE(other.err.find("was used for a different task"), std::string::npos) << other.err;
}

// A payload that is not UTF-8 used to reach a result's error (a protobuf text field): the master
// could not parse the worker's message, and the worker resent it forever, running nothing else.
TEST(Integration, PayloadsThatAreNotUtf8StopNoWorker) {
  Cluster cluster;
  cluster.StartMaster();
  cluster.StartWorker("w", {"--threads", "2"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto client = cluster.NewClient();
  const std::string bad = "\xC3\x28";
  std::vector<uint64_t> ids;
  for (const char* kind : {"fail", "square", "sleep", "echo"}) {
    auto job = client->Submit(Batch(kind, {bad}, 1));
    ASSERT_TRUE(job.ok()) << job.status();
    ids.push_back(job->task_ids(0));
  }
  auto fine = client->Submit(Batch("square", {"7"}));
  ASSERT_TRUE(fine.ok());
  ids.push_back(fine->task_ids(0));
  std::map<uint64_t, v1::TaskInfo> results;
  ASSERT_TRUE(WaitFor(
      [&] {
        for (uint64_t id : ids) {
          auto t = client->GetTask(id);
          if (!t.ok() || (t->state() != v1::SUCCEEDED && t->state() != v1::DEAD)) return false;
          results[id] = *t;
        }
        return true;
      },
      std::chrono::seconds(20)))
      << "the worker is stuck:\n"
      << cluster.worker(0).Log();
  for (const auto& [id, t] : results) {
    if (t.kind() == "echo") {
      EXPECT_EQ(t.state(), v1::SUCCEEDED);
      EXPECT_EQ(t.output(), bad) << "bytes travel as they are";
    } else if (t.kind() == "square" && t.error().empty()) {
      EXPECT_EQ(t.output(), "7*7=49");
    } else {
      EXPECT_EQ(t.state(), v1::DEAD) << t.kind();
      EXPECT_NE(t.error().find("\\xC3("), std::string::npos) << t.kind() << ": " << t.error();
    }
  }
  EXPECT_EQ(cluster.worker(0).Log().find("lost the master"), std::string::npos)
      << cluster.worker(0).Log();

  // Text fields a client sends must be UTF-8: said plainly, before anything is sent.
  v1::SubmitRequest keyed = Batch("square", {"1"});
  keyed.mutable_tasks(0)->set_idempotency_key(bad);
  auto refused = client->Submit(keyed);
  EXPECT_TRUE(absl::IsInvalidArgument(refused.status())) << refused.status();
  EXPECT_NE(std::string(refused.status().message()).find("not valid UTF-8"), std::string::npos);
}

TEST(Integration, WorkerDrainsOnSigterm) {
  Cluster cluster;
  cluster.StartMaster();
  Process& draining = cluster.StartWorker("draining", {"--threads", "1", "--prefetch", "2"});
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

}  // namespace
}  // namespace taskmaster::testing

namespace taskmaster::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

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

// With the quick-start certificates of deploy/make-certs.sh, which this also tests.
TEST(Integration, MutualTlsWithTokens) {
  TempDir certs;
  CommandResult made = MakeCertificates(certs.path());
  ASSERT_EQ(made.exit_code, 0) << made.err;
  Cluster cluster({"--tls-cert", certs.File("server.pem"), "--tls-key", certs.File("server.key"),
                   "--tls-client-ca", certs.File("ca.pem")});
  cluster.StartMaster();
  const std::vector<std::string> tls = {"--tls-ca",   certs.File("ca.pem"),
                                        "--tls-cert", certs.File("client.pem"),
                                        "--tls-key",  certs.File("client.key")};
  cluster.StartWorker("tls-worker", tls);
  std::vector<std::string> args = tls;
  for (const char* a : {"submit", "--kind", "square", "--wait", "12"}) args.push_back(a);
  CommandResult ok = cluster.Taskctl(args);
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_NE(ok.out.find("12*12=144"), std::string::npos) << ok.out;
  // Without a client certificate, or without TLS at all, the master does not answer.
  CommandResult no_cert = cluster.Taskctl({"--tls-ca", certs.File("ca.pem"), "stats"});
  EXPECT_EQ(no_cert.exit_code, 2);
  CommandResult plain = cluster.Taskctl({"stats"});
  EXPECT_EQ(plain.exit_code, 2);
  EXPECT_NE(plain.err.find("cannot reach the master"), std::string::npos) << plain.err;
}

}  // namespace
}  // namespace taskmaster::testing

namespace taskmaster::testing {
namespace {

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
