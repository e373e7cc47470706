// The status page on the master's admin port, as a browser shows it: headless Chromium loads it
// while tasks run, its numbers are compared with `taskctl stats`, and a screenshot of it is kept
// as an artifact of the build. Skipped where Chromium is not installed.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "tests/harness.h"
#include "tests/integration_common.h"

extern char** environ;

namespace taskmaster::testing {
namespace {

using nlohmann::json;
using std::chrono::milliseconds;
using std::chrono::seconds;

// Chromium in PATH, or nullopt.
std::optional<std::string> FindChromium() {
  const char* path = std::getenv("PATH");
  if (path == nullptr) return std::nullopt;
  const std::vector<std::string> dirs = absl::StrSplit(path, ':', absl::SkipEmpty());
  for (const std::string& dir : dirs) {
    const std::string candidate = absl::StrCat(dir, "/chromium");
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return std::nullopt;
}

// The port of "admin pages on http://127.0.0.1:PORT" in the master's log, or 0.
int AdminPort(const Process& master) {
  static const std::regex kLine(R"(admin pages on http://127\.0\.0\.1:(\d+))");
  std::smatch match;
  const std::string log = master.Log();
  return std::regex_search(log, match, kLine) ? std::stoi(match[1]) : 0;
}

struct BrowserRun {
  int exit_code = -1;  // -1: killed at the timeout
  std::string out;
  std::string err;
  int left_behind = 0;  // processes of this run still alive after it (killed then)
};

// The live processes whose command line mentions `text`.
std::vector<pid_t> ProcessesMentioning(const std::string& text) {
  std::vector<pid_t> pids;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    pid_t pid = 0;
    if (!absl::SimpleAtoi(entry.path().filename().string(), &pid)) continue;
    if (ReadFile(entry.path() / "cmdline").find(text) != std::string::npos) pids.push_back(pid);
  }
  return pids;
}

// Runs headless Chromium on `url` with `flags`, for at most `timeout`, and leaves nothing of it
// running. Chromium starts helpers: zygotes and renderers in its process group, which is its
// own here and killed as a whole, and crash handlers that leave the group. Each of them names
// the run's temporary directory (the profile, or the crash database under HOME) on its command
// line, which is how the ones left are found.
BrowserRun RunChromium(const std::string& chromium, const std::string& url,
                       const std::vector<std::string>& flags, milliseconds timeout) {
  TempDir dir;
  // The page is the test's own; the sandbox needs namespaces that containers and root lack.
  std::vector<std::string> argv = {chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                   "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars",
                                   "--enable-logging=stderr", "--v=0",
                                   "--user-data-dir=" + dir.File("profile"),
                                   // Page time runs ahead while nothing is loading: the page
                                   // refreshes several times without the test waiting as long.
                                   "--virtual-time-budget=8000"};
  argv.insert(argv.end(), flags.begin(), flags.end());
  argv.push_back(url);
  // Nothing written to the user's home: crash reports, caches and settings go to `dir`.
  std::vector<std::string> env = {"HOME=" + dir.path(), "XDG_CONFIG_HOME=" + dir.File("config"),
                                  "XDG_CACHE_HOME=" + dir.File("cache")};
  for (char** e = environ; *e; ++e) {
    const std::string_view entry(*e);
    if (entry.rfind("HOME=", 0) != 0 && entry.rfind("XDG_", 0) != 0) env.emplace_back(entry);
  }

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, dir.File("out").c_str(), O_WRONLY | O_CREAT, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, dir.File("err").c_str(), O_WRONLY | O_CREAT, 0644);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t empty;
  sigemptyset(&empty);
  posix_spawnattr_setsigmask(&attr, &empty);
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP);
  std::vector<char*> args, envp;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  for (const std::string& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, args[0], &actions, &attr, args.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  BrowserRun run;
  if (rc != 0) {
    run.err = "cannot start " + chromium;
    return run;
  }

  // WNOWAIT leaves the browser a zombie, so that its pid, the group's id, stays taken until the
  // group is killed.
  const bool exited = WaitFor(
      [&] {
        siginfo_t info{};
        return waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 &&
               info.si_pid == pid;
      },
      timeout, milliseconds(50));
  kill(-pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  if (exited) run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  // Helpers end once the browser has: give them a moment, then kill what is left.
  const std::string mark = dir.path() + "/";
  WaitFor([&] { return ProcessesMentioning(mark).empty(); }, seconds(10), milliseconds(50));
  for (pid_t left : ProcessesMentioning(mark)) {
    kill(left, SIGKILL);
    ++run.left_behind;
  }
  run.out = ReadFile(dir.File("out"));
  run.err = ReadFile(dir.File("err"));
  return run;
}

// The text from `start` to the first `end` after it, or "".
std::string Slice(const std::string& text, const std::string& start, const std::string& end) {
  const size_t from = text.find(start);
  if (from == std::string::npos) return "";
  const size_t to = text.find(end, from);
  return to == std::string::npos ? "" : text.substr(from, to - from);
}

// The data-value of the first element in `html` with data-`attribute`="`name`", or nullopt.
std::optional<int64_t> Value(const std::string& html, const std::string& attribute,
                             const std::string& name) {
  const std::regex element("data-" + attribute + "=\"" + name + "\"[^>]*data-value=\"(-?[0-9]+)\"");
  std::smatch match;
  if (!std::regex_search(html, match, element)) return std::nullopt;
  return std::stoll(match[1]);
}

// How many times `needle` occurs in `text`.
size_t Count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

json Stats(const Cluster& cluster) {
  const CommandResult r = cluster.Taskctl({"--format", "json", "stats"});
  return r.exit_code == 0 ? json::parse(r.out, nullptr, /*allow_exceptions=*/false) : json();
}

const json* QueueIn(const json& stats, const std::string& queue) {
  if (!stats.is_object() || !stats.contains("queues")) return nullptr;
  for (const json& q : stats.at("queues")) {
    if (q.value("queue", "") == queue) return &q;
  }
  return nullptr;
}

TEST(StatusPage, ShowsWhatTaskctlStatsSaysAndKeepsAScreenshot) {
  const std::optional<std::string> chromium = FindChromium();
  if (!chromium) GTEST_SKIP() << "chromium is not installed (scripts/deps.sh installs it)";

  Cluster cluster;
  cluster.StartMaster();
  // Three slots: two long sleepers hold two, the quick tasks pass through the third.
  cluster.StartWorker("page-worker", {"--threads", "3", "--queues", "emails,reports"});
  ASSERT_TRUE(cluster.WaitForWorkers(1));
  int port = 0;
  ASSERT_TRUE(WaitFor([&] { return (port = AdminPort(cluster.master())) > 0; }, seconds(10)))
      << cluster.master().Log();
  // The master has tokens: the page asks for the admin token, which a browser sends as the
  // password of Basic authentication (here from the URL, then for every request of the page).
  const std::string url = absl::StrCat("http://admin:", kAdminToken, "@127.0.0.1:", port, "/");

  // Quick squares that succeed, and tasks that fail once and are dead (no retry left to change
  // the counts); one error is markup, which the page must show as text.
  const CommandResult squares =
      cluster.Taskctl({"--format", "json", "submit", "--kind", "square", "--queue", "emails", "1",
                       "2", "3", "4", "5", "6", "7", "8"});
  ASSERT_EQ(squares.exit_code, 0) << squares.err;
  const std::string markup = "<b id=injected>smtp 550</b> mailbox unavailable";
  const CommandResult failing =
      cluster.Taskctl({"--format", "json", "submit", "--kind", "fail", "--queue", "emails",
                       "--max-attempts", "1", markup, "relay refused: quota exceeded"});
  ASSERT_EQ(failing.exit_code, 0) << failing.err;
  const std::vector<uint64_t> failed_ids = SubmittedIds(failing);
  ASSERT_EQ(failed_ids.size(), 2u) << failing.out;
  // Sleepers far longer than the test: leased for all of it.
  const CommandResult sleepers =
      cluster.Taskctl({"submit", "--kind", "sleep", "--queue", "reports", "120000", "120000"});
  ASSERT_EQ(sleepers.exit_code, 0) << sleepers.err;

  json stats;
  ASSERT_TRUE(WaitFor(
      [&] {
        stats = Stats(cluster);
        const json* emails = QueueIn(stats, "emails");
        const json* reports = QueueIn(stats, "reports");
        return emails && reports && emails->value("succeeded", -1) == 8 &&
               emails->value("dead", -1) == 2 && emails->value("pending", -1) == 0 &&
               emails->value("leased", -1) == 0 && reports->value("pending", -1) == 0 &&
               reports->value("leased", -1) == 2 && stats.contains("workers") &&
               stats["workers"].size() == 1 && stats["workers"][0].value("running", -1) == 2;
      },
      seconds(30), milliseconds(100)))
      << stats.dump();

  const BrowserRun dump = RunChromium(*chromium, url, {"--dump-dom"}, seconds(60));
  EXPECT_EQ(dump.left_behind, 0) << "chromium left processes running";
  ASSERT_EQ(dump.exit_code, 0) << dump.err;
  const std::string& dom = dump.out;
  ASSERT_NE(dom.find("data-loaded=\"1\""), std::string::npos) << "no data shown:\n" << dom;
  // A script error or a refused load (the page's own policy) would be logged from the console.
  const std::vector<std::string> log = absl::StrSplit(dump.err, '\n');
  for (const std::string& line : log) {
    if (line.find(":CONSOLE") == std::string::npos) continue;
    EXPECT_EQ(line.find("Uncaught"), std::string::npos) << line;
    EXPECT_EQ(line.find("Refused"), std::string::npos) << line;
  }
  const json after = Stats(cluster);
  ASSERT_TRUE(after.is_object());
  EXPECT_EQ(after.at("queues"), stats.at("queues")) << "the scenario was meant to hold still";

  EXPECT_NE(dom.find("class=\"state state-ok\">serving<"), std::string::npos);
  static const std::regex kStatusTime("data-status-time=\"([0-9]+)\"");
  std::smatch time;
  ASSERT_TRUE(std::regex_search(dom, time, kStatusTime));
  EXPECT_GT(std::stoll(time[1]), 0);

  // Per queue, each count the page shows is the one taskctl reports.
  int64_t pending = 0, leased = 0;
  for (const json& q : after.at("queues")) {
    const std::string name = q.at("queue");
    SCOPED_TRACE("queue " + name);
    const std::string row = Slice(dom, "<tr data-queue=\"" + name + "\"", "</tr>");
    ASSERT_FALSE(row.empty()) << "queue " << name << " is not on the page";
    EXPECT_EQ(Value(row, "field", "pending"), q.at("pending").get<int64_t>());
    EXPECT_EQ(Value(row, "field", "delayed"), q.at("delayed").get<int64_t>());
    EXPECT_EQ(Value(row, "field", "leased"), q.at("leased").get<int64_t>());
    EXPECT_EQ(Value(row, "field", "dead"), q.at("dead").get<int64_t>());
    EXPECT_EQ(Value(row, "field", "failed"), q.at("failed").get<int64_t>());
    EXPECT_EQ(Value(row, "field", "done"), q.at("succeeded").get<int64_t>() +
                                               q.at("dead").get<int64_t>() +
                                               q.at("cancelled").get<int64_t>());
    std::smatch succeeded;
    ASSERT_TRUE(std::regex_search(row, succeeded, std::regex("data-succeeded=\"([0-9]+)\"")));
    EXPECT_EQ(std::stoll(succeeded[1]), q.at("succeeded").get<int64_t>());
    pending += q.at("pending").get<int64_t>();
    leased += q.at("leased").get<int64_t>();
  }
  EXPECT_EQ(Count(dom, "<tr data-queue="), after.at("queues").size());
  EXPECT_EQ(Value(dom, "tile", "pending"), pending);
  EXPECT_EQ(Value(dom, "tile", "leased"), leased);

  // Workers: as many rows as taskctl lists, each with its slots and load.
  EXPECT_EQ(Count(dom, "<tr data-worker="), after.at("workers").size());
  EXPECT_EQ(Value(dom, "tile", "workers"), static_cast<int64_t>(after.at("workers").size()));
  for (const json& w : after.at("workers")) {
    const std::string name = w.at("name");
    SCOPED_TRACE("worker " + name);
    const std::string row = Slice(dom, "<tr data-worker=\"" + name + "\"", "</tr>");
    ASSERT_FALSE(row.empty()) << "worker " << name << " is not on the page";
    EXPECT_EQ(Value(row, "field", "slots"), w.at("slots").get<int64_t>());
    EXPECT_EQ(Value(row, "field", "running"), w.at("running").get<int64_t>());
    EXPECT_EQ(Value(row, "field", "stuck"), w.at("stuck").get<int64_t>());
    EXPECT_NE(row.find(">connected<"), std::string::npos) << row;
  }

  // Failures: one row per failed attempt, each dead, with its error shown as text.
  EXPECT_EQ(Count(dom, "<tr data-task="), failed_ids.size());
  for (uint64_t id : failed_ids) {
    const std::string row = Slice(dom, absl::StrCat("<tr data-task=\"", id, "\""), "</tr>");
    ASSERT_FALSE(row.empty()) << "the failure of task " << id << " is not on the page";
    EXPECT_EQ(Value(row, "field", "dead"), 1) << row;
  }
  EXPECT_NE(dom.find("relay refused: quota exceeded"), std::string::npos);
  EXPECT_NE(dom.find("&lt;b id=injected&gt;smtp 550&lt;/b&gt;"), std::string::npos);
  EXPECT_EQ(dom.find("<b id=\"injected\">"), std::string::npos) << "an error became markup";

  // The screenshot, kept under the build directory.
  std::filesystem::create_directories(std::filesystem::path(STATUS_PAGE_SCREENSHOT).parent_path());
  std::filesystem::remove(STATUS_PAGE_SCREENSHOT);
  const BrowserRun shot = RunChromium(
      *chromium, url,
      {"--window-size=1400,1000", std::string("--screenshot=") + STATUS_PAGE_SCREENSHOT},
      seconds(60));
  EXPECT_EQ(shot.left_behind, 0) << "chromium left processes running";
  ASSERT_EQ(shot.exit_code, 0) << shot.err;
  const std::string png = ReadFile(STATUS_PAGE_SCREENSHOT);
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8)) << "not a PNG";
  EXPECT_GT(png.size(), 10'000u) << "a blank screenshot?";
}

}  // namespace
}  // namespace taskmaster::testing
