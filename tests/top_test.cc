// taskctl top against a real master and worker: on a terminal (a tmux pane, read back with
// capture-pane and driven with send-keys) and as plain output.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tests/expect.h"
#include "tests/harness.h"

namespace taskmaster::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

// A tmux server of its own (its socket in a temp dir), killed with everything it runs at the
// end. Its one session, "top", runs a shell script.
class Tmux {
 public:
  static bool Installed() {
    try {
      return RunCommand({"tmux", "-V"}, "", seconds(10)).exit_code == 0;
    } catch (const std::runtime_error&) {
      return false;
    }
  }

  ~Tmux() { Run({"kill-server"}); }

  // Starts `script` (sh) in a detached 120x40 pane.
  void Start(const std::string& script) {
    WriteFile(dir_.File("script.sh"), script);
    CommandResult r = Run({"new-session", "-d", "-s", "top", "-x", "120", "-y", "40",
                           "sh " + dir_.File("script.sh")});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    // No status line: the pane is the window, as tall as resize-window says.
    r = Run({"set-option", "-t", "top", "status", "off"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  CommandResult Run(std::vector<std::string> args) const {
    args.insert(args.begin(), {"tmux", "-S", dir_.File("socket")});
    return RunCommand(args, "", seconds(10));
  }

  // What the pane shows.
  std::string Screen() const { return Run({"capture-pane", "-p", "-t", "top"}).out; }
  // Whether the pane shows the alternate screen, and whether its cursor is visible: "1 0" while
  // top runs, "0 1" once it restored the terminal.
  std::string Modes() const {
    return Run({"display-message", "-p", "-t", "top", "#{alternate_on} #{cursor_flag}"}).out;
  }

  // Waits until the screen holds every one of `parts`; returns the screen.
  std::string WaitForScreen(const std::vector<std::string>& parts,
                            milliseconds timeout = seconds(10)) const {
    std::string screen;
    const bool shown = WaitFor(
        [&] {
          screen = Screen();
          for (const std::string& part : parts) {
            if (!absl::StrContains(screen, part)) return false;
          }
          return true;
        },
        timeout, milliseconds(50));
    EXPECT_TRUE(shown) << "the pane never showed all of what was expected; it shows:\n" << screen;
    return screen;
  }

  const TempDir& dir() const { return dir_; }

 private:
  TempDir dir_;
};

// The words of the line of `screen` that starts with `start` (none if no line does).
std::vector<std::string> Words(const std::string& screen, const std::string& start) {
  for (absl::string_view line : absl::StrSplit(screen, '\n')) {
    if (absl::StartsWith(line, start)) return absl::StrSplit(line, ' ', absl::SkipEmpty());
  }
  return {};
}

// A master, a worker "mailer" with two slots on queue "emails", which has run three tasks and
// holds two more delayed by an hour.
class TopTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cluster_.StartMaster();
    cluster_.StartWorker("mailer", {"--threads", "2", "--queues", "emails"});
    ASSERT_TRUE(cluster_.WaitForWorkers(1));
    CommandResult ran = cluster_.Taskctl(
        {"submit", "--kind", "square", "--queue", "emails", "--wait", "1", "2", "3"});
    ASSERT_EQ(ran.exit_code, 0) << ran.err;
    CommandResult delayed = cluster_.Taskctl(
        {"submit", "--kind", "square", "--queue", "emails", "--delay", "1h", "4", "5"});
    ASSERT_EQ(delayed.exit_code, 0) << delayed.err;
  }

  // A script running top in a pane: it records the terminal's settings before and after, and
  // top's exit code once it ended, then keeps the pane open (on its input) for a look at it.
  // A trap lets the script go on after a Ctrl-C, which reaches top and the shell alike.
  std::string TopScript(const Tmux& tmux, const std::string& interval_ms) const {
    const std::string& d = tmux.dir().path();
    return "trap : INT\nstty -g > " + d + "/stty.before\n" + Binary("taskctl") + " --master " +
           cluster_.address() + " --token-file " + cluster_.dir().File("submit.token") +
           " top --interval-ms " + interval_ms + "\ncode=$?\nstty -g > " + d +
           "/stty.after\necho $code > " + d + "/code.tmp && mv " + d + "/code.tmp " + d +
           "/code\nexec cat > /dev/null\n";
  }

  // Waits (up to `timeout`) for the script's record of top's exit code.
  static std::string ExitCode(const Tmux& tmux, milliseconds timeout) {
    std::string code;
    WaitFor(
        [&] {
          code = ReadFile(tmux.dir().File("code"));
          return !code.empty();
        },
        timeout);
    return code;
  }

  static void ExpectTerminalRestored(const Tmux& tmux) {
    EXPECT_EQ(tmux.Modes(), "0 1\n") << "alternate screen off, cursor shown";
    const std::string before = ReadFile(tmux.dir().File("stty.before"));
    EXPECT_FALSE(before.empty());
    EXPECT_EQ(ReadFile(tmux.dir().File("stty.after")), before) << "the terminal's settings";
  }

  Cluster cluster_;
};

TEST_F(TopTest, LiveViewOnATerminalRedrawsOnResizeAndQuitsAtOnceOnQ) {
  if (!Tmux::Installed()) GTEST_SKIP() << "tmux is not installed (scripts/deps.sh installs it)";
  Tmux tmux;
  // Refreshes 10 s apart: the resize and the q below are handled well before the next one.
  tmux.Start(TopScript(tmux, "10000"));
  const std::string screen = tmux.WaitForScreen({"emails", "mailer", "tasks/s"});
  EXPECT_EQ(tmux.Modes(), "1 0\n") << "alternate screen on, cursor hidden";
  EXPECT_CONTAINS(screen, "master " + cluster_.address());
  EXPECT_CONTAINS(screen,
                  "workers 1 connected  slots 0/2 busy  tasks 2 pending 0 leased  - tasks/s");
  // PENDING DELAYED LEASED OLDEST DONE/s FAILED DEAD; no rate before a second refresh.
  EXPECT_EQ(Words(screen, "emails"),
            (std::vector<std::string>{"emails", "2", "2", "0", "-", "-", "0", "0"}))
      << screen;
  const std::vector<std::string> mailer = Words(screen, "mailer");
  ASSERT_EQ(mailer.size(), 7u) << screen;  // WORKER HOST SLOTS RUNNING STUCK STATE HEARD
  EXPECT_EQ(std::vector<std::string>(mailer.begin() + 2, mailer.end() - 1),
            (std::vector<std::string>{"2", "0", "0", "connected"}));

  // Seven rows leave room for one table row: the worker's. Shrinking the pane alone would keep
  // its top rows, the queue's among them.
  ASSERT_EQ(tmux.Run({"resize-window", "-t", "top", "-x", "100", "-y", "7"}).exit_code, 0);
  const std::string small = tmux.WaitForScreen({"mailer"}, seconds(3));
  EXPECT_TRUE(Words(small, "emails").empty()) << small;

  const auto asked = std::chrono::steady_clock::now();
  ASSERT_EQ(tmux.Run({"send-keys", "-t", "top", "q"}).exit_code, 0);
  EXPECT_EQ(ExitCode(tmux, seconds(3)), "0\n");
  EXPECT_LT(std::chrono::steady_clock::now() - asked, seconds(3));
  ExpectTerminalRestored(tmux);
}

TEST_F(TopTest, KeepsTheLastDataWhileTheMasterIsAwayAndCtrlCRestoresTheTerminal) {
  if (!Tmux::Installed()) GTEST_SKIP() << "tmux is not installed (scripts/deps.sh installs it)";
  Tmux tmux;
  tmux.Start(TopScript(tmux, "200"));
  tmux.WaitForScreen({"emails", "mailer"});
  cluster_.KillMaster(SIGKILL);
  const std::string screen =
      tmux.WaitForScreen({"refresh failed (retrying): ", "the data below is", "emails"});
  EXPECT_CONTAINS(screen, cluster_.address());
  ASSERT_EQ(tmux.Run({"send-keys", "-t", "top", "C-c"}).exit_code, 0);
  EXPECT_EQ(ExitCode(tmux, seconds(5)), "130\n") << "ended by SIGINT, as without the handler";
  ExpectTerminalRestored(tmux);
}

TEST_F(TopTest, PlainSnapshotsWhenNotOnATerminal) {
  CommandResult r = cluster_.Taskctl({"top", "--count", "2", "--interval-ms", "100"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find('\033'), std::string::npos) << "no escape codes";
  // Each snapshot starts with its header; a blank line ends all but the last.
  std::vector<std::string> snapshots;
  for (absl::string_view line : absl::StrSplit(r.out, '\n')) {
    if (absl::StartsWith(line, "master ")) snapshots.emplace_back();
    ASSERT_FALSE(snapshots.empty()) << r.out;
    absl::StrAppend(&snapshots.back(), line, "\n");
  }
  ASSERT_EQ(snapshots.size(), 2u) << r.out;
  EXPECT_TRUE(absl::EndsWith(snapshots[0], "\n\n")) << snapshots[0];
  for (const std::string& snapshot : snapshots) {
    EXPECT_TRUE(absl::StartsWith(snapshot, "master " + cluster_.address())) << snapshot;
    EXPECT_EQ(Words(snapshot, "emails")[1], "2") << snapshot;  // pending
    EXPECT_EQ(Words(snapshot, "mailer").size(), 7u) << snapshot;
  }
  // The second has a rate: nothing finished in between.
  EXPECT_CONTAINS(snapshots[1], "  0.0 tasks/s");

  // A master that does not answer: each snapshot says so, and the exit code too.
  cluster_.KillMaster(SIGKILL);
  CommandResult away = cluster_.Taskctl({"top", "--count", "1"});
  EXPECT_EQ(away.exit_code, 2);
  EXPECT_CONTAINS(away.out, "refresh failed (retrying): cannot reach the master");
  EXPECT_CONTAINS(away.err, "taskctl: cannot reach the master");
}

}  // namespace
}  // namespace taskmaster::testing
