#include "tests/harness.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "absl/strings/str_cat.h"

extern char** environ;

namespace taskmaster::testing {

TempDir::TempDir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "taskmaster-test-XXXXXX");
  if (!mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

bool WaitFor(const std::function<bool()>& done, std::chrono::milliseconds timeout,
             std::chrono::milliseconds poll) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(poll);
  }
  return done();
}

namespace {

pid_t Spawn(const std::vector<std::string>& argv, const std::string& out, const std::string& err,
            const std::string& in, const std::vector<std::string>& extra_env) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, in.c_str(), O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  // The test runner may block signals; children start with the default mask.
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t empty;
  sigemptyset(&empty);
  posix_spawnattr_setsigmask(&attr, &empty);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  // Clients and workers must not pick up a developer's TASKMASTER_* environment.
  std::vector<char*> env;
  for (char** e = environ; *e; ++e) {
    if (std::string_view(*e).rfind("TASKMASTER_", 0) != 0) env.push_back(*e);
  }
  for (const std::string& e : extra_env) env.push_back(const_cast<char*>(e.c_str()));
  env.push_back(nullptr);
  pid_t pid = -1;
  // A bare name (ip, iptables) is looked up in PATH.
  const int rc = posix_spawnp(&pid, args[0], &actions, &attr, args.data(), env.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) throw std::runtime_error("cannot start " + argv[0]);
  return pid;
}

int DecodeStatus(int status) {
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

std::string Binary(const std::string& name) {
  if (const char* dir = std::getenv("TASKMASTER_TEST_BINARIES"); dir && *dir) {
    return std::string(dir) + "/" + name;
  }
  if (name == "taskmaster") return TASKMASTER_BIN;
  if (name == "taskworker") return TASKWORKER_BIN;
  return TASKCTL_BIN;
}

std::string Square(int64_t n) { return absl::StrCat(n, "*", n, "=", n * n); }

CommandResult MakeCertificates(const std::string& dir, const std::vector<std::string>& names) {
  std::vector<std::string> argv = {std::string(TASKMASTER_SOURCE_DIR) + "/deploy/make-certs.sh",
                                   "--days", "2", dir};
  argv.insert(argv.end(), names.begin(), names.end());
  return RunCommand(argv);
}

std::vector<std::string> FaultShimEnv(const std::string& clock_file,
                                      const std::string& fsync_fail_file) {
  return {std::string("LD_PRELOAD=") + FAULT_SHIM_LIB, "TM_SHIM_CLOCK_FILE=" + clock_file,
          "TM_SHIM_FSYNC_FAIL_FILE=" + fsync_fail_file};
}

Process::Process(std::vector<std::string> argv, std::string log, std::vector<std::string> env)
    : log_(std::move(log)) {
  pid_ = Spawn(argv, log_, log_, "/dev/null", env);
}

Process::~Process() {
  if (!exit_code_) {
    kill(pid_, SIGKILL);
    Wait(std::chrono::seconds(10));
  }
}

void Process::Signal(int sig) {
  if (!exit_code_) kill(pid_, sig);
}

std::optional<int> Process::Wait(std::chrono::milliseconds timeout) {
  WaitFor(
      [&] {
        if (exit_code_) return true;
        int status = 0;
        if (waitpid(pid_, &status, WNOHANG) == pid_) exit_code_ = DecodeStatus(status);
        return exit_code_.has_value();
      },
      timeout);
  return exit_code_;
}

bool Process::Running() { return !Wait(std::chrono::milliseconds(0)); }

CommandResult RunCommand(const std::vector<std::string>& argv, const std::string& input,
                         std::chrono::milliseconds timeout, const std::vector<std::string>& env) {
  TempDir dir;
  WriteFile(dir.File("in"), input);
  const pid_t pid = Spawn(argv, dir.File("out"), dir.File("err"), dir.File("in"), env);
  CommandResult result;
  int status = 0;
  const bool exited = WaitFor([&] { return waitpid(pid, &status, WNOHANG) == pid; }, timeout);
  if (!exited) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
  }
  result.exit_code = exited ? DecodeStatus(status) : -1;
  result.out = ReadFile(dir.File("out"));
  result.err = ReadFile(dir.File("err"));
  return result;
}

void WriteTokenFiles(const TempDir& dir) {
  WriteFile(dir.File("tokens"), std::string("# test tokens\nsubmit ") + kSubmitToken + "\nwork " +
                                    kWorkToken + "\nadmin " + kAdminToken + "\n");
  WriteFile(dir.File("submit.token"), std::string(kSubmitToken) + "\n");
  WriteFile(dir.File("work.token"), std::string(kWorkToken) + "\n");
  for (const char* name : {"tokens", "submit.token", "work.token"}) {
    std::filesystem::permissions(
        dir.File(name), std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  }
}

Cluster::Cluster(std::vector<std::string> master_flags) : master_flags_(std::move(master_flags)) {
  WriteTokenFiles(dir_);
}

std::vector<std::string> Cluster::MasterArgv() const {
  std::vector<std::string> argv = {
      Binary("taskmaster"), "--listen",          "127.0.0.1:" + std::to_string(port_),
      "--tokens",           dir_.File("tokens"), "--port-file",
      dir_.File("port")};
  // Fast timers and the cluster's own store, unless the test says otherwise.
  const std::vector<std::pair<std::string, std::string>> defaults = {
      {"--tick-ms", "50"},
      {"--heartbeat-ms", "200"},
      {"--shutdown-timeout-ms", "1000"},
      {"--data-dir", dir_.File("data")},
      {"--admin-listen", "127.0.0.1:0"}};
  for (const auto& [flag, value] : defaults) {
    if (std::find(master_flags_.begin(), master_flags_.end(), flag) == master_flags_.end()) {
      argv.insert(argv.end(), {flag, value});
    }
  }
  argv.insert(argv.end(), master_flags_.begin(), master_flags_.end());
  return argv;
}

void Cluster::StartMaster() {
  if (master_ && master_->Running()) {
    throw std::runtime_error("the previous master (pid " + std::to_string(master_->pid()) +
                             ") is still running");
  }
  const std::string port_file = dir_.File("port");
  std::filesystem::remove(port_file);
  master_ = std::make_unique<Process>(
      MasterArgv(), dir_.File("master-" + std::to_string(master_starts_++) + ".log"), env_);
  // One attempt, no retry. A restart reuses the port of a master that has exited (checked
  // above), and gRPC listens with SO_REUSEADDR, so the port is free at once; a master
  // that exits instead of listening has met a real error, which its log names, and starting it
  // again would hide it.
  const bool listening =
      WaitFor([&] { return std::filesystem::exists(port_file) || !master_->Running(); },
              std::chrono::seconds(20));
  if (!listening || !std::filesystem::exists(port_file)) {
    throw std::runtime_error("master did not start: " + master_->Log());
  }
  port_ = std::stoi(ReadFile(port_file));
}

void Cluster::KillMaster(int sig) {
  master_->Signal(sig);
  master_->Wait(std::chrono::seconds(20));
}

std::vector<std::string> WorkerArgv(const std::string& masters, const TempDir& dir,
                                    const std::string& name, std::vector<std::string> flags) {
  std::vector<std::string> argv = {Binary("taskworker"),
                                   "--master",
                                   masters,
                                   "--token-file",
                                   dir.File("work.token"),
                                   "--name",
                                   name,
                                   "--reconnect-max-ms",
                                   "500"};
  argv.insert(argv.end(), flags.begin(), flags.end());
  return argv;
}

std::vector<std::string> TaskctlArgv(const std::string& masters, const TempDir& dir,
                                     std::vector<std::string> args) {
  std::vector<std::string> argv = {Binary("taskctl"), "--master", masters, "--token-file",
                                   dir.File("submit.token")};
  argv.insert(argv.end(), args.begin(), args.end());
  return argv;
}

Process& Cluster::StartWorker(const std::string& name, std::vector<std::string> flags) {
  workers_.push_back(std::make_unique<Process>(WorkerArgv(address(), dir_, name, std::move(flags)),
                                               dir_.File(name + ".log"), env_));
  return *workers_.back();
}

bool Cluster::WaitForWorkers(size_t n, std::chrono::milliseconds timeout) {
  auto client = NewClient();
  return WaitFor(
      [&] {
        auto workers = client->Workers();
        if (!workers.ok()) return false;
        size_t connected = 0;
        for (const auto& w : workers->workers()) connected += w.connected() ? 1 : 0;
        return connected == n;
      },
      timeout);
}

ChannelOptions Cluster::channel() const {
  ChannelOptions options = tls_;
  options.address = address();
  return options;
}

std::unique_ptr<Client> Cluster::NewClient(const std::string& token) const {
  ClientOptions options;
  options.master = channel();
  options.token = token;
  options.rpc_timeout = std::chrono::seconds(20);
  options.reconnect_timeout = std::chrono::seconds(30);
  auto client = Client::Connect(options);
  if (!client.ok()) throw std::runtime_error(std::string(client.status().message()));
  return std::move(*client);
}

CommandResult Cluster::Taskctl(std::vector<std::string> args, const std::string& input) const {
  return RunCommand(TaskctlArgv(address(), dir_, std::move(args)), input);
}

}  // namespace taskmaster::testing
