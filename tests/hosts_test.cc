// Many hosts: a master and two workers, each on a host of its own (network namespaces joined by a
// bridge, addresses in 198.18.0.0/15), over TLS with certificates made for the master's address,
// as the README's "Launch workers on other hosts" runs them. One worker's link is cut for longer
// than the lease while both run a job of 2,000 tasks.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "tests/fault_time_common.h"
#include "tests/harness.h"
#include "tests/netns.h"

namespace taskmaster::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using std::chrono::steady_clock;

constexpr int kLeaseMs = 2'000;
constexpr int kHeartbeatMs = 200;

// A master on host "master", workers on the others, and taskctl on the master's host; all of them
// reach the master at its 198.18 address, over TLS, with tokens from files.
class HostCluster {
 public:
  explicit HostCluster(const NetworkNamespaces& net)
      : net_(net), address_(net.Address("master") + ":7070") {
    WriteTokenFiles(dir_);
  }

  // Certificates for the master's address, then the master; true once it listens.
  ::testing::AssertionResult StartMaster() {
    CommandResult certs = MakeCertificates(dir_.File("certs"), {net_.Address("master")});
    if (certs.exit_code != 0) return ::testing::AssertionFailure() << "make-certs: " << certs.err;
    master_ = std::make_unique<Process>(
        net_.In("master",
                {Binary("taskmaster"), "--listen", address_, "--tokens", dir_.File("tokens"),
                 "--tls-cert", dir_.File("certs/server.pem"), "--tls-key",
                 dir_.File("certs/server.key"), "--data-dir", dir_.File("data"), "--port-file",
                 dir_.File("port"), "--lease-timeout-ms", std::to_string(kLeaseMs),
                 "--heartbeat-ms", std::to_string(kHeartbeatMs), "--tick-ms", "50"}),
        dir_.File("master.log"));
    if (!WaitFor([&] { return std::filesystem::exists(dir_.File("port")) || !master_->Running(); },
                 seconds(20)) ||
        !std::filesystem::exists(dir_.File("port"))) {
      return ::testing::AssertionFailure() << "the master did not start: " << master_->Log();
    }
    return ::testing::AssertionSuccess();
  }

  // Worker "worker-HOST" on `host`, with a fixed prefetch: it holds tasks beyond the ones it
  // runs, so a cut finds tasks on it, not only on the way to it. Its debug log names every task
  // it ran, with its outcome.
  Process& StartWorker(const std::string& host) {
    workers_.push_back(std::make_unique<Process>(
        net_.In(host,
                {Binary("taskworker"), "--master", address_, "--tls-ca", dir_.File("certs/ca.pem"),
                 "--token-file", dir_.File("work.token"), "--name", "worker-" + host, "--threads",
                 "8", "--prefetch", "8", "--reconnect-max-ms", "500", "--log-level", "debug"}),
        dir_.File("worker-" + host + ".log")));
    return *workers_.back();
  }

  // taskctl --format json on the master's host; each line of its output parsed (discarded ones
  // that do not parse), or nothing when it failed.
  std::vector<nlohmann::json> Taskctl(std::vector<std::string> args, const std::string& input = "",
                                      milliseconds timeout = seconds(20)) const {
    std::vector<std::string> argv = {Binary("taskctl"),
                                     "--master",
                                     address_,
                                     "--tls-ca",
                                     dir_.File("certs/ca.pem"),
                                     "--token-file",
                                     dir_.File("submit.token"),
                                     "--format",
                                     "json"};
    argv.insert(argv.end(), args.begin(), args.end());
    CommandResult r = RunCommand(net_.In("master", argv), input, timeout);
    std::vector<nlohmann::json> lines;
    if (r.exit_code != 0) {
      std::cerr << "taskctl " << args[0] << ": exit " << r.exit_code << ": " << r.err;
      return lines;
    }
    std::istringstream out(r.out);
    for (std::string line; std::getline(out, line);) {
      nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!j.is_discarded()) lines.push_back(std::move(j));
    }
    return lines;
  }

  nlohmann::json TaskctlOne(std::vector<std::string> args, const std::string& input = "") const {
    std::vector<nlohmann::json> lines = Taskctl(std::move(args), input);
    return lines.empty() ? nlohmann::json() : lines.front();
  }

  // The master's entry for a worker, null when it lists none by that name.
  nlohmann::json WorkerEntry(const std::string& name) const {
    nlohmann::json list = TaskctlOne({"workers"});
    if (!list.is_array()) return nlohmann::json();
    for (const nlohmann::json& w : list) {
      if (w["name"] == name) return w;
    }
    return nlohmann::json();
  }

  int64_t JobDone(const std::string& job) const {
    nlohmann::json j = TaskctlOne({"status", job});
    return j.is_object() ? j["done"].get<int64_t>() : -1;
  }

  Process& master() { return *master_; }

  // The end of every log, for failure messages.
  std::string Logs() const {
    std::string out;
    for (const auto& entry : std::filesystem::directory_iterator(dir_.path())) {
      if (entry.path().extension() != ".log") continue;
      const std::string log = ReadFile(entry.path());
      absl::StrAppend(&out, "---- ", entry.path().filename().string(), " (end)\n",
                      log.substr(log.size() > 3000 ? log.size() - 3000 : 0));
    }
    return out;
  }

 private:
  const NetworkNamespaces& net_;
  const std::string address_;
  TempDir dir_;
  std::unique_ptr<Process> master_;
  std::vector<std::unique_ptr<Process>> workers_;
};

// What the master logged of each hello from worker `name`: the results and tasks it claimed
// that the master revoked (already recorded or given to another worker) as it attached.
std::vector<int> RevokedAtAttach(const std::string& master_log, const std::string& name) {
  std::vector<int> revoked;
  const std::regex attached("worker " + name + R"( \([^)]*\) attached: [^\n]*, (\d+) revoked)");
  for (auto it = std::sregex_iterator(master_log.begin(), master_log.end(), attached);
       it != std::sregex_iterator(); ++it) {
    revoked.push_back(std::stoi((*it)[1]));
  }
  return revoked;
}

// A job of `sleep` tasks: the milliseconds each sleeps, its id and its tasks' ids, in order.
struct SleepJob {
  std::vector<int> ms;
  std::string id;
  std::vector<uint64_t> task_ids;
};

// Submits the job in one call, so that the answer lists every task id.
SleepJob SubmitSleeps(const HostCluster& cluster, std::vector<int> ms) {
  SleepJob job{std::move(ms), "", {}};
  std::string input;
  for (int m : job.ms) absl::StrAppend(&input, m, "\n");
  nlohmann::json r = cluster.TaskctlOne(
      {"submit", "--kind", "sleep", "--max-attempts", "3", "--batch-wait-ms", "60000"}, input);
  if (r.is_object() && r.contains("task_ids")) {
    job.id = r["job_id"].get<std::string>();
    job.task_ids = r["task_ids"].get<std::vector<uint64_t>>();
  }
  return job;
}

// Each task's one result (by `taskctl wait`), checked: SUCCEEDED with what its sleep says; a
// second result for a task, or none, fails the test.
std::map<uint64_t, nlohmann::json> CheckResults(const HostCluster& cluster, const SleepJob& job) {
  std::map<uint64_t, nlohmann::json> by_id;
  for (nlohmann::json& r : cluster.Taskctl({"wait", job.id}, "", seconds(60))) {
    const uint64_t id = r["id"].get<uint64_t>();
    EXPECT_TRUE(by_id.emplace(id, std::move(r)).second) << "a second result for task " << id;
  }
  for (size_t i = 0; i < job.task_ids.size(); ++i) {
    auto it = by_id.find(job.task_ids[i]);
    if (it == by_id.end()) {
      ADD_FAILURE() << "no result for task " << job.task_ids[i];
      continue;
    }
    EXPECT_EQ(it->second["state"], "SUCCEEDED") << it->second;
    EXPECT_EQ(it->second["output"], absl::StrCat("slept ", job.ms[i], " ms")) << it->second;
  }
  EXPECT_EQ(by_id.size(), job.task_ids.size()) << "results of tasks not in " << job.id;
  return by_id;
}

// A worker's link is cut for longer than the lease while it holds tasks: the master hands them to
// the other worker, which finishes the job while the link is down; when the link returns the cut
// worker attaches again, the results it made in the meantime are refused as stale (the master
// revokes them in its welcome), and it runs tasks again. Every task has exactly one result.
TEST(Hosts, WorkerCutOffPastItsLeaseLosesItsTasksToAnotherHostAndRejoins) {
  NetworkNamespaces net({"master", "a", "b"}, "198.18.0.");
  if (!net.skip().empty()) GTEST_SKIP() << net.skip();
  HostCluster cluster(net);
  ASSERT_TRUE(cluster.StartMaster());
  Process& a = cluster.StartWorker("a");
  Process& b = cluster.StartWorker("b");
  auto connected = [&](const std::string& name) {
    nlohmann::json w = cluster.WorkerEntry(name);
    return w.is_object() && w["connected"].get<bool>();
  };
  ASSERT_TRUE(WaitFor([&] { return connected("worker-a") && connected("worker-b"); }, seconds(30),
                      milliseconds(100)))
      << cluster.Logs();
  EXPECT_NE(cluster.master().Log().find(", TLS, "), std::string::npos) << cluster.master().Log();

  // 10 to 30 ms each: about 2.5 s of work for the two workers, 5 s for one. Long enough that
  // the worker holds each batch of tasks a while after it arrived.
  constexpr int kTasks = 2'000;
  std::vector<int> sleep_ms;
  for (int i = 0; i < kTasks; ++i) sleep_ms.push_back(10 + i % 21);
  const SleepJob job = SubmitSleeps(cluster, sleep_ms);
  ASSERT_EQ(job.task_ids.size(), static_cast<size_t>(kTasks)) << cluster.Logs();

  // Cut b off while both hold tasks and most of the job is still to run.
  ASSERT_TRUE(WaitFor(
      [&] {
        nlohmann::json wa = cluster.WorkerEntry("worker-a"), wb = cluster.WorkerEntry("worker-b");
        return wa.is_object() && wb.is_object() && wa["running"].get<int>() > 0 &&
               wb["running"].get<int>() > 0;
      },
      seconds(20), milliseconds(10)))
      << cluster.Logs();
  const auto cut_at = steady_clock::now();
  ASSERT_TRUE(net.Cut("b", "master", true));
  const int64_t done_at_cut = cluster.JobDone(job.id);
  // a finishes the job alone: b's tasks too, once their leases lapse (they go to the back of the
  // queue, so only the job's end shows they are done).
  const bool finished =
      WaitFor([&] { return cluster.JobDone(job.id) == kTasks; }, seconds(60), milliseconds(100));
  // Longer than the lease in any case (a job done that soon would be a failure of its own).
  std::this_thread::sleep_until(cut_at + milliseconds(kLeaseMs * 3 / 2));
  const size_t attaches_before = RevokedAtAttach(cluster.master().Log(), "worker-b").size();
  ASSERT_TRUE(net.Cut("b", "master", false));
  const auto cut_ms =
      std::chrono::duration_cast<milliseconds>(steady_clock::now() - cut_at).count();
  ASSERT_TRUE(finished) << "done " << cluster.JobDone(job.id) << " of " << kTasks << "\n"
                        << cluster.Logs();
  EXPECT_NE(cluster.master().Log().find("no heartbeat from worker worker-b"), std::string::npos)
      << "the master expired b's leases\n"
      << cluster.master().Log();

  // b rejoins: it attaches again (the master's log says so; `taskctl workers` listed it as
  // connected all along, since nothing told the master the link was down but the missing
  // heartbeats), and is listed as connected.
  ASSERT_TRUE(WaitFor(
      [&] {
        return RevokedAtAttach(cluster.master().Log(), "worker-b").size() > attaches_before &&
               connected("worker-b");
      },
      seconds(30), milliseconds(100)))
      << cluster.Logs();
  const std::vector<int> revoked = RevokedAtAttach(cluster.master().Log(), "worker-b");
  int64_t late_results_revoked = 0;
  for (size_t i = attaches_before; i < revoked.size(); ++i) late_results_revoked += revoked[i];

  // ... and runs tasks again: a short job after the rejoin, spread over both workers' idle slots.
  const SleepJob after = SubmitSleeps(cluster, std::vector<int>(16, 50));
  ASSERT_EQ(after.task_ids.size(), 16u);

  // Every task has exactly one recorded result, the right one. b's tasks ran again on a (attempt
  // 2) and were recorded from there; those b had run to the end while cut off are its late
  // results, dropped: refused as stale when it attached again (or counted as duplicates, had
  // they come on the old connection).
  const std::map<uint64_t, nlohmann::json> results = CheckResults(cluster, job);
  const std::map<uint64_t, nlohmann::json> after_results = CheckResults(cluster, after);
  const std::map<uint64_t, int> runs_on_b = Executions({b.Log()});
  const int extra_executions = ExtraExecutions(Executions({a.Log(), b.Log()}));
  int extra_attempts = 0, retried = 0, late = 0, after_on_b = 0;
  for (const auto& [id, r] : results) {
    const int attempts = r["attempts"].get<int>();
    extra_attempts += attempts - 1;
    if (attempts == 1) continue;
    ++retried;
    EXPECT_EQ(attempts, 2) << r;
    EXPECT_EQ(r["worker"], "worker-a") << r;
    late += runs_on_b.contains(id) ? 1 : 0;
  }
  for (const auto& [id, r] : after_results) {
    extra_attempts += r["attempts"].get<int>() - 1;
    after_on_b += r["worker"] == "worker-b" ? 1 : 0;
  }
  const nlohmann::json stats = cluster.TaskctlOne({"stats"});
  const int64_t duplicates = stats.is_object() ? stats["duplicate_results"].get<int64_t>() : -1;
  const size_t acknowledged = job.task_ids.size() + after.task_ids.size();
  const size_t recorded = results.size() + after_results.size();
  std::cout << "FIGURES many hosts (3 network namespaces, TLS, lease " << kLeaseMs
            << " ms): tasks=" << kTasks << "+" << after.task_ids.size()
            << " acknowledged=" << acknowledged << " recorded=" << recorded
            << " lost=" << acknowledged - std::min(acknowledged, recorded)
            << " extra_attempts=" << extra_attempts << " extra_executions=" << extra_executions
            << " cut_ms=" << cut_ms << " done_at_cut=" << done_at_cut << " late_results=" << late
            << " revoked_at_rejoin=" << late_results_revoked << " duplicate_results=" << duplicates
            << " after_rejoin_on_b=" << after_on_b << std::endl;
  EXPECT_GT(cut_ms, kLeaseMs);
  EXPECT_GT(retried, 0) << "b held tasks when it was cut off: a ran them again";
  EXPECT_GT(late, 0) << "b ran some of its tasks to the end while cut off";
  EXPECT_EQ(extra_executions, late) << "only those ran twice";
  EXPECT_GE(late_results_revoked + duplicates, late) << "b's late results were all refused\n"
                                                     << cluster.master().Log();
  EXPECT_GT(after_on_b, 0) << "b runs tasks again after it rejoined";
}

}  // namespace
}  // namespace taskmaster::testing
