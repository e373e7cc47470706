#pragma once
// High availability on loopback: a PostgreSQL 15 server of the test's own (initdb in a temporary
// directory, a loopback port, stopped and removed with its handle), and masters sharing it.
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tests/harness.h"

namespace taskmaster::testing {

// A PostgreSQL server in a temporary directory, on a free loopback port. Run as the `postgres`
// user when the test runs as root (the server refuses root). A test process that dies without
// stopping its server (a crash skips destructors) leaves it to the next TempPostgres, which stops
// every server whose test is gone.
class TempPostgres {
 public:
  // Why this machine cannot run one (no server binaries), for GTEST_SKIP; empty when it can.
  static std::string Unavailable();
  TempPostgres();
  ~TempPostgres();
  TempPostgres(const TempPostgres&) = delete;
  TempPostgres& operator=(const TempPostgres&) = delete;

  int port() const { return port_; }
  // A libpq connection string for `user` (the superuser by default).
  std::string conninfo(const std::string& user = "postgres") const;
  // Runs `sql` with psql as the superuser; throws with psql's error when it fails.
  std::string Sql(const std::string& sql) const;
  // Stops the server (fast: connections are cut, what was committed stays) and starts it again
  // on the same port after `down`.
  void Restart(std::chrono::milliseconds down);

 private:
  void StopAbandoned() const;
  void Start();
  void Stop();
  CommandResult AsServerUser(std::vector<std::string> argv) const;

  std::string bin_;  // the server's binaries
  std::string dir_;  // the cluster and its socket, owned by the server's user
  int port_ = 0;
  bool as_postgres_ = false;  // the test runs as root
};

// Masters on a TempPostgres, each on a port of its own kept across restarts, with the test
// tokens; workers and clients given every master's address.
class HaCluster {
 public:
  HaCluster(TempPostgres* postgres, size_t masters, std::vector<std::string> master_flags = {});
  // Master `i` connects with `conninfo` from its next start on (default: the superuser's).
  void SetMasterConninfo(size_t i, std::string conninfo) { conninfo_.at(i) = std::move(conninfo); }
  // Starts master `i` (again, on its port) and waits until it listens (serving or standing by).
  void StartMaster(size_t i);
  // Starts every master, in order (so the first serves), and returns the one that serves.
  std::optional<size_t> StartAll();
  Process& master(size_t i) { return *masters_.at(i); }
  std::string address(size_t i) const { return "127.0.0.1:" + std::to_string(ports_.at(i)); }
  // Every master's address, comma-separated.
  std::string addresses() const;
  // The index of the master that serves, waiting up to `timeout` for one; nullopt when none.
  std::optional<size_t> Serving(std::chrono::milliseconds timeout = std::chrono::seconds(20));
  Process& StartWorker(const std::string& name, std::vector<std::string> flags = {});
  // The Python library's example worker (examples/python/task_worker.py: square on a process
  // pool) from the build tree, given every master's address.
  Process& StartPythonWorker(const std::string& name);
  std::unique_ptr<Client> NewClient() const;
  CommandResult Taskctl(std::vector<std::string> args) const;
  const TempDir& dir() const { return dir_; }

 private:
  TempPostgres* const postgres_;
  TempDir dir_;
  std::vector<std::string> master_flags_;
  std::vector<int> ports_;
  std::vector<std::string> conninfo_;
  std::vector<int> starts_;
  std::vector<std::unique_ptr<Process>> masters_;
  std::vector<std::unique_ptr<Process>> workers_;
};

}  // namespace taskmaster::testing
