// What deploying needs of the real binaries: the master's settings from a config file, the
// environment and flags; the systemd notify protocol against a socket the test makes; logs a
// shipper can read; and the units of deploy/systemd checked by systemd-analyze.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"
#include "tests/expect.h"
#include "tests/harness.h"

namespace taskmaster::testing {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::seconds;
using Clock = std::chrono::steady_clock;

const std::string kExampleConfig =
    std::string(TASKMASTER_SOURCE_DIR) + "/deploy/master.example.toml";
const std::string kUnitDir = std::string(TASKMASTER_SOURCE_DIR) + "/deploy/systemd";

// The keys `taskmaster --print-config` prints, in order.
std::vector<std::string> PrintedKeys(const std::string& printed) {
  std::vector<std::string> keys;
  for (const std::string& line : std::vector<std::string>(absl::StrSplit(printed, '\n'))) {
    const size_t eq = line.find(" = ");
    if (!line.empty() && line[0] != '#' && eq != std::string::npos) {
      keys.push_back(line.substr(0, eq));
    }
  }
  return keys;
}

TEST(MasterConfig, FileThenEnvironmentThenFlags) {
  TempDir dir;
  WriteFile(dir.File("master.toml"),
            "# a comment\nlisten = \"127.0.0.1:0\"\nlease_timeout_ms = 9000\n"
            "heartbeat_ms = 1500\nstore = \"memory\"\n");
  CommandResult r = RunCommand(
      {Binary("taskmaster"), "--config", dir.File("master.toml"), "--heartbeat-ms", "1000",
       "--print-config"},
      "", seconds(20), {"TASKMASTER_LEASE_TIMEOUT_MS=8000", "TASKMASTER_HEARTBEAT_MS=1200"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_CONTAINS(r.out, "listen = '127.0.0.1:0'  # from the config file\n");
  EXPECT_CONTAINS(r.out, "lease_timeout_ms = 8000  # from TASKMASTER_LEASE_TIMEOUT_MS\n");
  EXPECT_CONTAINS(r.out, "heartbeat_ms = 1000  # from --heartbeat-ms\n");
  EXPECT_CONTAINS(r.out, "store = 'memory'  # from the config file\n");

  // TASKMASTER_CONFIG names the file when no --config does.
  CommandResult e = RunCommand({Binary("taskmaster"), "--print-config"}, "", seconds(20),
                               {"TASKMASTER_CONFIG=" + dir.File("master.toml")});
  ASSERT_EQ(e.exit_code, 0) << e.err;
  EXPECT_CONTAINS(e.out, "lease_timeout_ms = 9000  # from the config file\n");
}

TEST(MasterConfig, ErrorsNameTheKeyAndLineAndStopTheMaster) {
  TempDir dir;
  WriteFile(dir.File("master.toml"),
            "listen = \"127.0.0.1:0\"\nlease_timeout_ms = \"30s\"\nlisten_port = 7070\n");
  CommandResult r =
      RunCommand({Binary("taskmaster"), "--config", dir.File("master.toml")}, "", seconds(20));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_CONTAINS(r.err, "master.toml:2: lease_timeout_ms must be an integer, not a string");
  EXPECT_CONTAINS(r.err, "master.toml:3: unknown key 'listen_port'");
  CommandResult env = RunCommand({Binary("taskmaster"), "--print-config"}, "", seconds(20),
                                 {"TASKMASTER_TICK_MS=fast"});
  EXPECT_EQ(env.exit_code, 2);
  EXPECT_CONTAINS(env.err, "environment variable TASKMASTER_TICK_MS: must be an integer");
}

TEST(MasterConfig, ConfigIsFoundAsTheFlagsAreParsed) {
  // The file is the one CLI11 parses --config to, even for `--config=` (which takes the next
  // argument): the master stops, and never starts with no file.
  CommandResult empty = RunCommand({Binary("taskmaster"), "--config=", "--print-config"}, "",
                                   seconds(20), {"TASKMASTER_INSECURE=1"});
  EXPECT_EQ(empty.exit_code, 2);
  EXPECT_CONTAINS(empty.err, "cannot read --print-config");
  // --help works whatever the file holds.
  TempDir dir;
  WriteFile(dir.File("bad.toml"), "listen = [\n");
  EXPECT_EQ(RunCommand({Binary("taskmaster"), "--config", dir.File("bad.toml"), "--help"}, "",
                       seconds(20))
                .exit_code,
            0);
  // A credential path prints as given: outside its unit it names no directory yet.
  WriteFile(dir.File("m.toml"), "tokens = \"$CREDENTIALS_DIRECTORY/tokens\"\n");
  CommandResult printed = RunCommand(
      {Binary("taskmaster"), "--config", dir.File("m.toml"), "--print-config"}, "", seconds(20));
  EXPECT_EQ(printed.exit_code, 0) << printed.err;
  EXPECT_CONTAINS(printed.out, "tokens = '$CREDENTIALS_DIRECTORY/tokens'  # from the config file");
  CommandResult run =
      RunCommand({Binary("taskmaster"), "--config", dir.File("m.toml")}, "", seconds(20));
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_CONTAINS(run.err, "names $CREDENTIALS_DIRECTORY, which is not set");
  // A variable that names no setting is ignored with a warning naming it.
  CommandResult typo = RunCommand({Binary("taskmaster"), "--print-config"}, "", seconds(20),
                                  {"TASKMASTER_LEASE_TIMEOUT=5"});
  EXPECT_EQ(typo.exit_code, 0);
  EXPECT_CONTAINS(typo.err, "warning: no setting is named TASKMASTER_LEASE_TIMEOUT (ignored)");
}

// Every flag of `taskmaster --help` but the actions is a key: in --print-config, and documented
// in deploy/master.example.toml, which itself is a valid config.
TEST(MasterConfig, EveryFlagIsAKeyOfTheExampleConfig) {
  CommandResult help = RunCommand({Binary("taskmaster"), "--help"}, "", seconds(20));
  ASSERT_EQ(help.exit_code, 0);
  CommandResult printed = RunCommand(
      {Binary("taskmaster"), "--config", kExampleConfig, "--print-config"}, "", seconds(20));
  ASSERT_EQ(printed.exit_code, 0) << printed.err;
  const std::vector<std::string> keys = PrintedKeys(printed.out);
  const std::set<std::string> key_set(keys.begin(), keys.end());
  const std::string example = ReadFile(kExampleConfig);
  const std::set<std::string> actions = {"help", "config", "print-config", "repair"};
  static const std::regex flag(R"(^\s+(?:-h,)?--([a-z-]+))");
  size_t flags = 0;
  for (const std::string& line : std::vector<std::string>(absl::StrSplit(help.out, '\n'))) {
    std::smatch m;
    if (!std::regex_search(line, m, flag) || actions.count(m[1].str())) continue;
    ++flags;
    std::string key = m[1].str();
    std::replace(key.begin(), key.end(), '-', '_');
    EXPECT_TRUE(key_set.count(key)) << key << " is not printed";
    EXPECT_TRUE(std::regex_search(example, std::regex("(^|\\n)#? ?" + key + " = ")))
        << key << " is not in " << kExampleConfig;
  }
  EXPECT_EQ(flags, keys.size());
}

// A datagram socket standing in for systemd's: what a service sends to $NOTIFY_SOCKET.
class NotifySocket {
 public:
  explicit NotifySocket(const std::string& path) : path_(path) {
    fd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    path.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
    if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ADD_FAILURE() << "cannot bind " << path;
    }
  }
  ~NotifySocket() { close(fd_); }
  std::string env() const { return "NOTIFY_SOCKET=" + path_; }

  // The next message, or nullopt after `timeout`.
  std::optional<std::string> Receive(milliseconds timeout) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(timeout.count())) != 1) return std::nullopt;
    char buffer[4096];
    const ssize_t n = recv(fd_, buffer, sizeof(buffer), 0);
    if (n < 0) return std::nullopt;
    return std::string(buffer, static_cast<size_t>(n));
  }

  // Messages until one holds `part` (returned), or nullopt after `timeout`; every message seen
  // on the way is appended to `seen`.
  std::optional<std::string> Await(const std::string& part, milliseconds timeout,
                                   std::vector<std::string>* seen) {
    const Clock::time_point end = Clock::now() + timeout;
    while (Clock::now() < end) {
      std::optional<std::string> m =
          Receive(std::chrono::duration_cast<milliseconds>(end - Clock::now()));
      if (!m) break;
      seen->push_back(*m);
      if (absl::StrContains(*m, part)) return m;
    }
    return std::nullopt;
  }

 private:
  std::string path_;
  int fd_ = -1;
};

bool Accepts(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

// Watchdog pings for `span`: their number and the longest gap between two.
struct Pings {
  int count = 0;
  milliseconds longest_gap{0};
};
Pings CountPings(NotifySocket& notify, milliseconds span) {
  Pings pings;
  const Clock::time_point end = Clock::now() + span;
  Clock::time_point last = Clock::now();
  while (Clock::now() < end) {
    std::optional<std::string> m =
        notify.Receive(std::chrono::duration_cast<milliseconds>(end - Clock::now()));
    if (!m || !absl::StrContains(*m, "WATCHDOG=1")) continue;
    const Clock::time_point now = Clock::now();
    pings.longest_gap =
        std::max(pings.longest_gap, std::chrono::duration_cast<milliseconds>(now - last));
    last = now;
    ++pings.count;
  }
  return pings;
}

constexpr char kWatchdog[] = "WATCHDOG_USEC=1000000";  // pings every 500 ms

// Pings over 3 s at kWatchdog's rate: about one every 500 ms, never a second without one.
void ExpectAtTheRate(const Pings& pings) {
  EXPECT_GE(pings.count, 4);
  EXPECT_LE(pings.count, 12);
  EXPECT_LT(pings.longest_gap, milliseconds(1000));
}

TEST(Notify, MasterIsReadyOnlyOnceRecoveredAndListening) {
  Cluster cluster;
  cluster.StartMaster();
  for (int i = 0; i < 10; ++i) {
    ASSERT_EQ(cluster.Taskctl({"submit", "--kind", "square", std::to_string(i)}).exit_code, 0);
  }
  cluster.KillMaster(SIGTERM);
  fs::remove(cluster.dir().File("port"));

  NotifySocket notify(cluster.dir().File("notify"));
  Process master(cluster.MasterArgv(), cluster.dir().File("notified.log"),
                 {notify.env(), kWatchdog});
  std::vector<std::string> seen;
  std::optional<std::string> ready = notify.Await("READY=1", seconds(30), &seen);
  ASSERT_TRUE(ready) << master.Log();
  // The port file is written once the port listens, before READY=1.
  ASSERT_TRUE(fs::exists(cluster.dir().File("port")));
  EXPECT_TRUE(Accepts(std::stoi(ReadFile(cluster.dir().File("port")))));
  // The ten tasks recovered from the store are counted in the status that goes with READY=1.
  EXPECT_CONTAINS(*ready, "STATUS=serving on 127.0.0.1:");
  EXPECT_CONTAINS(*ready, "10 tasks waiting");
  ASSERT_GE(seen.size(), 2u);
  EXPECT_EQ(seen.front(), "STATUS=recovering the store");

  const Pings pings = CountPings(notify, seconds(3));
  std::cout << "FIGURES master watchdog: " << pings.count << " pings in 3 s, longest gap "
            << pings.longest_gap.count() << " ms (WatchdogSec 1 s)" << std::endl;
  ExpectAtTheRate(pings);

  master.Signal(SIGTERM);
  EXPECT_TRUE(notify.Await("STOPPING=1", seconds(10), &seen)) << master.Log();
  EXPECT_EQ(master.Wait(seconds(20)), 0) << master.Log();
}

TEST(Notify, MasterThatCannotStartIsNeverReady) {
  TempDir dir;
  NotifySocket notify(dir.File("notify"));
  // No tokens file: refused before it listens.
  Process master({Binary("taskmaster"), "--listen", "127.0.0.1:0", "--data-dir", dir.File("d")},
                 dir.File("master.log"), {notify.env()});
  EXPECT_EQ(master.Wait(seconds(20)), 1);
  std::vector<std::string> seen;
  EXPECT_FALSE(notify.Await("READY=1", milliseconds(200), &seen));
}

TEST(Notify, WorkerIsReadyThenConnectedAndStopsOnSigterm) {
  Cluster cluster;
  cluster.StartMaster();
  TempDir dir;
  NotifySocket notify(dir.File("notify"));
  cluster.SetEnv({notify.env(), kWatchdog});
  Process& worker = cluster.StartWorker("notified");
  std::vector<std::string> seen;
  ASSERT_TRUE(notify.Await("READY=1", seconds(20), &seen)) << worker.Log();
  EXPECT_TRUE(notify.Await("STATUS=notified: connected to master 127.0.0.1:", seconds(10), &seen))
      << worker.Log();
  const Pings pings = CountPings(notify, seconds(3));
  ExpectAtTheRate(pings);
  worker.Signal(SIGTERM);
  EXPECT_TRUE(notify.Await("STOPPING=1", seconds(10), &seen)) << worker.Log();
  EXPECT_EQ(worker.Wait(seconds(30)), 0) << worker.Log();
}

// The standard health check: open to probes without a token, SERVING while the master serves,
// NOT_SERVING once it stops (the disk-full fault test sees NOT_SERVING while the store cannot
// write).
TEST(Health, AnyProbeAsksWithoutATokenAndKnowsItsServices) {
  Cluster cluster;
  cluster.StartMaster();
  CommandResult plain =
      RunCommand({Binary("taskctl"), "--master", cluster.address(), "health"}, "", seconds(20));
  EXPECT_EQ(plain.exit_code, 0) << plain.err;
  EXPECT_EQ(plain.out, "SERVING\n");
  CommandResult json =
      RunCommand({Binary("taskctl"), "--master", cluster.address(), "--format", "json", "health"},
                 "", seconds(20));
  EXPECT_EQ(json.out, "{\"status\":\"SERVING\"}\n");

  auto channel = grpc::CreateChannel(cluster.address(), grpc::InsecureChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  for (const char* service : {"", "taskmaster.v1.TaskQueue", "taskmaster.v1.WorkerService",
                              "grpc.health.v1.Health", "nope.Service"}) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + seconds(10));
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    grpc::health::v1::HealthCheckResponse response;
    const grpc::Status status = stub->Check(&context, request, &response);
    if (std::string_view(service) == "nope.Service") {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
    } else {
      EXPECT_TRUE(status.ok()) << service << ": " << status.error_message();
      EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
    }
  }
  // No stream to hold open: a probe polls Check.
  grpc::ClientContext watch_context;
  watch_context.set_deadline(std::chrono::system_clock::now() + seconds(10));
  auto watch = stub->Watch(&watch_context, grpc::health::v1::HealthCheckRequest{});
  grpc::health::v1::HealthCheckResponse ignored;
  EXPECT_FALSE(watch->Read(&ignored));
  EXPECT_EQ(watch->Finish().error_code(), grpc::StatusCode::UNIMPLEMENTED);

  cluster.KillMaster(SIGTERM);
  CommandResult gone = RunCommand(
      {Binary("taskctl"), "--master", cluster.address(), "health", "--timeout-ms", "2000"}, "",
      seconds(20));
  EXPECT_EQ(gone.exit_code, 2) << "no master: an error, not NOT_SERVING";
  EXPECT_CONTAINS(gone.err, "cannot reach the master");
}

// The lines of a --log-format json log, each checked to be an object of the five fields.
std::vector<nlohmann::json> JsonLines(const std::string& log) {
  static const std::regex time(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)");
  std::vector<nlohmann::json> lines;
  for (const std::string& line :
       std::vector<std::string>(absl::StrSplit(log, '\n', absl::SkipEmpty()))) {
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    const bool shaped = j.is_object() && j.size() == 5 && j["time"].is_string() &&
                        std::regex_match(j["time"].get<std::string>(), time) &&
                        j["level"].is_string() && j["component"].is_string() &&
                        j["pid"].is_number_integer() && j["msg"].is_string();
    EXPECT_TRUE(shaped) << "not a log object: " << line;
    lines.push_back(std::move(j));
  }
  return lines;
}

// The messages of `lines` that `component` logged.
std::vector<std::string> Messages(const std::vector<nlohmann::json>& lines,
                                  const std::string& component) {
  std::vector<std::string> messages;
  for (const nlohmann::json& j : lines) {
    if (j.value("component", "") == component) messages.push_back(j.value("msg", ""));
  }
  return messages;
}

TEST(Logging, MasterWritesOneJsonObjectALine) {
  TempDir dir;
  Process master(
      {Binary("taskmaster"), "--admin-listen", "127.0.0.1:0", "--log-format", "json", "--insecure",
       "--listen", "127.0.0.1:0", "--store", "memory", "--port-file", dir.File("port")},
      dir.File("master.log"));
  ASSERT_TRUE(WaitFor([&] { return fs::exists(dir.File("port")); }, seconds(20))) << master.Log();
  master.Signal(SIGTERM);
  ASSERT_EQ(master.Wait(seconds(20)), 0) << master.Log();
  const std::vector<std::string> messages = Messages(JsonLines(master.Log()), "master");
  ASSERT_FALSE(messages.empty()) << master.Log();
  EXPECT_TRUE(std::any_of(messages.begin(), messages.end(), [](const std::string& m) {
    return absl::StartsWith(m, "listening on 127.0.0.1:");
  })) << master.Log();
  EXPECT_EQ(messages.back(), "stopped") << master.Log();
}

// A worker's name is the peer's own text: whatever it holds, the master's log gets no line of
// it but the one that logs it, in either format, and no terminal escape.
TEST(Logging, AWorkersNameForgesNoLineOfTheMastersLog) {
  const std::string name =
      "evil\n2026-01-01T00:00:00.000 info [master] forged\r\n"
      R"({"time":"2026-01-01T00:00:00.000Z","level":"info","component":"master","pid":1,)"
      R"("msg":"forged"})"
      "\x1B[2J";
  for (const std::string format : {"text", "json"}) {
    SCOPED_TRACE(format);
    Cluster cluster({"--log-format", format});
    cluster.StartMaster();
    Process& worker = cluster.StartWorker(name, {"--log-format", format});
    ASSERT_TRUE(
        WaitFor([&] { return absl::StrContains(cluster.master().Log(), "attached"); }, seconds(20)))
        << cluster.master().Log() << worker.Log();
    worker.Signal(SIGTERM);
    EXPECT_EQ(worker.Wait(seconds(30)), 0) << worker.Log();
    cluster.KillMaster(SIGTERM);

    const std::string log = cluster.master().Log();
    EXPECT_FALSE(absl::StrContains(log, "\x1B")) << log;
    // The name's text is only ever on a line that names the worker (attached, left ...).
    int naming = 0;
    for (const std::string& line : std::vector<std::string>(absl::StrSplit(log, '\n'))) {
      const size_t forged = line.find("forged");
      if (forged == std::string::npos) continue;
      ++naming;
      EXPECT_LT(line.find("worker evil"), forged) << line;
    }
    EXPECT_GE(naming, 1) << log;
    if (format == "json") {
      const std::vector<std::string> attached = Messages(JsonLines(log), "broker");
      EXPECT_TRUE(std::any_of(attached.begin(), attached.end(), [](const std::string& m) {
        return absl::StartsWith(m, "worker evil") && absl::StrContains(m, "attached");
      })) << log;
      EXPECT_FALSE(Messages(JsonLines(worker.Log()), "worker").empty()) << worker.Log();
    }
  }
}

// systemd-analyze, or why the test cannot run.
std::string SystemdAnalyzeMissing() {
  CommandResult r = RunCommand({"systemd-analyze", "--version"}, "", seconds(20));
  return r.exit_code == 0 ? "" : "systemd-analyze is not installed (Debian's systemd package)";
}

// A root holding the units, the binaries they start at the paths they name, and the system's
// own units they depend on: `systemd-analyze verify --root` checks them as installed.
class UnitRoot {
 public:
  UnitRoot() {
    fs::create_directories(dir_.File("usr/bin"));
    fs::create_directories(dir_.File("usr/lib/systemd"));
    fs::create_directories(dir_.File("etc/systemd/system"));
    fs::create_directory_symlink("usr/bin", dir_.File("bin"));
    for (const char* name : {"taskmaster", "taskworker"}) {
      fs::copy_file(Binary(name), dir_.File(std::string("usr/bin/") + name));
    }
    fs::copy_file(fs::canonical("/bin/kill"), dir_.File("usr/bin/kill"));
    fs::copy(fs::canonical("/lib/systemd/system"), dir_.File("usr/lib/systemd/system"),
             fs::copy_options::recursive | fs::copy_options::copy_symlinks);
    for (const auto& unit : fs::directory_iterator(kUnitDir)) {
      fs::copy_file(unit.path(),
                    dir_.File("etc/systemd/system/" + unit.path().filename().string()));
    }
  }
  std::string path() const { return dir_.File(""); }

 private:
  TempDir dir_;
};

TEST(Systemd, UnitsPassVerifyWithoutAWord) {
  if (std::string why = SystemdAnalyzeMissing(); !why.empty()) GTEST_SKIP() << why;
  UnitRoot root;
  for (const char* unit : {"taskmaster.service", "taskworker@worker.service"}) {
    CommandResult r =
        RunCommand({"systemd-analyze", "verify", "--root=" + root.path(), unit}, "", seconds(60));
    EXPECT_EQ(r.exit_code, 0) << unit << ": " << r.err;
    EXPECT_EQ(r.err, "") << unit;
    EXPECT_EQ(r.out, "") << unit;
  }
}

TEST(Systemd, UnitsExposureIsAtMostTwoAndAHalf) {
  if (std::string why = SystemdAnalyzeMissing(); !why.empty()) GTEST_SKIP() << why;
  static const std::regex overall(R"(Overall exposure level for \S+: ([0-9.]+))");
  for (const char* unit : {"taskmaster.service", "taskworker@.service"}) {
    CommandResult r = RunCommand(
        {"systemd-analyze", "security", "--offline=yes", kUnitDir + "/" + unit}, "", seconds(60));
    std::smatch m;
    const std::string text = r.out + r.err;
    ASSERT_TRUE(std::regex_search(text, m, overall)) << text;
    const double exposure = std::stod(m[1]);
    std::cout << "FIGURES " << unit << " exposure " << exposure << std::endl;
    EXPECT_LE(exposure, 2.5) << text;
  }
}

}  // namespace
}  // namespace taskmaster::testing
