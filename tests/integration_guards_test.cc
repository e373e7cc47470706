// End-to-end tests of what guards the cluster: tokens and roles, TLS, and what bad input or a
// misbehaving peer (one that never reads, a master that refuses results) cannot break.
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"
#include "tests/harness.h"
#include "tests/integration_common.h"

namespace taskmaster::testing {
namespace {

using std::chrono::seconds;

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
  Process allowed({Binary("taskmaster"), "--admin-listen", "127.0.0.1:0", "--listen", "0.0.0.0:0",
                   "--tokens", dir.File("tokens"), "--store", "memory", "--allow-plaintext",
                   "--port-file", dir.File("port")},
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

// A worker that asks for tasks and never reads its stream, while it keeps it alive with
// heartbeats: the master buffers little for it, cuts it off once a write has waited for it half
// a lease, and its tasks go to an honest worker, whose stream (large tasks, many credits)
// is never mistaken for one that does not read.
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
  std::atomic<bool> stop_beating{false};
  std::thread beats([&] {
    v1::WorkerMessage beat;
    beat.set_heartbeat(true);
    for (int i = 0; i < 300 && !stop_beating; ++i) {  // at most 30 s
      beat.set_heartbeat_at(i + 1);  // asks for an echo: something more to write to it
      if (!stream->Write(beat)) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
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
  stop_beating = true;
  context.TryCancel();
  beats.join();
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
  CommandResult r =
      RunCommand({Binary("taskmaster"), "--admin-listen", "127.0.0.1:0", "--insecure", "--store",
                  "memory", "--listen", "127.0.0.1:0", "--port-file", "/nonexistent-dir/port"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("cannot write the port file"), std::string::npos) << r.err;
}

TEST(Integration, InsecureMasterSaysSoAndServesLoopback) {
  TempDir dir;
  Process master({Binary("taskmaster"), "--admin-listen", "127.0.0.1:0", "--insecure", "--listen",
                  "127.0.0.1:0", "--port-file", dir.File("port"), "--store", "memory"},
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
