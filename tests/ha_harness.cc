#include "tests/ha_harness.h"

#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <stdexcept>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace taskmaster::testing {
namespace {

// Debian's PostgreSQL 15 server binaries.
constexpr char kServerBin[] = "/usr/lib/postgresql/15/bin";
// A server's directory in the temporary directory, and the file in it naming its test's pid.
constexpr char kDirPrefix[] = "taskmaster-pg-";
constexpr char kOwnerFile[] = "owner.pid";

// A port nobody listens on now, for a server that must keep its port across restarts.
int FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    if (fd >= 0) close(fd);
    throw std::runtime_error("cannot find a free loopback port");
  }
  close(fd);
  return ntohs(addr.sin_port);
}

}  // namespace

std::string TempPostgres::Unavailable() {
  if (!std::filesystem::exists(std::string(kServerBin) + "/postgres")) {
    return absl::StrCat("needs PostgreSQL 15's server (", kServerBin,
                        "/postgres): apt-get install postgresql-15 (scripts/deps.sh does)");
  }
  if (geteuid() == 0 && !getpwnam("postgres")) {
    return "runs the server as the 'postgres' user, which this machine lacks";
  }
  return "";
}

TempPostgres::TempPostgres() : bin_(kServerBin), as_postgres_(geteuid() == 0) {
  StopAbandoned();
  std::string pattern = (std::filesystem::temp_directory_path() / kDirPrefix).string() + "XXXXXX";
  if (!mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
  dir_ = pattern;
  WriteFile(dir_ + "/" + kOwnerFile, std::to_string(getpid()));
  if (as_postgres_) {
    const passwd* pw = getpwnam("postgres");
    if (!pw || chown(dir_.c_str(), pw->pw_uid, pw->pw_gid) != 0) {
      throw std::runtime_error("cannot give " + dir_ + " to the postgres user");
    }
  }
  CommandResult init = AsServerUser({bin_ + "/initdb", "-D", dir_ + "/data", "-A", "trust", "-U",
                                     "postgres", "--no-sync", "-E", "UTF8"});
  if (init.exit_code != 0) throw std::runtime_error("initdb failed: " + init.out + init.err);
  port_ = FreeLoopbackPort();
  Start();
}

TempPostgres::~TempPostgres() {
  Stop();
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

CommandResult TempPostgres::AsServerUser(std::vector<std::string> argv) const {
  if (as_postgres_) argv.insert(argv.begin(), {"runuser", "-u", "postgres", "--"});
  return RunCommand(argv, "", std::chrono::seconds(60));
}

void TempPostgres::StopAbandoned() const {
  std::error_code ec;
  for (const auto& entry :
       std::filesystem::directory_iterator(std::filesystem::temp_directory_path(), ec)) {
    const std::string dir = entry.path().string();
    if (!entry.path().filename().string().starts_with(kDirPrefix)) continue;
    const std::string owner = ReadFile(dir + "/" + kOwnerFile);
    pid_t pid = 0;
    try {
      pid = static_cast<pid_t>(std::stol(owner));
    } catch (const std::exception&) {
      continue;  // being made by a test that has not written its pid yet
    }
    // Its test still runs: a process that exists and is not a zombie waiting to be reaped.
    const std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
    const size_t state = stat.rfind(") ");
    const bool zombie = state != std::string::npos && stat.compare(state + 2, 1, "Z") == 0;
    if (pid <= 0 || ((kill(pid, 0) == 0 || errno == EPERM) && !zombie)) continue;
    AsServerUser(
        {bin_ + "/pg_ctl", "-D", dir + "/data", "-m", "immediate", "-w", "-t", "30", "stop"});
    std::filesystem::remove_all(dir, ec);
  }
}

void TempPostgres::Start() {
  // Loopback only, its socket in its own directory; fsync off: these tests kill processes, not
  // the machine.
  const std::string options = absl::StrCat("-p ", port_, " -k ", dir_,
                                           " -c listen_addresses=127.0.0.1 -c fsync=off "
                                           "-c max_connections=100");
  CommandResult started = AsServerUser({bin_ + "/pg_ctl", "-D", dir_ + "/data", "-o", options, "-l",
                                        dir_ + "/server.log", "-w", "-t", "30", "start"});
  if (started.exit_code != 0) {
    throw std::runtime_error("PostgreSQL did not start: " + started.out + started.err +
                             ReadFile(dir_ + "/server.log"));
  }
}

void TempPostgres::Stop() {
  AsServerUser({bin_ + "/pg_ctl", "-D", dir_ + "/data", "-m", "fast", "-w", "-t", "30", "stop"});
}

void TempPostgres::Restart(std::chrono::milliseconds down) {
  Stop();
  std::this_thread::sleep_for(down);
  Start();
}

std::string TempPostgres::conninfo(const std::string& user) const {
  return absl::StrCat("host=127.0.0.1 port=", port_, " user=", user, " dbname=postgres");
}

std::string TempPostgres::Sql(const std::string& sql) const {
  CommandResult r = RunCommand(
      {"psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", conninfo(), "-c", sql});
  if (r.exit_code != 0) throw std::runtime_error("psql: " + sql + ": " + r.err);
  while (!r.out.empty() && r.out.back() == '\n') r.out.pop_back();
  return r.out;
}

HaCluster::HaCluster(TempPostgres* postgres, size_t masters, std::vector<std::string> master_flags)
    : postgres_(postgres),
      master_flags_(std::move(master_flags)),
      conninfo_(masters, postgres->conninfo()),
      starts_(masters, 0),
      masters_(masters) {
  WriteTokenFiles(dir_);
  for (size_t i = 0; i < masters; ++i) ports_.push_back(FreeLoopbackPort());
}

void HaCluster::StartMaster(size_t i) {
  if (masters_[i] && masters_[i]->Running()) {
    throw std::runtime_error("master " + std::to_string(i) + " is still running");
  }
  const std::string port_file = dir_.File("port-" + std::to_string(i));
  std::filesystem::remove(port_file);
  std::vector<std::string> argv = {Binary("taskmaster"),
                                   "--listen",
                                   address(i),
                                   "--tokens",
                                   dir_.File("tokens"),
                                   "--port-file",
                                   port_file,
                                   "--store",
                                   "postgres",
                                   "--postgres",
                                   conninfo_[i],
                                   "--tick-ms",
                                   "50",
                                   "--heartbeat-ms",
                                   "200",
                                   "--shutdown-timeout-ms",
                                   "1000",
                                   "--admin-listen",
                                   ""};
  argv.insert(argv.end(), master_flags_.begin(), master_flags_.end());
  masters_[i] = std::make_unique<Process>(
      argv, dir_.File(absl::StrCat("master-", i, "-", starts_[i]++, ".log")));
  const bool listening =
      WaitFor([&] { return std::filesystem::exists(port_file) || !masters_[i]->Running(); },
              std::chrono::seconds(20));
  if (!listening || !std::filesystem::exists(port_file)) {
    throw std::runtime_error("master did not start: " + masters_[i]->Log());
  }
}

std::optional<size_t> HaCluster::StartAll() {
  for (size_t i = 0; i < masters_.size(); ++i) StartMaster(i);
  return Serving();
}

std::string HaCluster::addresses() const {
  std::vector<std::string> all;
  for (size_t i = 0; i < ports_.size(); ++i) all.push_back(address(i));
  return absl::StrJoin(all, ",");
}

std::optional<size_t> HaCluster::Serving(std::chrono::milliseconds timeout) {
  std::optional<size_t> serving;
  WaitFor(
      [&] {
        for (size_t i = 0; i < masters_.size(); ++i) {
          if (!masters_[i] || !masters_[i]->Running()) continue;
          ClientOptions options;
          options.master.address = address(i);
          options.token = kAdminToken;
          options.rpc_timeout = std::chrono::seconds(2);
          absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
          if (client.ok() && (*client)->Stats().ok()) {
            serving = i;
            return true;
          }
        }
        return false;
      },
      timeout, std::chrono::milliseconds(50));
  return serving;
}

Process& HaCluster::StartWorker(const std::string& name, std::vector<std::string> flags) {
  workers_.push_back(std::make_unique<Process>(
      WorkerArgv(addresses(), dir_, name, std::move(flags)), dir_.File(name + ".log")));
  return *workers_.back();
}

Process& HaCluster::StartPythonWorker(const std::string& name) {
  workers_.push_back(std::make_unique<Process>(
      std::vector<std::string>{"/usr/bin/python3", std::string(TASKMASTER_SOURCE_DIR) +
                                                       "/examples/python/task_worker.py"},
      dir_.File(name + ".log"),
      std::vector<std::string>{"PYTHONPATH=" + std::string(TASKMASTER_BINARY_DIR) + "/python",
                               "PYTHONDONTWRITEBYTECODE=1", "TASKMASTER_ADDR=" + addresses(),
                               absl::StrCat("TASKMASTER_TOKEN=", kWorkToken)}));
  return *workers_.back();
}

std::unique_ptr<Client> HaCluster::NewClient() const {
  ClientOptions options;
  options.master.address = addresses();
  options.token = kSubmitToken;
  options.reconnect_timeout = std::chrono::seconds(60);
  options.failover_timeout = std::chrono::seconds(30);
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
  if (!client.ok()) throw std::runtime_error(std::string(client.status().message()));
  return std::move(*client);
}

CommandResult HaCluster::Taskctl(std::vector<std::string> args) const {
  return RunCommand(TaskctlArgv(addresses(), dir_, std::move(args)));
}

}  // namespace taskmaster::testing
