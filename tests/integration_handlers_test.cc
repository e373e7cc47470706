// Users' own work end to end: a worker started from deploy/worker.example.toml runs its exec kinds
// and pools, --print-config, config errors at start, plugins, and pools keeping compute tasks
// clear of an I/O backlog.
#include <gtest/gtest.h>

#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/util.h"
#include "tests/integration_common.h"

namespace taskmaster::testing {
namespace {

const std::string kExampleConfig =
    std::string(TASKMASTER_SOURCE_DIR) + "/deploy/worker.example.toml";

// Runs `kind` on each payload in one job; the results by payload (output, or "error: ...").
std::map<std::string, std::string> RunJob(const Cluster& cluster, const std::string& kind,
                                          const std::vector<std::string>& payloads) {
  auto client = cluster.NewClient();
  std::map<uint64_t, std::string> payload_of;
  std::map<std::string, std::string> results;
  absl::StatusOr<v1::SubmitResponse> submitted = client->Submit(Batch(kind, payloads, 1));
  EXPECT_TRUE(submitted.ok()) << submitted.status();
  if (!submitted.ok()) return results;
  for (int i = 0; i < submitted->task_ids_size(); ++i) {
    payload_of[submitted->task_ids(i)] = payloads[i];
  }
  absl::Status watched = client->WatchJob(submitted->job_id(), [&](const v1::JobEvent& event) {
    for (const v1::TaskInfo& t : event.results()) {
      results[payload_of[t.id()]] =
          t.state() == v1::SUCCEEDED ? t.output() : absl::StrCat("error: ", t.error());
    }
  });
  EXPECT_TRUE(watched.ok()) << watched;
  return results;
}

std::vector<std::string> WorkerNames(const Cluster& cluster) {
  std::vector<std::string> names;
  auto workers = cluster.NewClient()->Workers();
  if (workers.ok()) {
    for (const auto& w : workers->workers()) names.push_back(w.name());
  }
  return names;
}

TEST(Handlers, ExampleConfigRunsItsExecKindsInItsPools) {
  Cluster cluster;
  cluster.StartMaster();
  cluster.StartWorker("ex", {"--config", kExampleConfig});
  // One stream per pool, each shown with its pool's name.
  ASSERT_TRUE(cluster.WaitForWorkers(2)) << cluster.worker(0).Log();
  const std::vector<std::string> names = WorkerNames(cluster);
  EXPECT_EQ(std::set<std::string>(names.begin(), names.end()),
            (std::set<std::string>{"ex/cpu", "ex/io"}));

  EXPECT_EQ(RunJob(cluster, "upper", {"hello"}).at("hello"), "HELLO");
  EXPECT_EQ(RunJob(cluster, "lines", {"a\nb\nc\n"}).at("a\nb\nc\n"), "3\n");
  EXPECT_EQ(RunJob(cluster, "sha256", {"abc"}).at("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  -\n");
  EXPECT_EQ(RunJob(cluster, "square", {"12"}).at("12"), "12*12=144");
  // A kind no config declares never runs: the submitter is told, and the task waits for a worker
  // that runs it.
  CommandResult missing = cluster.Taskctl({"submit", "--kind", "convert", "x"});
  EXPECT_EQ(missing.exit_code, 0) << missing.err;
  EXPECT_TRUE(absl::StrContains(missing.err, "no connected worker runs")) << missing.err;
  const std::vector<uint64_t> ids =
      SubmittedIds(cluster.Taskctl({"--format", "json", "submit", "--kind", "convert", "y"}));
  ASSERT_EQ(ids.size(), 1u);
  const std::string waiting = cluster.Taskctl({"status", std::to_string(ids[0])}).out;
  EXPECT_TRUE(absl::StrContains(waiting, "state:    PENDING")) << waiting;
  EXPECT_TRUE(absl::StrContains(waiting, "no connected worker runs")) << waiting;
  // Progress from the exec child's fd 3 reaches `taskctl status` while it runs.
  auto client = cluster.NewClient();
  absl::StatusOr<v1::SubmitResponse> slow = client->Submit(Batch("slow-count", {""}));
  ASSERT_TRUE(slow.ok()) << slow.status();
  const std::string id = std::to_string(slow->task_ids(0));
  std::string status;
  EXPECT_TRUE(WaitFor(
      [&] {
        status = cluster.Taskctl({"status", id}).out;
        return absl::StrContains(status, "progress: ");
      },
      std::chrono::seconds(10)))
      << status;
  EXPECT_TRUE(absl::StrContains(status, "/5 (")) << status;
  EXPECT_TRUE(absl::StrContains(status, "step ")) << status;
  EXPECT_TRUE(WaitFor(
      [&] {
        status = cluster.Taskctl({"status", slow->job_id()}).out;
        return absl::StrContains(status, "running:   task " + id + ": ");
      },
      std::chrono::seconds(10)))
      << status;
  // `taskctl wait` on a terminal (a pseudo-terminal here) shows a running task's progress.
  absl::StatusOr<v1::SubmitResponse> watched = client->Submit(Batch("slow-count", {""}));
  ASSERT_TRUE(watched.ok()) << watched.status();
  const std::string wait =
      absl::StrCat(Binary("taskctl"), " --master ", cluster.address(), " --token-file ",
                   cluster.dir().File("submit.token"), " wait ", watched->job_id());
  CommandResult on_terminal = RunCommand({"script", "-qec", wait, "/dev/null"});
  EXPECT_EQ(on_terminal.exit_code, 0) << on_terminal.out << on_terminal.err;
  EXPECT_TRUE(absl::StrContains(on_terminal.out, absl::StrCat("task ", watched->task_ids(0), ": ")))
      << on_terminal.out;
  EXPECT_TRUE(absl::StrContains(on_terminal.out, "/5 (")) << on_terminal.out;
  // A terminal sees control bytes escaped.
  EXPECT_EQ(cluster.Taskctl({"wait", slow->job_id()}).out, "done\\x0A\n");
}

TEST(Handlers, PrintConfigMergesFlagsAndMasksSecrets) {
  TempDir dir;
  const std::string config = dir.File("w.toml");
  WriteFile(config, R"(master = "127.0.0.1:1"
queues = ["a"]
[exec.x]
command = ["/bin/cat"]
env = { API_TOKEN = "hunter2", LANG = "C" }
)");
  CommandResult r =
      RunCommand({Binary("taskworker"), "--config", config, "--queues", "b,c", "--print-config"},
                 "", std::chrono::seconds(30), {"TASKMASTER_TOKEN=the-token-itself"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "queues = [ 'b', 'c' ]")) << r.out;
  // The environment overrides the file, and a flag both.
  CommandResult env = RunCommand({Binary("taskworker"), "--config", config, "--print-config"}, "",
                                 std::chrono::seconds(30), {"TASKMASTER_ADDR=127.0.0.1:3"});
  EXPECT_TRUE(absl::StrContains(env.out, "master = '127.0.0.1:3'")) << env.out;
  CommandResult flag = RunCommand(
      {Binary("taskworker"), "--config", config, "--master", "127.0.0.1:2", "--print-config"}, "",
      std::chrono::seconds(30), {"TASKMASTER_ADDR=127.0.0.1:3"});
  EXPECT_TRUE(absl::StrContains(flag.out, "master = '127.0.0.1:2'")) << flag.out;
  EXPECT_TRUE(absl::StrContains(flag.out, "queues = [ 'a' ]")) << "the file's, no flag given";
  EXPECT_TRUE(absl::StrContains(r.out, "master = '127.0.0.1:1'")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "API_TOKEN = '(secret)'")) << r.out;
  EXPECT_FALSE(absl::StrContains(r.out, "hunter2")) << r.out;
  EXPECT_FALSE(absl::StrContains(r.out, "the-token-itself")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "LANG = 'C'")) << r.out;
}

TEST(Handlers, BadConfigFailsAtStartNamingKeyAndLine) {
  TempDir dir;
  const std::string config = dir.File("w.toml");
  WriteFile(config, "master = \"127.0.0.1:1\"\n[exec.x]\ncommand = [\"/bin/cat\"]\nretries = 3\n");
  CommandResult r = RunCommand({Binary("taskworker"), "--config", config});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(r.err, config + ":4: unknown key 'exec.x.retries'")) << r.err;

  // A pool naming a kind the worker does not run.
  WriteFile(config, "master = \"127.0.0.1:1\"\n[pools.cpu]\nkinds = [\"nope\"]\n");
  r = RunCommand({Binary("taskworker"), "--config", config});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(r.err, "pool 'cpu' lists kind 'nope'")) << r.err;
}

TEST(Handlers, PluginAddsItsKindsAndBadOnesAreRefused) {
  // Built as the README says.
  TempDir dir;
  const std::string reverse = dir.File("libreverse.so");
  CommandResult built =
      RunCommand({"g++", "-std=c++20", "-shared", "-fPIC",
                  std::string(TASKMASTER_SOURCE_DIR) + "/examples/plugin/reverse.cc",
                  "-I" + std::string(TASKMASTER_SOURCE_DIR) + "/worker/sdk", "-o", reverse});
  ASSERT_EQ(built.exit_code, 0) << built.err;
  Cluster cluster;
  cluster.StartMaster();
  cluster.StartWorker("p", {"--plugin", reverse});
  ASSERT_TRUE(cluster.WaitForWorkers(1)) << cluster.worker(0).Log();
  EXPECT_EQ(RunJob(cluster, "reverse", {"stressed"}).at("stressed"), "desserts");

  auto refused = [&](const std::vector<std::string>& plugins, const std::string& why) {
    std::vector<std::string> argv = {Binary("taskworker"), "--master", cluster.address()};
    for (const std::string& plugin : plugins) argv.insert(argv.end(), {"--plugin", plugin});
    CommandResult r = RunCommand(argv);
    EXPECT_EQ(r.exit_code, 2) << plugins.back();
    EXPECT_TRUE(absl::StrContains(r.err, "plugin " + plugins.back() + ": ")) << r.err;
    EXPECT_TRUE(absl::StrContains(r.err, why)) << r.err;
  };
  refused({TEST_PLUGIN_BAD_ABI}, "built for plugin ABI 999");
  refused({TEST_PLUGIN_NO_ENTRY}, "no entry point 'taskmaster_plugin'");
  refused({reverse, reverse}, "kind 'reverse' is registered twice");
  refused({"/nonexistent/plugin.so"}, "No such file");
}

TEST(Handlers, AHandlerIgnoringItsDeadlineIsReportedTimedOutAndShownStuck) {
  Cluster cluster;
  cluster.StartMaster();
  cluster.StartWorker("s", {"--plugin", TEST_PLUGIN_STUBBORN, "--threads", "1"});
  ASSERT_TRUE(cluster.WaitForWorkers(1)) << cluster.worker(0).Log();
  auto client = cluster.NewClient();
  v1::SubmitRequest request = Batch("stubborn", {"6000"}, /*max_attempts=*/1);
  request.mutable_tasks(0)->set_timeout_ms(300);
  absl::StatusOr<v1::SubmitResponse> submitted = client->Submit(request);
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  // Reported at its deadline (and a grace), long before the handler returns.
  ASSERT_TRUE(WaitFor(
      [&] {
        auto task = client->GetTask(submitted->task_ids(0));
        return task.ok() && task->state() == v1::DEAD;
      },
      std::chrono::seconds(4)));
  EXPECT_TRUE(absl::StrContains(client->GetTask(submitted->task_ids(0))->error(),
                                "timed out after 300 ms"));
  // Its slot stays busy, and the workers list says why.
  auto stuck = [&] {
    auto workers = client->Workers();
    return workers.ok() && workers->workers_size() == 1 ? workers->workers(0).stuck() : -1;
  };
  EXPECT_TRUE(WaitFor([&] { return stuck() == 1; }, std::chrono::seconds(4)));
  EXPECT_TRUE(absl::StrContains(cluster.Taskctl({"workers"}).out, "STUCK"));
  EXPECT_TRUE(WaitFor([&] { return stuck() == 0; }, std::chrono::seconds(15)))
      << "the handler returned: its slot is free";
}

// Gone, or a zombie waiting for whoever reaps orphans here.
bool ProcessGone(pid_t pid) {
  const std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  const size_t paren = stat.rfind(')');
  return stat.empty() || (paren != std::string::npos && stat.substr(paren + 2, 1) == "Z");
}

TEST(Handlers, CancelOfARunningExecTaskKillsItsProcessGroup) {
  Cluster cluster;
  cluster.StartMaster();
  TempDir dir;
  const std::string pids = dir.File("pids");
  const std::string config = dir.File("w.toml");
  // The command and a child of its own, both waiting far longer than the test.
  WriteFile(config, absl::StrCat("[exec.long]\nshell = true\ncommand = \"echo $$ > ", pids,
                                 "; sleep 600 & echo $! >> ", pids, "; wait\"\n"));
  cluster.StartWorker("x", {"--config", config});
  ASSERT_TRUE(cluster.WaitForWorkers(1)) << cluster.worker(0).Log();
  const std::vector<uint64_t> ids =
      SubmittedIds(cluster.Taskctl({"--format", "json", "submit", "--kind", "long", "go"}));
  ASSERT_EQ(ids.size(), 1u);
  std::vector<pid_t> running;
  ASSERT_TRUE(WaitFor(
      [&] {
        running.clear();
        for (std::string_view line : SplitLines(ReadFile(pids))) {
          if (!line.empty()) running.push_back(std::stoi(std::string(line)));
        }
        return running.size() == 2;
      },
      std::chrono::seconds(10)));
  CommandResult cancelled = cluster.Taskctl({"cancel", std::to_string(ids[0])});
  EXPECT_EQ(cancelled.exit_code, 0) << cancelled.err;
  EXPECT_TRUE(WaitFor([&] { return ProcessGone(running[0]) && ProcessGone(running[1]); },
                      std::chrono::seconds(10)))
      << "the command and its child outlived the cancel";
  const std::string status = cluster.Taskctl({"status", std::to_string(ids[0])}).out;
  EXPECT_TRUE(absl::StrContains(status, "CANCELLED")) << status;
}

TEST(Handlers, PoolsKeepComputeTasksClearOfAnIoBacklog) {
  Cluster cluster;
  cluster.StartMaster();
  TempDir dir;
  const std::string config = dir.File("w.toml");
  WriteFile(config, R"([pools.cpu]
threads = 1
kinds = ["square"]
[pools.io]
threads = 4
)");
  cluster.StartWorker("pools", {"--config", config});
  ASSERT_TRUE(cluster.WaitForWorkers(2)) << cluster.worker(0).Log();
  auto client = cluster.NewClient();
  // 200 I/O tasks of a second on 4 threads (`sleep`, in the pool of every kind but `square`): 5 s
  // of backlog, queued ahead of the compute tasks.
  absl::StatusOr<v1::SubmitResponse> io =
      client->Submit(Batch("sleep", std::vector<std::string>(200, "1000")));
  ASSERT_TRUE(io.ok()) << io.status();
  std::vector<std::string> numbers;
  for (int i = 0; i < 20; ++i) numbers.push_back(std::to_string(i));
  const std::map<std::string, std::string> squares = RunJob(cluster, "square", numbers);
  ASSERT_EQ(squares.size(), 20u);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(squares.at(std::to_string(i)), Square(i));
  // The compute pool's own size explains its time: the I/O backlog was still there when every
  // compute task had finished.
  absl::StatusOr<v1::JobInfo> backlog = client->GetJob(io->job_id());
  ASSERT_TRUE(backlog.ok());
  EXPECT_LT(backlog->done(), 100) << "compute tasks waited behind the I/O backlog";
  client->CancelJob(io->job_id()).IgnoreError();
}

// The SDK as an outside project sees it: installed into a scratch prefix, found with
// find_package(taskmaster CONFIG), linked as taskmaster::worker.
TEST(Handlers, OutsideProjectBuildsAWorkerAgainstTheInstalledSdk) {
  TempDir dir;
  const std::string prefix = dir.File("prefix");
  CommandResult r = RunCommand(
      {"cmake", "--install", TASKMASTER_BINARY_DIR, "--component", "sdk", "--prefix", prefix});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const std::string build = dir.File("build");
  std::vector<std::string> configure = {"cmake",
                                        "-S",
                                        std::string(TASKMASTER_SOURCE_DIR) + "/examples/cpp-worker",
                                        "-B",
                                        build,
                                        "-DCMAKE_PREFIX_PATH=" + prefix,
                                        "-DCMAKE_BUILD_TYPE=Release"};
  if (std::string_view(TASKMASTER_SANITIZE) != "") {
    configure.push_back(absl::StrCat("-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=", TASKMASTER_SANITIZE));
  }
  r = RunCommand(configure);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  r = RunCommand({"cmake", "--build", build, "-j2"}, "", std::chrono::seconds(90));
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;

  Cluster cluster;
  cluster.StartMaster();
  // Plugins load into it as into taskworker.
  const std::string reverse = dir.File("libreverse.so");
  r = RunCommand({"g++", "-std=c++20", "-shared", "-fPIC",
                  std::string(TASKMASTER_SOURCE_DIR) + "/examples/plugin/reverse.cc",
                  "-I" + prefix + "/include", "-o", reverse});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  Process worker({build + "/wordcount-worker", "--master", cluster.address(), "--token-file",
                  cluster.dir().File("work.token"), "--name", "wc", "--plugin", reverse},
                 dir.File("wc.log"));
  ASSERT_TRUE(cluster.WaitForWorkers(1)) << worker.Log();
  const auto counted = RunJob(cluster, "wordcount", {"one two  three\nfour", ""});
  EXPECT_EQ(counted.at("one two  three\nfour"), "4");
  EXPECT_EQ(counted.at(""), "0");
  // The SDK's worker runs the built-ins beside its own kind, as taskworker does.
  EXPECT_EQ(RunJob(cluster, "square", {"3"}).at("3"), "3*3=9");
  EXPECT_EQ(RunJob(cluster, "reverse", {"abc"}).at("abc"), "cba");
}

}  // namespace
}  // namespace taskmaster::testing
