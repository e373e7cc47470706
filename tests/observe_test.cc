// The admin listeners of the real binaries: /metrics of the master and a worker scraped under
// load and checked by promtool, the numbers they report, the probes, /api/status against
// `taskctl stats`, and what an admin listener off loopback asks of its callers.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <optional>
#include <regex>
#include <string>

#include "httplib.h"
#include "nlohmann/json.hpp"
#include "tests/expect.h"
#include "tests/integration_common.h"

namespace taskmaster::testing {
namespace {

using std::chrono::seconds;

// The port of the first "admin pages on http(s)://HOST:PORT" line of a daemon's log.
std::optional<int> AdminPort(const Process& process) {
  std::optional<int> port;
  WaitFor(
      [&] {
        std::smatch m;
        const std::string log = process.Log();
        if (!std::regex_search(log, m, std::regex(R"(admin pages on https?://[^\s]+:(\d+))"))) {
          return false;
        }
        port = std::stoi(m[1]);
        return true;
      },
      seconds(20));
  return port;
}

struct Reply {
  int status = 0;  // 0: no answer
  std::string body;
};

// GET with the harness's admin token (pages but the probes ask for one when the master has
// tokens), or with `headers`.
Reply Get(int port, const std::string& path,
          const httplib::Headers& headers = {
              {"Authorization", std::string("Bearer ") + kAdminToken}}) {
  httplib::Client client("127.0.0.1", port);
  client.set_connection_timeout(5);
  client.set_read_timeout(10);
  httplib::Result r = client.Get(path.c_str(), headers);
  if (!r) return {};
  return {r->status, r->body};
}

// The value of the one sample `series` (name and labels exactly as printed) in a scrape.
std::optional<double> Sample(const std::string& scrape, const std::string& series) {
  const size_t at = scrape.find("\n" + series + " ");
  if (at == std::string::npos) return std::nullopt;
  return std::stod(scrape.substr(at + series.size() + 2));
}

// promtool's complaints about a scrape ("" when it has none), or nullopt without promtool.
std::optional<std::string> PromtoolComplaints(const std::string& scrape) {
  CommandResult which = RunCommand({"/bin/sh", "-c", "command -v promtool"});
  if (which.exit_code != 0) return std::nullopt;
  CommandResult checked = RunCommand({"promtool", "check", "metrics"}, scrape, seconds(30));
  return checked.exit_code == 0
             ? checked.out + checked.err
             : "exit " + std::to_string(checked.exit_code) + ": " + checked.out + checked.err;
}

TEST(Observe, MetricsOfMasterAndWorkerUnderLoad) {
  Cluster cluster;
  cluster.StartMaster();
  Process& worker = cluster.StartWorker(
      "w1", {"--threads", "2", "--admin-listen", "127.0.0.1:0", "--queues", "default,mail"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  const std::optional<int> master_port = AdminPort(cluster.master());
  const std::optional<int> worker_port = AdminPort(worker);
  ASSERT_TRUE(master_port && worker_port) << cluster.master().Log() << worker.Log();

  auto client = cluster.NewClient();
  std::vector<std::string> numbers;
  for (int i = 0; i < 2000; ++i) numbers.push_back(std::to_string(i));
  auto squares = client->Submit(Batch("square", numbers));
  ASSERT_TRUE(squares.ok()) << squares.status();
  v1::SubmitRequest failing = Batch("fail", {"no\nsuch\x1b[31mthing", "boom"}, 2);
  for (auto& t : *failing.mutable_tasks()) t.set_queue("mail");
  auto failed = client->Submit(failing);
  ASSERT_TRUE(failed.ok()) << failed.status();

  // Scraped while the tasks run: each scrape is well formed.
  bool finished = false;
  int scrapes = 0;
  for (int round = 0; round < 200 && !finished; ++round) {
    for (int port : {*master_port, *worker_port}) {
      const Reply metrics = Get(port, "/metrics");
      ASSERT_EQ(metrics.status, 200) << metrics.body;
      if (std::optional<std::string> complaints = PromtoolComplaints(metrics.body)) {
        EXPECT_EQ(*complaints, "") << metrics.body;
      }
      ++scrapes;
    }
    auto a = client->GetJob(squares->job_id());
    auto b = client->GetJob(failed->job_id());
    finished = a.ok() && b.ok() && a->done() == a->total() && b->done() == b->total();
  }
  ASSERT_TRUE(finished);
  EXPECT_GE(scrapes, 2);
  if (!PromtoolComplaints("")) std::cerr << "promtool is not installed: scrapes not checked\n";

  const std::string master = Get(*master_port, "/metrics").body;
  EXPECT_EQ(Sample(master, R"(taskmaster_tasks_submitted_total{queue="default"})"), 2000);
  EXPECT_EQ(
      Sample(master, R"(taskmaster_tasks_completed_total{queue="default",outcome="succeeded"})"),
      2000);
  EXPECT_EQ(Sample(master, R"(taskmaster_tasks_completed_total{queue="mail",outcome="dead"})"), 2);
  EXPECT_EQ(Sample(master, R"(taskmaster_task_attempts_failed_total{queue="mail"})"), 4);
  EXPECT_EQ(Sample(master, R"(taskmaster_tasks_retried_total{queue="mail"})"), 2);
  EXPECT_EQ(Sample(master, R"(taskmaster_tasks{queue="default",state="ready"})"), 0);
  EXPECT_EQ(Sample(master, R"(taskmaster_task_run_seconds_count{kind="square"})"), 2000);
  EXPECT_EQ(Sample(master, R"(taskmaster_workers{state="connected"})"), 1);
  EXPECT_EQ(Sample(master, R"(taskmaster_state{state="serving"})"), 1);
  EXPECT_GE(Sample(master, "taskmaster_store_commit_seconds_count").value_or(0), 1);
  EXPECT_CONTAINS(master, "process_resident_memory_bytes ");

  const std::string worker_metrics = Get(*worker_port, "/metrics").body;
  EXPECT_EQ(
      Sample(worker_metrics,
             R"(taskmaster_worker_tasks_total{pool="default",kind="square",outcome="succeeded"})"),
      2000);
  EXPECT_EQ(Sample(worker_metrics,
                   R"(taskmaster_worker_tasks_total{pool="default",kind="fail",outcome="failed"})"),
            4);
  EXPECT_EQ(
      Sample(worker_metrics, R"(taskmaster_worker_pool_threads{pool="default",state="free"})"), 2);
  EXPECT_EQ(Sample(worker_metrics, R"(taskmaster_worker_connected{pool="default"})"), 1);
  EXPECT_EQ(Get(*worker_port, "/readyz").status, 200);
  EXPECT_EQ(Get(*worker_port, "/").status, 404);  // a worker has no status page

  // The page's data says what taskctl says, and carries the failures' errors as sent.
  const nlohmann::json status = nlohmann::json::parse(Get(*master_port, "/api/status").body);
  CommandResult stats = cluster.Taskctl({"--format", "json", "stats"});
  ASSERT_EQ(stats.exit_code, 0) << stats.err;
  const nlohmann::json expected = nlohmann::json::parse(stats.out);
  EXPECT_EQ(status["queues"], expected["queues"]);
  EXPECT_EQ(status["duplicate_results"], expected["duplicate_results"]);
  ASSERT_EQ(status["workers"].size(), 1u);
  EXPECT_EQ(status["workers"][0]["name"], expected["workers"][0]["name"]);
  ASSERT_EQ(status["failures"].size(), 4u);
  EXPECT_EQ(status["failures"][0]["kind"], "fail");
  EXPECT_EQ(status["state"], "serving");

  // The worker goes: the master's gauge follows, and its own readiness with it.
  worker.Signal(SIGTERM);
  ASSERT_TRUE(worker.Wait(seconds(20)).has_value());
  EXPECT_TRUE(WaitFor(
      [&] {
        return Sample(Get(*master_port, "/metrics").body,
                      R"(taskmaster_workers{state="connected"})") == 0;
      },
      seconds(10)));
}

TEST(Observe, ProbesAndPagesOfTheMaster) {
  Cluster cluster;
  cluster.StartMaster();
  const std::optional<int> port = AdminPort(cluster.master());
  ASSERT_TRUE(port) << cluster.master().Log();
  EXPECT_EQ(Get(*port, "/healthz").status, 200);
  const Reply ready = Get(*port, "/readyz");
  EXPECT_EQ(ready.status, 200);
  EXPECT_EQ(ready.body, "serving\n");
  const Reply page = Get(*port, "/");
  EXPECT_EQ(page.status, 200);
  EXPECT_CONTAINS(page.body, "<html");
  EXPECT_EQ(Get(*port, "/app.js").status, 200);
  EXPECT_EQ(Get(*port, "/nothing-here").status, 404);
  EXPECT_EQ(Get(*port, "/appXjs").status, 404);  // paths match exactly
  // With tokens, on loopback too: an admin token, but none for probes.
  EXPECT_EQ(Get(*port, "/", {}).status, 401);
  EXPECT_EQ(
      Get(*port, "/metrics", {{"Authorization", std::string("Bearer ") + kSubmitToken}}).status,
      401);
  EXPECT_EQ(Get(*port, "/readyz", {}).status, 200);
  // A name rebound to 127.0.0.1 by a page from elsewhere does not reach the pages.
  EXPECT_EQ(Get(*port, "/healthz", {{"Host", "evil.example:7071"}}).status, 421);
  EXPECT_EQ(Get(*port, "/healthz", {{"Host", "localhost:7071"}}).status, 200);
  EXPECT_EQ(Get(*port, "/healthz", {{"Host", "127.0.0.1:80.evil.example"}}).status, 421);
  // GET only, and nothing the size of a body.
  httplib::Client client("127.0.0.1", *port);
  httplib::Result posted = client.Post("/metrics", std::string(64 << 10, 'x'), "text/plain");
  ASSERT_TRUE(posted);
  EXPECT_GE(posted->status, 400);
  EXPECT_TRUE(cluster.master().Running());
}

// A raw connection to the admin listener on loopback.
int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(static_cast<uint16_t>(port));
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof(to)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// What the peer sent until it closed (bounded: 10 s).
std::string ReadAll(int fd) {
  timeval timeout{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  std::string in;
  char buffer[4096];
  for (ssize_t n; (n = recv(fd, buffer, sizeof(buffer), 0)) > 0;) in.append(buffer, n);
  return in;
}

TEST(Observe, AdminListenerBoundsWhatAStrangerSends) {
  Cluster cluster;
  cluster.StartMaster();
  const std::optional<int> port = AdminPort(cluster.master());
  ASSERT_TRUE(port) << cluster.master().Log();
  // Endless header lines: refused once they pass 8 KiB, not kept.
  const int flood = Connect(*port);
  ASSERT_GE(flood, 0);
  std::string request = "GET /metrics HTTP/1.1\r\n";
  for (int i = 0; i < 400; ++i) request += "X-Padding: " + std::string(40, 'x') + "\r\n";
  send(flood, request.data(), request.size(), MSG_NOSIGNAL);
  EXPECT_CONTAINS(ReadAll(flood), "HTTP/1.1 431 ");
  close(flood);
  // Malformed headers are refused, not read around: a space before the colon, a NUL, two Hosts.
  for (const std::string& bad :
       std::vector<std::string>{"Host : evil.example\r\n", std::string("X-A: a\0b\r\n", 10),
                                "Host: localhost\r\nHost: evil.example\r\n"}) {
    const int fd = Connect(*port);
    ASSERT_GE(fd, 0);
    const std::string sent = "GET /healthz HTTP/1.1\r\n" + bad + "\r\n";
    send(fd, sent.data(), sent.size(), MSG_NOSIGNAL);
    EXPECT_CONTAINS(ReadAll(fd), "HTTP/1.1 400 ");
    close(fd);
  }
  // More connections that send nothing than the listener serves at once: probes are answered
  // meanwhile (the oldest idle one makes room), and every idle one is closed within the read
  // deadline (3 s).
  std::vector<int> idle;
  for (int i = 0; i < 40; ++i) idle.push_back(Connect(*port));
  const auto asked = std::chrono::steady_clock::now();
  EXPECT_EQ(Get(*port, "/healthz", {}).status, 200);
  EXPECT_LT(std::chrono::steady_clock::now() - asked, seconds(2));
  for (int fd : idle) {
    ASSERT_GE(fd, 0);
    EXPECT_EQ(ReadAll(fd), "");  // closed without an answer
    close(fd);
  }
  EXPECT_TRUE(cluster.master().Running());
}

TEST(Observe, AdminListenerOffLoopbackNeedsTlsAndAnAdminToken) {
  Cluster plain({"--admin-listen", "0.0.0.0:0"});
  CommandResult refused = RunCommand(plain.MasterArgv(), "", seconds(20));
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_CONTAINS(refused.err, "--admin-allow-plaintext");

  TempDir certs;
  ASSERT_EQ(MakeCertificates(certs.path()).exit_code, 0);
  Cluster cluster({"--admin-listen", "0.0.0.0:0", "--tls-cert", certs.File("server.pem"),
                   "--tls-key", certs.File("server.key")});
  ChannelOptions tls;
  tls.tls_ca_file = certs.File("ca.pem");
  cluster.SetClientTls(tls);
  cluster.StartMaster();
  const std::optional<int> port = AdminPort(cluster.master());
  ASSERT_TRUE(port) << cluster.master().Log();
  httplib::SSLClient client("127.0.0.1", *port);
  client.set_ca_cert_path(certs.File("ca.pem").c_str());
  client.enable_server_certificate_verification(true);
  auto status_of = [&](const std::string& path, const httplib::Headers& headers) {
    httplib::Result r = client.Get(path.c_str(), headers);
    return r ? r->status : 0;
  };
  const std::string admin = kAdminToken;
  EXPECT_EQ(status_of("/metrics", {}), 401);
  EXPECT_EQ(status_of("/metrics", {{"Authorization", "Bearer " + std::string(kSubmitToken)}}), 401);
  EXPECT_EQ(status_of("/metrics", {{"Authorization", "Bearer not-a-token-at-all-000000"}}), 401);
  EXPECT_EQ(status_of("/metrics", {{"Authorization", "Bearer " + admin}}), 200);
  // A browser sends the token as the password of Basic authentication.
  EXPECT_EQ(status_of("/", {httplib::make_basic_authentication_header("me", admin)}), 200);
  EXPECT_EQ(status_of("/api/status", {httplib::make_basic_authentication_header("me", "x")}), 401);
  // Probes carry no token.
  EXPECT_EQ(status_of("/healthz", {}), 200);
  EXPECT_EQ(status_of("/readyz", {}), 200);
  EXPECT_EQ(status_of("/metrics", {{"Authorization", "bearer " + admin}}), 200);  // any case
  // Refused calls are counted by reason; refused pages are not (a browser's first request always
  // is one).
  EXPECT_FALSE(cluster.NewClient("not-a-token-of-this-master-0000")->Stats().ok());
  const std::string scrape = [&] {
    httplib::Result r = client.Get("/metrics", {{"Authorization", "Bearer " + admin}});
    return r ? r->body : "";
  }();
  EXPECT_EQ(Sample(scrape, R"(taskmaster_auth_failures_total{reason="missing_token"})"), 0);
  EXPECT_EQ(Sample(scrape, R"(taskmaster_auth_failures_total{reason="role_denied"})"), 0);
  EXPECT_EQ(Sample(scrape, R"(taskmaster_auth_failures_total{reason="unknown_token"})"), 1);
}

// Lists the services through gRPC server reflection with Python's grpcio (raw bytes: a
// ServerReflectionRequest whose list_services, field 7, is empty), printing what came back or
// the status code.
CommandResult ListServices(const Cluster& cluster) {
  const std::string script = R"(
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
try:
    for reply in call(iter([b"\x3a\x00"]), timeout=10):
        sys.stdout.write(reply.decode("latin-1"))
        break
except grpc.RpcError as e:
    print(e.code().name)
)";
  // Debian's interpreter, which has python3-grpcio (another python3 may come first in PATH).
  return RunCommand({"/usr/bin/python3", "-c", script, cluster.address()}, "", seconds(30));
}

TEST(Observe, GrpcReflectionOnlyWhenAsked) {
  Cluster off;
  off.StartMaster();
  CommandResult refused = ListServices(off);
  ASSERT_EQ(refused.exit_code, 0) << refused.err;
  EXPECT_CONTAINS(refused.out, "UNIMPLEMENTED");

  Cluster on({"--grpc-reflection"});
  on.StartMaster();
  CommandResult listed = ListServices(on);
  ASSERT_EQ(listed.exit_code, 0) << listed.err;
  EXPECT_CONTAINS(listed.out, "taskmaster.v1.TaskQueue");
  EXPECT_CONTAINS(listed.out, "taskmaster.v1.WorkerService");
  EXPECT_CONTAINS(listed.out, "grpc.health.v1.Health");
}

TEST(Observe, WorkerAdminListenerStaysOnLoopbackUnlessTold) {
  Cluster cluster;
  cluster.StartMaster();
  Process& worker = cluster.StartWorker("w1", {"--admin-listen", "0.0.0.0:0"});
  ASSERT_TRUE(worker.Wait(seconds(20)).has_value());
  EXPECT_CONTAINS(worker.Log(), "--admin-allow-plaintext");
}

}  // namespace
}  // namespace taskmaster::testing
