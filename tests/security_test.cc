// Tenants, token and certificate reloads, and per-token stream limits, against the real binaries.
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "client/client.h"
#include "common/grpc_util.h"
#include "tests/harness.h"

namespace taskmaster::testing {
namespace {

constexpr char kAcmeToken[] = "acme-submit-token-0123456789";
constexpr char kAcmeNewToken[] = "acme-rotated-token-0123456789";
constexpr char kBetaToken[] = "beta-submit-token-0123456789";

std::string TenantTokens(const std::string& extra = "") {
  return absl::StrCat("submit ", kAcmeToken, " acme\nsubmit ", kBetaToken, " beta\nwork ",
                      kWorkToken, "\nadmin ", kAdminToken, "\nsubmit ", kSubmitToken, "\n", extra);
}

// A client with `token`, over TLS trusting `ca_file` when one is given; null (and a failure
// recorded) when it cannot be made.
std::unique_ptr<Client> Connect(const Cluster& cluster, const std::string& token,
                                const std::string& ca_file = "") {
  ClientOptions options;
  options.master.address = cluster.address();
  options.master.tls_ca_file = ca_file;
  options.token = token;
  options.rpc_timeout = std::chrono::seconds(5);
  options.reconnect_timeout = std::chrono::seconds(5);
  auto client = Client::Connect(options);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

// What a fresh client with `token` (trusting `ca_file`) gets when it asks for the stats.
absl::Status StatsWith(const Cluster& cluster, const std::string& token,
                       const std::string& ca_file) {
  std::unique_ptr<Client> client = Connect(cluster, token, ca_file);
  if (!client) return absl::InternalError("no client");
  return client->Stats().status();
}

v1::SubmitRequest Squares(std::initializer_list<int> numbers, const std::string& key = "") {
  v1::SubmitRequest request;
  for (int n : numbers) {
    v1::TaskSpec* t = request.add_tasks();
    t->set_kind("square");
    t->set_payload(std::to_string(n));
    if (!key.empty()) t->set_idempotency_key(key + std::to_string(n));
  }
  return request;
}

void ReplaceTokens(Cluster& cluster, const std::string& text) {
  const std::string path = cluster.dir().File("tokens");
  WriteFile(path + ".new", text);
  std::filesystem::permissions(
      path + ".new", std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  std::filesystem::rename(path + ".new", path);
}

TEST(Security, TenantsSeeOnlyTheirOwnJobsOverTheWire) {
  Cluster cluster;
  WriteFile(cluster.dir().File("tokens"), TenantTokens("limit beta max-pending=2\n"));
  cluster.StartMaster();
  auto acme = Connect(cluster, kAcmeToken);
  auto beta = Connect(cluster, kBetaToken);
  auto admin = Connect(cluster, kAdminToken);
  ASSERT_TRUE(acme != nullptr && beta != nullptr && admin != nullptr);
  auto submitted = acme->Submit(Squares({3}, "nightly-"));
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  const std::string job = submitted->job_id();
  const uint64_t task = submitted->task_ids(0);

  auto expect_not_found = [](const absl::Status& status, const char* what) {
    EXPECT_TRUE(absl::IsNotFound(status)) << what << ": " << status;
  };
  expect_not_found(beta->GetJob(job).status(), "GetJob");
  expect_not_found(beta->GetTask(task).status(), "GetTask");
  expect_not_found(beta->CancelJob(job).status(), "Cancel job");
  expect_not_found(beta->CancelTask(task).status(), "Cancel task");
  expect_not_found(beta->WatchJob(job, [](const v1::JobEvent&) {}), "WatchJob");
  // The same key in another tenant is another task.
  auto beta_keyed = beta->Submit(Squares({3}, "nightly-"));
  ASSERT_TRUE(beta_keyed.ok()) << beta_keyed.status();
  EXPECT_NE(beta_keyed->task_ids(0), task);
  auto again = acme->Submit(Squares({3}, "nightly-"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->task_ids(0), task);

  EXPECT_TRUE(acme->GetTask(task).ok());
  auto seen_by_admin = admin->GetJob(job);
  ASSERT_TRUE(seen_by_admin.ok()) << seen_by_admin.status();
  EXPECT_EQ(seen_by_admin->total(), 1);

  // beta's limit line: two unfinished tasks at most (one is there already).
  auto over = beta->Submit(Squares({1, 2}));
  EXPECT_TRUE(absl::IsResourceExhausted(over.status())) << over.status();
  EXPECT_TRUE(absl::StrContains(over.status().message(), "tenant 'beta'")) << over.status();
  EXPECT_TRUE(acme->Submit(Squares({1, 2, 4, 5})).ok());  // acme has no such limit

  // A worker serves every tenant; each reads its own results.
  cluster.StartWorker("w");
  auto done = [](Client& client, const std::string& job_id) {
    auto info = client.GetJob(job_id);
    return info.ok() && info->done() == info->total();
  };
  ASSERT_TRUE(WaitFor([&] { return done(*acme, job) && done(*beta, beta_keyed->job_id()); },
                      std::chrono::seconds(20)));
  auto result = acme->GetTask(task);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->output(), "3*3=9");
}

TEST(Security, SighupReloadsTokensWithoutDroppingConnections) {
  Cluster cluster;
  WriteFile(cluster.dir().File("tokens"), TenantTokens());
  cluster.StartMaster();
  cluster.StartWorker("w");
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  auto old_client = Connect(cluster, kAcmeToken);
  ASSERT_NE(old_client, nullptr);
  auto submitted = old_client->Submit(Squares({6}));
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  // A job stream opened with the old token, on a task delayed long enough to outlast the reload.
  v1::SubmitRequest delayed;
  v1::TaskSpec* t = delayed.add_tasks();
  t->set_kind("square");
  t->set_payload("7");
  t->set_delay_ms(1500);
  std::atomic<int> results{0};
  std::atomic<bool> opened{false};
  std::thread watcher([&] {
    auto watched = old_client->SubmitAndWatch(delayed, [&](const v1::JobEvent& e) {
      opened = true;
      results += e.results_size();
    });
    EXPECT_TRUE(watched.ok()) << watched.status();
  });
  absl::Cleanup join_watcher = [&] {  // also when an assertion below returns early
    if (watcher.joinable()) watcher.join();
  };
  // The stream is open (its first event came, within a tick) before the token goes: a call that
  // reached the master only after the reload would rightly be refused.
  ASSERT_TRUE(WaitFor([&] { return opened.load(); }, std::chrono::seconds(10)));
  auto before = cluster.NewClient()->Workers();
  ASSERT_TRUE(before.ok()) << before.status();
  ASSERT_EQ(before->workers_size(), 1);
  const int64_t connected_ms = before->workers(0).connected_ms();

  // Rotation: the old token goes, a new one comes, for the same tenant.
  std::string rotated = TenantTokens();
  rotated.replace(rotated.find(kAcmeToken), strlen(kAcmeToken), kAcmeNewToken);
  ReplaceTokens(cluster, rotated);
  cluster.master().Signal(SIGHUP);
  auto new_client = Connect(cluster, kAcmeNewToken);
  ASSERT_NE(new_client, nullptr);
  ASSERT_TRUE(WaitFor([&] { return new_client->GetJob(submitted->job_id()).ok(); },
                      std::chrono::seconds(10)));
  EXPECT_TRUE(absl::IsUnauthenticated(old_client->GetJob(submitted->job_id()).status()));
  watcher.join();  // the stream opened before the reload got its result
  EXPECT_EQ(results.load(), 1);
  auto workers = cluster.NewClient()->Workers();
  ASSERT_TRUE(workers.ok());
  ASSERT_EQ(workers->workers_size(), 1);
  EXPECT_TRUE(workers->workers(0).connected());
  EXPECT_EQ(workers->workers(0).connected_ms(), connected_ms);  // never reconnected

  // A broken file is refused with a log line; the tokens in use stay.
  ReplaceTokens(cluster, "submit short\n");
  cluster.master().Signal(SIGHUP);
  ASSERT_TRUE(WaitFor([&] { return absl::StrContains(cluster.master().Log(), "kept the tokens"); },
                      std::chrono::seconds(10)));
  EXPECT_TRUE(new_client->GetJob(submitted->job_id()).ok());
  EXPECT_TRUE(cluster.master().Running());
}

// The harness's certificates, valid for two days.
void MakeCerts(const TempDir& dir) {
  CommandResult made = MakeCertificates(dir.path());
  ASSERT_EQ(made.exit_code, 0) << made.err;
}

// The exit code and stderr of a master started with `flags` and `env` (it is expected to refuse).
CommandResult StartRefused(const Cluster& cluster, const std::vector<std::string>& flags,
                           const std::vector<std::string>& env = {}) {
  std::vector<std::string> argv = cluster.MasterArgv();
  argv.insert(argv.end(), flags.begin(), flags.end());
  return RunCommand(argv, "", std::chrono::seconds(20), env);
}

TEST(Security, BadCertificatesAreRefusedAtStart) {
  TempDir certs;
  MakeCerts(certs);
  if (::testing::Test::HasFatalFailure()) return;
  Cluster cluster;
  const std::vector<std::string> tls = {"--tls-cert", certs.File("server.pem"), "--tls-key",
                                        certs.File("server.key")};
  // The certificates last two days: three days on, they have expired; a day back, they are not
  // valid yet (the fault shim moves the master's wall clock).
  for (const auto& [shift, expected] : {std::pair<const char*, const char*>{"259200", "expired on"},
                                        {"-86400", "not valid before"}}) {
    WriteFile(cluster.dir().File("clock"), shift);
    CommandResult r = StartRefused(cluster, tls, FaultShimEnv(cluster.dir().File("clock"), ""));
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_TRUE(absl::StrContains(r.err, expected)) << r.err;
    EXPECT_TRUE(absl::StrContains(r.err, "server.pem")) << r.err;
  }
  CommandResult mismatch = StartRefused(
      cluster, {"--tls-cert", certs.File("server.pem"), "--tls-key", certs.File("worker.key")});
  EXPECT_EQ(mismatch.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(mismatch.err, "does not belong to the certificate"))
      << mismatch.err;
  WriteFile(cluster.dir().File("garbage.pem"), "not a certificate\n");
  CommandResult garbage = StartRefused(cluster, {"--tls-cert", cluster.dir().File("garbage.pem"),
                                                 "--tls-key", certs.File("server.key")});
  EXPECT_EQ(garbage.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(garbage.err, "holds no PEM certificate")) << garbage.err;
}

TEST(Security, SighupReloadsTheCertificateWithoutDroppingConnections) {
  TempDir first, second, live;
  MakeCerts(first);
  MakeCerts(second);
  if (::testing::Test::HasFatalFailure()) return;
  // The master reads its certificate from `live`, where the test swaps files.
  WriteFile(live.File("server.pem"), ReadFile(first.File("server.pem")));
  WriteFile(live.File("server.key"), ReadFile(first.File("server.key")));
  Cluster tls_cluster(
      {"--tls-cert", live.File("server.pem"), "--tls-key", live.File("server.key")});
  tls_cluster.StartMaster();
  tls_cluster.StartWorker("w", {"--tls-ca", first.File("ca.pem")});
  auto trusts_first = Connect(tls_cluster, kSubmitToken, first.File("ca.pem"));
  ASSERT_NE(trusts_first, nullptr);
  absl::StatusOr<v1::WorkersResponse> workers;
  ASSERT_TRUE(WaitFor(
      [&] {
        workers = trusts_first->Workers();
        return workers.ok() && workers->workers_size() == 1 && workers->workers(0).connected();
      },
      std::chrono::seconds(20)));
  const int64_t connected_ms = workers->workers(0).connected_ms();

  // New certificate from another authority: files replaced, then SIGHUP.
  WriteFile(live.File("server.pem"), ReadFile(second.File("server.pem")));
  WriteFile(live.File("server.key"), ReadFile(second.File("server.key")));
  tls_cluster.master().Signal(SIGHUP);
  ASSERT_TRUE(
      WaitFor([&] { return StatsWith(tls_cluster, kSubmitToken, second.File("ca.pem")).ok(); },
              std::chrono::seconds(10)));
  // New connections get the new certificate; the worker's connection stayed and still works.
  EXPECT_FALSE(StatsWith(tls_cluster, kSubmitToken, first.File("ca.pem")).ok());
  auto trusts_second = Connect(tls_cluster, kSubmitToken, second.File("ca.pem"));
  ASSERT_NE(trusts_second, nullptr);
  std::string output;
  auto watched = trusts_second->SubmitAndWatch(Squares({8}), [&](const v1::JobEvent& e) {
    for (const auto& r : e.results()) output = r.output();
  });
  ASSERT_TRUE(watched.ok()) << watched.status();
  EXPECT_EQ(output, "8*8=64");
  workers = trusts_second->Workers();
  ASSERT_TRUE(workers.ok());
  EXPECT_EQ(workers->workers(0).connected_ms(), connected_ms);

  // A mismatched pair is refused with a log line; the certificate in use stays.
  WriteFile(live.File("server.key"), ReadFile(first.File("server.key")));
  tls_cluster.master().Signal(SIGHUP);
  ASSERT_TRUE(WaitFor(
      [&] { return absl::StrContains(tls_cluster.master().Log(), "kept the TLS certificate"); },
      std::chrono::seconds(10)));
  EXPECT_TRUE(StatsWith(tls_cluster, kSubmitToken, second.File("ca.pem")).ok());
}

TEST(Security, JobStreamsPerTokenAreCapped) {
  Cluster cluster({"--max-watches-per-token", "2"});
  cluster.StartMaster();
  auto client = cluster.NewClient();
  v1::SubmitRequest waiting = Squares({1});  // no worker: it never finishes
  auto submitted = client->Submit(waiting);
  ASSERT_TRUE(submitted.ok());
  ChannelOptions plain;
  plain.address = cluster.address();
  auto channel = MakeChannel(plain);
  ASSERT_TRUE(channel.ok());
  auto stub = v1::TaskQueue::NewStub(*channel);
  struct Watch {
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReader<v1::JobEvent>> reader;
    v1::JobEvent first;
  };
  auto open = [&](const std::string& token) {
    auto w = std::make_unique<Watch>();
    w->context.AddMetadata("authorization", "Bearer " + token);
    v1::WatchJobRequest request;
    request.set_job_id(submitted->job_id());
    w->reader = stub->WatchJob(&w->context, request);
    return w;
  };
  std::vector<std::unique_ptr<Watch>> open_streams;
  for (int i = 0; i < 2; ++i) {
    open_streams.push_back(open(kSubmitToken));
    ASSERT_TRUE(open_streams.back()->reader->Read(&open_streams.back()->first));  // progress
  }
  auto refused = open(kSubmitToken);
  EXPECT_FALSE(refused->reader->Read(&refused->first));
  grpc::Status status = refused->reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_TRUE(absl::StrContains(status.error_message(), "--max-watches-per-token"));
  // Another token has its own quota; a closed stream gives its place back.
  auto admin_watch = open(kAdminToken);
  EXPECT_TRUE(admin_watch->reader->Read(&admin_watch->first));
  open_streams[0]->context.TryCancel();
  open_streams[0]->reader->Finish();
  ASSERT_TRUE(WaitFor(
      [&] {
        auto again = open(kSubmitToken);
        if (!again->reader->Read(&again->first)) return false;
        open_streams.push_back(std::move(again));
        return true;
      },
      std::chrono::seconds(10)));
  for (auto& w : open_streams) w->context.TryCancel();
  admin_watch->context.TryCancel();
}

}  // namespace
}  // namespace taskmaster::testing
