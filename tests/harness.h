#pragma once

// Starts the real binaries on loopback for integration and fault tests. Every wait is bounded,
// and every process started here is stopped by its PID when its handle goes away.

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "client/client.h"

namespace taskmaster::testing {

// A private directory removed with its contents at destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, const std::string& text);
std::string ReadFile(const std::string& path);

// Polls `done` every `poll` until it holds or `timeout` passes; returns its last value.
bool WaitFor(const std::function<bool()>& done, std::chrono::milliseconds timeout,
             std::chrono::milliseconds poll = std::chrono::milliseconds(20));

// The binary `name` (taskmaster, taskworker, taskctl) of this build, or of the directory in
// $TASKMASTER_TEST_BINARIES: the same tests can then show how an older build behaves.
std::string Binary(const std::string& name);

// A child process whose stdout and stderr go to `log`; `env` is added to its environment.
class Process {
 public:
  Process(std::vector<std::string> argv, std::string log, std::vector<std::string> env = {});
  ~Process();  // SIGKILL if still running
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  void Signal(int sig);
  // The exit code (128 + signal when killed), or nullopt if still running after `timeout`.
  std::optional<int> Wait(std::chrono::milliseconds timeout);
  bool Running();
  std::string Log() const { return ReadFile(log_); }

 private:
  pid_t pid_ = -1;
  std::optional<int> exit_code_;
  std::string log_;
};

struct CommandResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// Runs a command to completion (killed after `timeout`), with `input` on its stdin.
CommandResult RunCommand(const std::vector<std::string>& argv, const std::string& input = "",
                         std::chrono::milliseconds timeout = std::chrono::seconds(60),
                         const std::vector<std::string>& env = {});

// "n*n=r", what the built-in `square` handler answers for payload n.
std::string Square(int64_t n);

// deploy/make-certs.sh into `dir`: a CA, a server certificate for loopback and `names` (host
// names or addresses), worker and client certificates (ca.pem, server.pem/.key, worker.pem/.key,
// client.pem/.key).
CommandResult MakeCertificates(const std::string& dir, const std::vector<std::string>& names = {});

// The fault shim (tests/fault_shim.cc), preloaded into a child by these environment entries:
// CLOCK_REALTIME is shifted by the seconds written in `clock_file`, and fsync and fdatasync fail
// with EIO while `fsync_fail_file` exists.
std::vector<std::string> FaultShimEnv(const std::string& clock_file,
                                      const std::string& fsync_fail_file);

inline constexpr char kSubmitToken[] = "submit-token-for-tests-0123456789";
inline constexpr char kWorkToken[] = "work-token-for-tests-0123456789";
inline constexpr char kAdminToken[] = "admin-token-for-tests-0123456789";

// In `dir`: "tokens", the master's file of the three test tokens, and "submit.token" and
// "work.token" for taskctl and workers; all 0600.
void WriteTokenFiles(const TempDir& dir);

// The command line of a worker named `name` reaching `masters` (one address or several) with the
// work token in `dir`, reconnecting fast, plus `flags`; and of taskctl with the submit token.
std::vector<std::string> WorkerArgv(const std::string& masters, const TempDir& dir,
                                    const std::string& name, std::vector<std::string> flags);
std::vector<std::string> TaskctlArgv(const std::string& masters, const TempDir& dir,
                                     std::vector<std::string> args);

// A cluster on loopback: token files in a temp dir, a master on an OS-chosen port, workers.
class Cluster {
 public:
  // Master flags beyond --listen/--tokens/--port-file/--data-dir (the durable store in the
  // cluster's directory, kept across restarts); fast timers by default.
  explicit Cluster(std::vector<std::string> master_flags = {});

  // Starts (or restarts, on the same port once one was chosen) the master; waits (up to 20 s)
  // until it listens, and throws with its log if it exits or times out first. No retry: see
  // harness.cc.
  void StartMaster();
  // The master's command line, as StartMaster runs it.
  std::vector<std::string> MasterArgv() const;
  // Environment entries for the master and workers started from now on.
  void SetEnv(std::vector<std::string> env) { env_ = std::move(env); }
  std::string data_dir() const { return dir_.File("data"); }
  Process& master() { return *master_; }
  void KillMaster(int sig);
  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  // The TLS settings (the tls_* fields) of the cluster's clients from now on.
  void SetClientTls(const ChannelOptions& tls) { tls_ = tls; }
  // How a client reaches the master: its address, with the clients' TLS settings.
  ChannelOptions channel() const;

  // Starts a worker with the work token and the given extra flags.
  Process& StartWorker(const std::string& name, std::vector<std::string> flags = {});
  Process& worker(size_t i) { return *workers_.at(i); }

  // Waits until the master lists `n` connected workers.
  bool WaitForWorkers(size_t n, std::chrono::milliseconds timeout = std::chrono::seconds(20));

  // A client with the submit token (over TLS when SetClientTls said so).
  std::unique_ptr<Client> NewClient(const std::string& token = kSubmitToken) const;

  // taskctl with --master and the submit token file.
  CommandResult Taskctl(std::vector<std::string> args, const std::string& input = "") const;

  const TempDir& dir() const { return dir_; }

 private:
  TempDir dir_;
  std::vector<std::string> master_flags_;
  std::vector<std::string> env_;
  ChannelOptions tls_;
  int port_ = 0;
  int master_starts_ = 0;
  std::unique_ptr<Process> master_;
  std::vector<std::unique_ptr<Process>> workers_;
};

}  // namespace taskmaster::testing
