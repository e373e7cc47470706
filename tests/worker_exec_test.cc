// Unit tests of exec handlers with real processes: /bin/sh, /bin/cat and small scripts in a
// directory of each test's own. Every wait is bounded; a process a test looks for is found through
// /proc (a zombie counts as gone: PID 1 here need not reap the orphans it inherits).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/util.h"
#include "tests/expect.h"
#include "worker/exec.h"
#include "worker/pool.h"

namespace taskmaster {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

// Longest real time anything may take before the test calls it a hang.
constexpr auto kBound = seconds(10);
// How soon a handler must return once its process group was told to stop (SIGTERM works at once
// in these tests), or once the command's first process exited.
constexpr auto kPrompt = seconds(3);

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void WriteFile(const fs::path& path, std::string_view data, fs::perms perms = fs::perms(0644)) {
  std::ofstream(path, std::ios::binary) << data;
  fs::permissions(path, perms);
}

// Waits (bounded) until a script has written `path` with a whole line.
std::string WaitForLine(const fs::path& path) {
  const auto until = Clock::now() + kBound;
  while (Clock::now() < until) {
    std::string text = ReadFile(path);
    if (!text.empty() && text.back() == '\n') return std::string(Trim(text));
    std::this_thread::sleep_for(milliseconds(5));
  }
  ADD_FAILURE() << path << " was not written within the bound";
  return "";
}

pid_t ReadPid(const fs::path& path) { return static_cast<pid_t>(std::stol(WaitForLine(path))); }

// A process's state letter and process group from /proc, or nullopt when it does not exist.
std::optional<std::pair<char, pid_t>> StateAndGroup(pid_t pid) {
  const std::string stat = ReadFile(fs::path("/proc") / std::to_string(pid) / "stat");
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return std::nullopt;
  std::istringstream fields(stat.substr(paren + 1));
  char state = 0;
  pid_t ppid = 0, pgrp = 0;
  fields >> state >> ppid >> pgrp;
  return std::make_pair(state, pgrp);
}

bool Alive(pid_t pid) {
  const auto s = StateAndGroup(pid);
  return s && s->first != 'Z' && s->first != 'X';
}

std::vector<pid_t> LiveMembers(pid_t pgid) {
  std::vector<pid_t> live;
  for (const fs::directory_entry& entry : fs::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name));
    const auto s = StateAndGroup(pid);
    if (s && s->second == pgid && s->first != 'Z' && s->first != 'X') live.push_back(pid);
  }
  return live;
}

// True once no live process is in group `pgid` and `pid` (if given) is gone. Processes killed
// with SIGKILL finish dying on their own time: bounded wait.
bool AllGone(pid_t pgid, pid_t pid = 0) {
  const auto until = Clock::now() + kBound;
  while (Clock::now() < until) {
    if (LiveMembers(pgid).empty() && (pid == 0 || !Alive(pid))) return true;
    std::this_thread::sleep_for(milliseconds(5));
  }
  return false;
}

std::set<std::string> OpenFds() {
  std::set<std::string> fds;
  for (const fs::directory_entry& entry : fs::directory_iterator("/proc/self/fd")) {
    fds.insert(entry.path().filename());
  }
  return fds;
}

ExecSpec Shell(std::string script) {
  ExecSpec spec;
  spec.argv = {std::move(script)};
  spec.shell = true;
  return spec;
}

std::string Bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

class ExecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string path = (fs::temp_directory_path() / "tm-exec-XXXXXX").string();
    ASSERT_NE(mkdtemp(path.data()), nullptr) << path;
    dir_ = path;
    fds_before_ = OpenFds();
  }

  void TearDown() override {
    fs::remove_all(dir_);
    // Every run closed what it opened and reaped what it started.
    EXPECT_EQ(OpenFds(), fds_before_);
    errno = 0;
    EXPECT_EQ(waitpid(-1, nullptr, WNOHANG), -1);
    EXPECT_EQ(errno, ECHILD);
  }

  Handler Make(ExecSpec spec) {
    absl::StatusOr<Handler> handler = MakeExecHandler("k", std::move(spec));
    EXPECT_TRUE(handler.ok()) << handler.status();
    if (!handler.ok()) return [](const TaskContext&) { return absl::InternalError("no handler"); };
    return *std::move(handler);
  }

  absl::StatusOr<std::string> Call(const ExecSpec& spec, std::string_view payload = "",
                                   ProgressSink sink = nullptr) {
    return Call(Make(spec), payload, cancelled_, std::move(sink));
  }

  static absl::StatusOr<std::string> Call(
      const Handler& handler, std::string_view payload,
      std::shared_ptr<std::atomic<bool>> cancelled = std::make_shared<std::atomic<bool>>(false),
      ProgressSink sink = nullptr, Clock::time_point deadline = Clock::time_point::max()) {
    TaskContext ctx(1, 1, payload, deadline, std::move(cancelled), std::move(sink));
    return handler(ctx);
  }

  // Runs kind "k" through RunTask, the way a pool does.
  static worker::Result Run(const Handler& handler, std::string payload, int64_t timeout_ms,
                            std::shared_ptr<std::atomic<bool>> cancelled) {
    Registry registry;
    EXPECT_TRUE(registry.Register("k", handler).ok());
    worker::Task task{.task_id = 7,
                      .attempt = 1,
                      .kind = "k",
                      .payload = std::move(payload),
                      .timeout_ms = timeout_ms};
    return worker::RunTask(registry, {.worker_name = "w", .max_output = 64 << 20}, task, cancelled);
  }

  fs::path dir_;
  std::set<std::string> fds_before_;
  std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);
};

TEST_F(ExecTest, CatEchoesEveryByteValue) {
  std::string payload;
  for (int round = 0; round < 4; ++round) {
    for (int b = 0; b < 256; ++b) payload += static_cast<char>(b);
  }
  ExecSpec spec;
  spec.argv = {"/bin/cat"};
  absl::StatusOr<std::string> out = Call(spec, payload);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, payload);
}

TEST_F(ExecTest, CatEchoesMultiMebibytePayload) {
  const std::string payload = Bytes(9 << 20, 1);
  ExecSpec spec;
  spec.argv = {"/bin/cat"};
  absl::StatusOr<std::string> out = Call(spec, payload);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(*out == payload) << "output of " << out->size() << " bytes differs";
}

TEST_F(ExecTest, EmptyPayloadAndEmptyOutput) {
  absl::StatusOr<std::string> out = Call(Shell("cat >/dev/null; exit 0"));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "");
}

TEST_F(ExecTest, CommandThatIgnoresStdinGetsBigPayloadWithoutSigpipeHere) {
  // SIGPIPE keeps its default action in this test: an EPIPE raised here would end the test binary.
  ASSERT_EQ(signal(SIGPIPE, SIG_DFL), SIG_DFL);
  // The command closes its stdin and then stays (reading nothing) well past the moment the pipe
  // reports its reader gone: the handler's writes meet EPIPE before it sees the exit, not after.
  absl::StatusOr<std::string> out =
      Call(Shell("exec 0<&-; echo closed; sleep 0.5"), Bytes(4 << 20, 2));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "closed\n");
  sigset_t pending;
  ASSERT_EQ(sigpending(&pending), 0);
  EXPECT_FALSE(sigismember(&pending, SIGPIPE));
}

TEST_F(ExecTest, BinaryStdoutAndStderrThatAreNotUtf8) {
  const std::string bytes = std::string("\xff\xfe\x00\x80ok\xc3(\xe2\x82", 11) + "tail\n";
  WriteFile(dir_ / "bin", bytes);
  absl::StatusOr<std::string> out = Call(Shell(absl::StrCat("cat ", (dir_ / "bin").string())));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, bytes);

  absl::StatusOr<std::string> failed = Call(Shell("cat >&2; exit 4"), bytes);
  ASSERT_FALSE(failed.ok());
  const std::string message(failed.status().message());
  EXPECT_TRUE(IsValidUtf8(message)) << Printable(message);
  EXPECT_CONTAINS(message, "exit code 4");
  EXPECT_CONTAINS(message, "tail");

  const worker::Result r = Run(Make(Shell("cat >&2; exit 4")), bytes, 0, cancelled_);
  EXPECT_EQ(r.outcome, worker::Outcome::kFailed);
  EXPECT_TRUE(IsValidUtf8(r.error));
  EXPECT_FALSE(r.permanent);
}

TEST_F(ExecTest, NonZeroExitIsAFailureWithStderrTail) {
  absl::StatusOr<std::string> out = Call(Shell("echo partial; echo 'it broke' >&2; exit 3"));
  ASSERT_FALSE(out.ok());
  EXPECT_FALSE(absl::IsInvalidArgument(out.status())) << out.status();
  EXPECT_EQ(out.status().message(), "kind 'k': exit code 3; stderr: it broke");
}

TEST_F(ExecTest, StderrTailKeepsTheEndWithinTheErrorSize) {
  ExecSpec spec = Shell("head -c 100000 /dev/zero | tr '\\0' a >&2; echo ' THE END' >&2; exit 1");
  spec.stderr_tail = kMaxExecStderrTail;
  absl::StatusOr<std::string> out = Call(spec);
  ASSERT_FALSE(out.ok());
  const std::string message(out.status().message());
  EXPECT_LE(message.size(), kMaxErrorBytes);
  EXPECT_TRUE(absl::EndsWith(message, "aaa THE END")) << message.substr(message.size() - 40);
  EXPECT_CONTAINS(message, "exit code 1; stderr: ...aaa");

  spec.stderr_tail = 4;
  out = Call(spec);
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().message(), "kind 'k': exit code 1; stderr: ...END");
}

TEST_F(ExecTest, PermanentExitCodeIsInvalidArgument) {
  ExecSpec spec = Shell("echo 'bad input' >&2; exit 65");
  spec.permanent_exit_codes = {65, 66};
  absl::StatusOr<std::string> out = Call(spec);
  EXPECT_TRUE(absl::IsInvalidArgument(out.status())) << out.status();
  EXPECT_CONTAINS(out.status().message(), "exit code 65");

  const worker::Result r = Run(Make(spec), "", 0, cancelled_);
  EXPECT_EQ(r.outcome, worker::Outcome::kFailed);
  EXPECT_TRUE(r.permanent);

  spec.argv = {"exit 67"};
  out = Call(spec);
  EXPECT_FALSE(out.ok());
  EXPECT_FALSE(absl::IsInvalidArgument(out.status())) << out.status();
}

TEST_F(ExecTest, KilledBySignalNamesIt) {
  absl::StatusOr<std::string> out = Call(Shell("echo dying >&2; kill -KILL $$"));
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().message(), "kind 'k': killed by signal 9 (SIGKILL); stderr: dying");

  out = Call(Shell("kill -SEGV $$"));
  ASSERT_FALSE(out.ok());
  EXPECT_CONTAINS(out.status().message(), "killed by signal 11 (SIGSEGV)");
}

TEST_F(ExecTest, DeadlineKillsTheWholeGroup) {
  const std::string script =
      absl::StrCat("echo $$ > ", (dir_ / "pgid").string(), "; sleep 1000 & echo $! > ",
                   (dir_ / "grandchild").string(), "; sleep 1000");
  const auto start = Clock::now();
  const worker::Result r = Run(Make(Shell(script)), "", 1'000, cancelled_);
  const auto took = Clock::now() - start;
  EXPECT_EQ(r.outcome, worker::Outcome::kFailed);
  EXPECT_CONTAINS(r.error, "timed out after 1000 ms");
  EXPECT_GE(took, milliseconds(1'000));
  EXPECT_LT(took, milliseconds(1'000) + kPrompt);
  const pid_t pgid = ReadPid(dir_ / "pgid");
  const pid_t grandchild = ReadPid(dir_ / "grandchild");
  EXPECT_TRUE(AllGone(pgid, grandchild));

  // Direct: the handler says why it stopped.
  absl::StatusOr<std::string> out =
      Call(Make(Shell("sleep 1000")), "", cancelled_, nullptr, Clock::now() + milliseconds(200));
  EXPECT_TRUE(absl::IsDeadlineExceeded(out.status())) << out.status();
  EXPECT_CONTAINS(out.status().message(), "past its deadline, killed by signal 15 (SIGTERM)");
}

TEST_F(ExecTest, CancelStopsARunningTaskPromptly) {
  const std::string script = absl::StrCat("sleep 1000 & echo $! > ", (dir_ / "grandchild").string(),
                                          "; echo $$ > ", (dir_ / "pgid").string(), "; sleep 1000");
  const Handler handler = Make(Shell(script));
  auto running = std::async(std::launch::async, [&] { return Run(handler, "", 0, cancelled_); });
  const pid_t pgid = ReadPid(dir_ / "pgid");
  const pid_t grandchild = ReadPid(dir_ / "grandchild");
  ASSERT_TRUE(Alive(grandchild));
  const auto cancelled_at = Clock::now();
  cancelled_->store(true);
  ASSERT_EQ(running.wait_for(kBound), std::future_status::ready);
  EXPECT_LT(Clock::now() - cancelled_at, kPrompt);
  const worker::Result r = running.get();
  EXPECT_EQ(r.outcome, worker::Outcome::kCancelled);
  EXPECT_TRUE(AllGone(pgid, grandchild));
}

TEST_F(ExecTest, AlreadyStoppedTaskDoesNotStart) {
  cancelled_->store(true);
  absl::StatusOr<std::string> out = Call(Shell(absl::StrCat("touch ", (dir_ / "ran").string())));
  EXPECT_TRUE(absl::IsCancelled(out.status())) << out.status();
  EXPECT_FALSE(fs::exists(dir_ / "ran"));
}

TEST_F(ExecTest, SigtermIgnoredMeansSigkillAfterGrace) {
  ExecSpec spec =
      Shell(absl::StrCat("trap '' TERM; echo $$ > ", (dir_ / "pgid").string(), "; sleep 1000"));
  spec.kill_grace = milliseconds(300);
  const Handler handler = Make(spec);
  auto running = std::async(std::launch::async, [&] { return Call(handler, "", cancelled_); });
  const pid_t pgid = ReadPid(dir_ / "pgid");
  const auto cancelled_at = Clock::now();
  cancelled_->store(true);
  ASSERT_EQ(running.wait_for(kBound), std::future_status::ready);
  const auto took = Clock::now() - cancelled_at;
  EXPECT_GE(took, milliseconds(300));
  EXPECT_LT(took, milliseconds(300) + kPrompt);
  absl::StatusOr<std::string> out = running.get();
  EXPECT_TRUE(absl::IsCancelled(out.status())) << out.status();
  EXPECT_CONTAINS(out.status().message(), "cancelled, killed by signal 9 (SIGKILL)");
  EXPECT_TRUE(AllGone(pgid));
}

TEST_F(ExecTest, LeaderExitKillsABackgroundProcessHoldingStdout) {
  const auto start = Clock::now();
  absl::StatusOr<std::string> out =
      Call(Shell(absl::StrCat("echo $$ > ", (dir_ / "pgid").string(), "; sleep 1000 & echo $! > ",
                              (dir_ / "bg").string(), "; echo done")));
  EXPECT_LT(Clock::now() - start, kPrompt);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "done\n");
  EXPECT_TRUE(AllGone(ReadPid(dir_ / "pgid"), ReadPid(dir_ / "bg")));

  // A background process that writes on after the first process exited is cut off as well.
  out = Call(Shell(absl::StrCat("echo first; echo $$ > ", (dir_ / "pgid2").string(),
                                "; (trap '' TERM; while :; do echo more; sleep 0.01; done) &",
                                "echo $! > ", (dir_ / "bg2").string())));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(absl::StartsWith(*out, "first\n")) << *out;
  EXPECT_TRUE(AllGone(ReadPid(dir_ / "pgid2"), ReadPid(dir_ / "bg2")));
}

TEST_F(ExecTest, OutputOverTheLimitFails) {
  ExecSpec spec = Shell("head -c 1000 /dev/zero");
  spec.max_output = 1'000;
  absl::StatusOr<std::string> out = Call(spec);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->size(), 1'000u);

  spec.argv = {"head -c 1001 /dev/zero"};
  out = Call(spec);
  ASSERT_FALSE(out.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(out.status())) << out.status();
  EXPECT_EQ(out.status().message(), "kind 'k': output over the 1000-byte limit (max_output_bytes)");
  // The same input gives the same output: retrying cannot help, the task is DEAD at once.
  const worker::Result r = Run(Make(spec), "", 0, cancelled_);
  EXPECT_EQ(r.outcome, worker::Outcome::kFailed);
  EXPECT_TRUE(r.permanent);

  // A command that never stops writing is stopped.
  spec.argv = {"/bin/cat", "/dev/zero"};
  spec.shell = false;
  const auto start = Clock::now();
  out = Call(spec);
  EXPECT_LT(Clock::now() - start, kPrompt);
  EXPECT_TRUE(absl::IsInvalidArgument(out.status())) << out.status();

  ExecSpec big;
  big.argv = {"/bin/cat"};
  EXPECT_EQ(big.max_output, size_t{16} << 20);
  out = Call(big, Bytes((16 << 20) + 1, 3));
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().message(),
            "kind 'k': output over the 16777216-byte limit (max_output_bytes)");
}

TEST_F(ExecTest, MissingExecutableIsAClearError) {
  ExecSpec spec;
  spec.argv = {"/bin/nope"};
  absl::StatusOr<std::string> out = Call(spec);
  EXPECT_EQ(out.status().message(), "kind 'k': cannot run '/bin/nope': No such file or directory");

  WriteFile(dir_ / "not-executable", "#!/bin/sh\necho hi\n");
  spec.argv = {(dir_ / "not-executable").string()};
  out = Call(spec);
  EXPECT_CONTAINS(out.status().message(), "not-executable': Permission denied");

  spec.argv = {"/bin/cat"};
  spec.cwd = (dir_ / "no-such-dir").string();
  out = Call(spec);
  EXPECT_CONTAINS(out.status().message(), "cannot change to directory '");
  EXPECT_CONTAINS(out.status().message(), "no-such-dir': No such file or directory");
}

TEST_F(ExecTest, BareNameIsLookedUpInTheChildsPath) {
  fs::create_directory(dir_ / "bin");
  WriteFile(dir_ / "bin" / "hello", "#!/bin/sh\necho \"hello $1\"\n", fs::perms(0755));
  ExecSpec spec;
  spec.argv = {"hello", "world"};
  spec.env = {{"PATH", "/nonexistent:relative:" + (dir_ / "bin").string()}};
  absl::StatusOr<std::string> out = Call(spec);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "hello world\n");

  // No PATH given: the default one.
  ExecSpec cat;
  cat.argv = {"cat"};
  out = Call(cat, "meow");
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "meow");

  // Not in the worker's PATH either, unless passed.
  spec.env.clear();
  out = Call(spec);
  EXPECT_TRUE(absl::IsFailedPrecondition(out.status())) << out.status();
  EXPECT_CONTAINS(out.status().message(), "cannot run 'hello': not found in PATH");
}

TEST_F(ExecTest, EnvironmentIsOnlyWhatTheSpecSays) {
  ASSERT_EQ(setenv("TASKMASTER_TOKEN", "secret", 1), 0);
  ASSERT_EQ(setenv("TM_EXEC_PASSED", "from the worker", 1), 0);
  ExecSpec spec;
  spec.argv = {"/usr/bin/env"};
  spec.env = {{"TM_EXEC_SET", "set=by spec"}};
  spec.pass_env = {"TM_EXEC_PASSED", "TM_EXEC_NOT_IN_THE_WORKER"};
  absl::StatusOr<std::string> out = Call(spec);
  unsetenv("TASKMASTER_TOKEN");
  unsetenv("TM_EXEC_PASSED");
  ASSERT_TRUE(out.ok()) << out.status();
  // PATH is the default one: the spec names none (see PathOfTheChild).
  EXPECT_EQ(*out, absl::StrCat("PATH=", kExecDefaultPath,
                               "\nTM_EXEC_PASSED=from the worker\nTM_EXEC_SET=set=by spec\n"));
}

TEST_F(ExecTest, PathOfTheChild) {
  // No PATH in env or pass_env: the child gets the PATH its program was looked up in.
  ExecSpec spec = Shell("echo \"$PATH\"");
  absl::StatusOr<std::string> out = Call(spec);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, absl::StrCat(kExecDefaultPath, "\n"));
  EXPECT_EQ(std::string(kExecDefaultPath), "/usr/local/bin:/usr/bin:/bin");

  // An explicit one wins.
  spec.env = {{"PATH", "/opt/tm:/bin"}};
  out = Call(spec);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "/opt/tm:/bin\n");

  // So does the worker's, when passed.
  const char* old = std::getenv("PATH");
  const std::string saved = old ? old : "";
  ASSERT_EQ(setenv("PATH", "/usr/bin:/bin:/tm-worker-path", 1), 0);
  spec.env.clear();
  spec.pass_env = {"PATH"};
  absl::StatusOr<Handler> handler = MakeExecHandler("k", spec);
  if (old) {
    setenv("PATH", saved.c_str(), 1);
  } else {
    unsetenv("PATH");
  }
  ASSERT_TRUE(handler.ok()) << handler.status();
  out = Call(*handler, "");
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "/usr/bin:/bin:/tm-worker-path\n");
}

TEST_F(ExecTest, DescriptorsAreNotInherited) {
  // Descriptors without FD_CLOEXEC, as a careless library would leave them.
  const int file = open("/dev/null", O_RDONLY);
  int pipe_fds[2];
  ASSERT_GE(file, 0);
  ASSERT_EQ(pipe(pipe_fds), 0);
  // The shell lists its own descriptors through ls, a child it waits for.
  ExecSpec spec = Shell("ls /proc/$$/fd; true");
  absl::StatusOr<std::string> out = Call(spec);
  EXPECT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out.value_or(""), "0\n1\n2\n");

  spec.progress_fd = 7;
  out = Call(spec);
  EXPECT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out.value_or(""), "0\n1\n2\n7\n");
  close(file);
  close(pipe_fds[0]);
  close(pipe_fds[1]);
}

TEST_F(ExecTest, WorkerSignalStateIsNotInherited) {
  // As the worker has it: SIGPIPE ignored, the daemon signals blocked.
  const auto old_pipe = signal(SIGPIPE, SIG_IGN);
  sigset_t daemon, old_mask;
  sigemptyset(&daemon);
  sigaddset(&daemon, SIGTERM);
  sigaddset(&daemon, SIGINT);
  sigaddset(&daemon, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &daemon, &old_mask);
  ExecSpec spec;
  spec.argv = {"/bin/grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"};
  absl::StatusOr<std::string> out = Call(spec);
  pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
  signal(SIGPIPE, old_pipe);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n");
}

TEST_F(ExecTest, LimitsAndNiceAreApplied) {
  ExecSpec spec = Shell("ulimit -n; ulimit -v; ulimit -t; nice");
  spec.limits.open_files = 64;
  spec.limits.address_space_bytes = uint64_t{1} << 30;
  spec.limits.cpu_seconds = 100;
  spec.limits.nice = 19;
  absl::StatusOr<std::string> out = Call(spec);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "64\n1048576\n100\n19\n");
}

TEST_F(ExecTest, ProgressLinesReachReportProgress) {
  ExecSpec spec = Shell(
      "echo 'progress 1/4 first step' >&3; echo junk >&3; echo 'progress 5/4 too far' >&3;"
      "echo 'progress -1/4' >&3; echo 'progress 1/x' >&3; echo 'progress 2/4' >&3;"
      "head -c 10000 /dev/zero | tr '\\0' x >&3; echo ' progress 9/9 in an overlong line' >&3;"
      "printf 'progress 3/0 total unknown \\377' >&3; echo out");
  spec.progress_fd = 3;
  std::vector<Progress> reports;
  absl::StatusOr<std::string> out =
      Call(spec, "", [&reports](Progress p) { reports.push_back(std::move(p)); });
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "out\n");
  ASSERT_EQ(reports.size(), 3u);
  EXPECT_EQ(reports[0].done, 1);
  EXPECT_EQ(reports[0].total, 4);
  EXPECT_EQ(reports[0].message, "first step");
  EXPECT_EQ(reports[1].done, 2);
  EXPECT_EQ(reports[1].message, "");
  EXPECT_EQ(reports[2].done, 3);
  EXPECT_EQ(reports[2].total, 0);
  EXPECT_EQ(reports[2].message, "total unknown \xEF\xBF\xBD");
}

TEST_F(ExecTest, CwdIsApplied) {
  ExecSpec spec;
  spec.argv = {"/bin/pwd", "-P"};
  spec.cwd = dir_.string();
  absl::StatusOr<std::string> out = Call(spec);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, fs::canonical(dir_).string() + "\n");
}

TEST_F(ExecTest, ConcurrentRunsKeepTheirOwnPipes) {
  const Handler handler = Make(Shell("cat; echo \" $$\" >&2; exit 0"));
  std::vector<std::future<bool>> runs;
  for (int t = 0; t < 4; ++t) {
    runs.push_back(std::async(std::launch::async, [&handler, t] {
      for (int i = 0; i < 5; ++i) {
        const std::string payload = Bytes(100'000 + t * 1'000 + i, t * 100 + i);
        absl::StatusOr<std::string> out = Call(handler, payload);
        if (!out.ok() || *out != payload) return false;
      }
      return true;
    }));
  }
  for (auto& run : runs) {
    ASSERT_EQ(run.wait_for(kBound), std::future_status::ready);
    EXPECT_TRUE(run.get());
  }
}

TEST_F(ExecTest, CancelNearTheDeadlineIsACancelNotATimeout) {
  // The command ignores SIGTERM, so the stop waits out the grace, which ends past the deadline:
  // the handler still says why it stopped, a cancel.
  ExecSpec spec =
      Shell(absl::StrCat("trap '' TERM; echo $$ > ", (dir_ / "pgid").string(), "; sleep 1000"));
  spec.kill_grace = milliseconds(1'200);
  const Handler handler = Make(spec);
  const auto deadline = Clock::now() + milliseconds(800);
  auto running = std::async(std::launch::async,
                            [&] { return Call(handler, "", cancelled_, nullptr, deadline); });
  const pid_t pgid = ReadPid(dir_ / "pgid");
  ASSERT_LT(Clock::now(), deadline - milliseconds(200)) << "the command started too slowly";
  cancelled_->store(true);
  ASSERT_EQ(running.wait_for(kBound), std::future_status::ready);
  EXPECT_GE(Clock::now(), deadline);
  absl::StatusOr<std::string> out = running.get();
  EXPECT_TRUE(absl::IsCancelled(out.status())) << out.status();
  EXPECT_CONTAINS(out.status().message(), "stopped: cancelled, killed by signal 9 (SIGKILL)");
  EXPECT_TRUE(AllGone(pgid));

  // The same through RunTask, the way a pool runs it.
  fs::remove(dir_ / "pgid");
  cancelled_->store(false);
  auto task = std::async(std::launch::async, [&] { return Run(handler, "", 800, cancelled_); });
  const pid_t pgid2 = ReadPid(dir_ / "pgid");
  cancelled_->store(true);
  ASSERT_EQ(task.wait_for(kBound), std::future_status::ready);
  const worker::Result r = task.get();
  EXPECT_EQ(r.outcome, worker::Outcome::kCancelled);
  EXPECT_TRUE(AllGone(pgid2));
}

TEST_F(ExecTest, SigchldIgnoredLosesTheStatusAndSignalsNothingAfter) {
  // A plugin in the same process ignores SIGCHLD: the kernel reaps the command's first process
  // itself, and its pid (the group's id) may be anyone's once its group is empty. The handler must
  // return, say the status is lost, and send the group id no signal after it learned that.
  const std::string script =
      absl::StrCat("sleep 1000 >/dev/null 2>&1 </dev/null & echo $! > ", (dir_ / "bg").string(),
                   "; echo $$ > ", (dir_ / "pgid").string(), "; echo done");
  const Handler handler = Make(Shell(script));
  struct sigaction ignore {
  }, old{};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  ASSERT_EQ(sigaction(SIGCHLD, &ignore, &old), 0);
  auto running = std::async(std::launch::async, [&] { return Call(handler, ""); });
  const bool ready = running.wait_for(kBound) == std::future_status::ready;
  sigaction(SIGCHLD, &old, nullptr);
  ASSERT_TRUE(ready) << "the handler hangs";
  absl::StatusOr<std::string> out = running.get();
  EXPECT_TRUE(absl::IsInternal(out.status())) << out.status();
  EXPECT_CONTAINS(out.status().message(), "its exit status was taken by someone else");
  // The background process is still in the group: the group kill that follows a normal exit was
  // not sent once the first process was found reaped elsewhere.
  const pid_t bg = ReadPid(dir_ / "bg");
  const pid_t pgid = ReadPid(dir_ / "pgid");
  const auto state = StateAndGroup(bg);
  EXPECT_TRUE(Alive(bg)) << "the group was signalled after its first process was reaped elsewhere";
  if (state) {
    EXPECT_EQ(state->second, pgid);
  }
  kill(bg, SIGKILL);
  EXPECT_TRUE(AllGone(pgid, bg));

  // A stop with SIGCHLD ignored still ends the command and returns.
  ASSERT_EQ(sigaction(SIGCHLD, &ignore, &old), 0);
  ExecSpec sleeper = Shell(absl::StrCat("echo $$ > ", (dir_ / "pgid2").string(), "; sleep 1000"));
  const Handler stopping = Make(sleeper);
  auto stopped = std::async(std::launch::async, [&] { return Call(stopping, "", cancelled_); });
  const pid_t pgid2 = ReadPid(dir_ / "pgid2");
  cancelled_->store(true);
  const bool stopped_ready = stopped.wait_for(kBound) == std::future_status::ready;
  sigaction(SIGCHLD, &old, nullptr);
  ASSERT_TRUE(stopped_ready) << "the handler hangs";
  out = stopped.get();
  EXPECT_TRUE(absl::IsCancelled(out.status())) << out.status();
  EXPECT_TRUE(AllGone(pgid2));
}

TEST_F(ExecTest, NiceBelowTheWorkersIsCheckedAtTheStart) {
  // Root with CAP_SYS_NICE here, so this process may lower its nice value: the allowed path. The
  // refused one is run in a thread that drops CAP_SYS_NICE from its effective set (capabilities
  // are a thread's, and the handler's check runs with the calling thread's). Whether lowering is
  // allowed is asked of a forked probe, independently of the handler's own check.
  errno = 0;
  const int current = getpriority(PRIO_PROCESS, 0);
  ASSERT_EQ(errno, 0);
  if (current == -20) GTEST_SKIP() << "already at nice -20";
  const int target = std::max(-20, current - 5);
  const pid_t probe = fork();
  if (probe == 0) _exit(setpriority(PRIO_PROCESS, 0, target) == 0 ? 0 : 1);
  ASSERT_GT(probe, 0);
  int status = 0;
  ASSERT_EQ(waitpid(probe, &status, 0), probe);
  const bool may_lower = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  const std::string refusal =
      absl::StrCat("kind 'k': limits.nice ", target, " is below the worker's ", current,
                   " and this process may not lower it (that needs CAP_SYS_NICE or an RLIMIT_NICE"
                   " of at least ",
                   20 - target, "): ");

  ExecSpec spec = Shell("nice");
  spec.limits.nice = target;
  absl::StatusOr<Handler> handler = MakeExecHandler("k", spec);
  if (may_lower) {
    ASSERT_TRUE(handler.ok()) << handler.status();
    absl::StatusOr<std::string> out = Call(*handler, "");
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(*out, absl::StrCat(target, "\n"));
  } else {
    EXPECT_TRUE(absl::IsInvalidArgument(handler.status())) << handler.status();
    EXPECT_CONTAINS(handler.status().message(), refusal);
  }
  // Not below the worker's: no question.
  spec.limits.nice = current;
  EXPECT_TRUE(MakeExecHandler("k", spec).ok());

  rlimit nice_limit{};
  ASSERT_EQ(getrlimit(RLIMIT_NICE, &nice_limit), 0);
  const bool rlimit_allows = nice_limit.rlim_cur == RLIM_INFINITY ||
                             static_cast<rlim_t>(20 - target) <= nice_limit.rlim_cur;
  spec.limits.nice = target;
  bool dropped = false;
  absl::Status without_cap;
  std::thread([&] {
    __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
    if (syscall(SYS_capget, &header, data) != 0) return;
    data[CAP_TO_INDEX(CAP_SYS_NICE)].effective &= ~CAP_TO_MASK(CAP_SYS_NICE);
    if (syscall(SYS_capset, &header, data) != 0) return;
    dropped = true;
    without_cap = MakeExecHandler("k", spec).status();
  }).join();
  ASSERT_TRUE(dropped) << "cannot drop CAP_SYS_NICE in a thread";
  if (rlimit_allows) {
    EXPECT_TRUE(without_cap.ok()) << without_cap;
  } else {
    EXPECT_TRUE(absl::IsInvalidArgument(without_cap)) << without_cap;
    EXPECT_CONTAINS(without_cap.message(), refusal);
  }
}

TEST(ExecSpecTest, InvalidSpecsAreRefusedNamingTheKind) {
  auto error = [](ExecSpec spec, const std::string& kind = "k") {
    absl::StatusOr<Handler> h = MakeExecHandler(kind, std::move(spec));
    EXPECT_TRUE(absl::IsInvalidArgument(h.status())) << h.status();
    return std::string(h.status().message());
  };
  ExecSpec ok;
  ok.argv = {"/bin/cat"};
  ASSERT_TRUE(MakeExecHandler("k", ok).ok());

  EXPECT_CONTAINS(error(ok, "bad kind"), "kind 'bad kind'");
  ExecSpec s = ok;
  s.argv = {};
  EXPECT_EQ(error(s), "kind 'k': argv must name a program");
  s.argv = {""};
  EXPECT_EQ(error(s), "kind 'k': argv must name a program");
  s.argv = {"bin/cat"};
  EXPECT_CONTAINS(error(s), "must be an absolute path or a bare name");
  s.argv = {"/bin/cat", std::string("a\0b", 3)};
  EXPECT_CONTAINS(error(s), "NUL");
  s = Shell("echo a");
  s.argv.push_back("b");
  EXPECT_CONTAINS(error(s), "exactly one string");
  s = ok;
  s.cwd = "relative";
  EXPECT_CONTAINS(error(s), "cwd 'relative' must be an absolute path");
  s = ok;
  s.env = {{"A=B", "x"}};
  EXPECT_CONTAINS(error(s), "environment name 'A=B' is not valid");
  s.env = {{"1A", "x"}};
  EXPECT_CONTAINS(error(s), "is not valid");
  s.env = {{"A", std::string("x\0y", 3)}};
  EXPECT_CONTAINS(error(s), "NUL");
  s = ok;
  s.pass_env = {""};
  EXPECT_CONTAINS(error(s), "pass_env name");
  s.pass_env = {"HOME"};
  s.env = {{"HOME", "/"}};
  EXPECT_CONTAINS(error(s), "HOME is both in env and in pass_env");
  s = ok;
  s.kill_grace = milliseconds(-1);
  EXPECT_CONTAINS(error(s), "kill_grace");
  s = ok;
  s.max_output = 0;
  EXPECT_CONTAINS(error(s), "max_output");
  s = ok;
  s.stderr_tail = kMaxExecStderrTail + 1;
  EXPECT_CONTAINS(error(s), "stderr_tail");
  s = ok;
  s.permanent_exit_codes = {0};
  EXPECT_CONTAINS(error(s), "permanent exit code 0");
  s.permanent_exit_codes = {256};
  EXPECT_CONTAINS(error(s), "permanent exit code 256");
  for (int fd : {0, 1, 2, -2, kMaxExecProgressFd + 1}) {
    s = ok;
    s.progress_fd = fd;
    EXPECT_CONTAINS(error(s), "progress_fd");
  }
  s = ok;
  s.limits.address_space_bytes = 4096;
  EXPECT_CONTAINS(error(s), "limits.address_space_bytes must be at least");
  s = ok;
  s.limits.cpu_seconds = 0;
  EXPECT_CONTAINS(error(s), "limits.cpu_seconds");
  s = ok;
  s.limits.open_files = 2;
  EXPECT_CONTAINS(error(s), "limits.open_files");
  s = ok;
  s.limits.nice = 20;
  EXPECT_CONTAINS(error(s), "limits.nice");
  s.limits.nice = -21;
  EXPECT_CONTAINS(error(s), "limits.nice");
}

}  // namespace
}  // namespace taskmaster
