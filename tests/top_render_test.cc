// Unit tests of taskctl top's frame: what it shows from the master's stats, and how it fits a
// terminal.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "client/top.h"

namespace taskmaster {
namespace {

using std::chrono::seconds;

v1::QueueStats Queue(const std::string& name, int64_t succeeded, int64_t dead = 0) {
  v1::QueueStats q;
  q.set_queue(name);
  q.set_succeeded(succeeded);
  q.set_dead(dead);
  return q;
}

v1::WorkerInfo Worker(const std::string& name, bool connected, int32_t slots, int32_t running) {
  v1::WorkerInfo w;
  w.set_worker_id("id-" + name);
  w.set_name(name);
  w.set_host("host-" + name);
  w.set_connected(connected);
  w.set_slots(slots);
  w.set_running(running);
  return w;
}

// A frame of an unlimited terminal at 12:00:00 UTC, whose latest sample is `stats`.
TopFrame FrameOf(const v1::StatsResponse& stats) {
  TopFrame frame;
  frame.master = "127.0.0.1:7070";
  frame.now = absl::FromUnixSeconds(12 * 3'600);
  frame.zone = absl::UTCTimeZone();
  frame.steady_now = std::chrono::steady_clock::time_point() + seconds(100);
  frame.current = TopSample{stats, frame.steady_now};
  return frame;
}

// The line of `lines` that starts with `start`, or "" (with a failure saying which).
std::string LineStarting(const std::vector<std::string>& lines, const std::string& start) {
  for (const std::string& line : lines) {
    if (absl::StartsWith(line, start)) return line;
  }
  ADD_FAILURE() << "no line starts with '" << start << "' in:\n" << absl::StrJoin(lines, "\n");
  return "";
}

TEST(TopFrame, ShowsTotalsRatesQueuesAndWorkers) {
  v1::StatsResponse before;
  *before.add_queues() = Queue("emails", 10);
  *before.add_queues() = Queue("reports", 4, 1);
  v1::StatsResponse now;
  v1::QueueStats emails = Queue("emails", 25, 5);  // 20 more done in 2 s
  emails.set_pending(7);
  emails.set_delayed(2);
  emails.set_leased(3);
  emails.set_failed(6);
  emails.set_oldest_ready_age_ms(125'000);
  *now.add_queues() = emails;
  *now.add_queues() = Queue("reports", 5, 1);
  *now.add_queues() = Queue("fresh", 3);  // no earlier count: no rate yet
  v1::WorkerInfo stuck = Worker("b-worker", true, 4, 2);
  stuck.set_stuck(1);
  stuck.set_heartbeat_age_ms(3'000);
  *now.add_workers() = Worker("z-gone", false, 8, 0);
  *now.add_workers() = stuck;
  *now.add_workers() = Worker("a-worker", true, 2, 1);

  TopFrame frame = FrameOf(now);
  frame.previous = TopSample{before, frame.current->taken - seconds(2)};
  const std::vector<std::string> lines = RenderTop(frame);

  // Slots of connected workers only; a stuck handler's slot is busy.
  EXPECT_EQ(lines[0], "master 127.0.0.1:7070  12:00:00");
  EXPECT_EQ(lines[1],
            "workers 2 connected  slots 4/6 busy  tasks 7 pending 3 leased  12.0 tasks/s");
  EXPECT_EQ(LineStarting(lines, "QUEUE"),
            "QUEUE              PENDING DELAYED  LEASED  OLDEST  DONE/s  FAILED    DEAD");
  EXPECT_EQ(LineStarting(lines, "emails"),
            "emails                   7       2       3   2m05s    10.0       6       5");
  EXPECT_EQ(LineStarting(lines, "reports"),
            "reports                  0       0       0       -     0.5       0       1");
  EXPECT_TRUE(absl::StrContains(LineStarting(lines, "fresh"), "      -       0       0"));
  EXPECT_EQ(LineStarting(lines, "WORKER"),
            "WORKER               HOST             SLOTS RUNNING STUCK STATE          HEARD");
  EXPECT_EQ(LineStarting(lines, "b-worker"),
            "b-worker             host-b-worker        4       2     1 connected         3s");
  // Connected first, each part by name: the disconnected one comes last.
  std::vector<std::string> order;
  for (const std::string& line : lines) {
    for (const char* name : {"a-worker", "b-worker", "z-gone"}) {
      if (absl::StartsWith(line, name)) order.push_back(name);
    }
  }
  EXPECT_EQ(order, (std::vector<std::string>{"a-worker", "b-worker", "z-gone"}));
  EXPECT_TRUE(absl::StrContains(LineStarting(lines, "z-gone"), "disconnected"));
}

TEST(TopFrame, NoRatesWithoutAnEarlierSampleOrAfterTheMasterRestarted) {
  v1::StatsResponse now;
  *now.add_queues() = Queue("emails", 3);
  TopFrame first = FrameOf(now);
  EXPECT_TRUE(absl::EndsWith(RenderTop(first)[1], "  - tasks/s"));

  // Counts went down: the master restarted and counts from 0 again.
  v1::StatsResponse before;
  *before.add_queues() = Queue("emails", 50);
  TopFrame restarted = FrameOf(now);
  restarted.previous = TopSample{before, restarted.current->taken - seconds(1)};
  const std::vector<std::string> lines = RenderTop(restarted);
  EXPECT_TRUE(absl::EndsWith(lines[1], "  - tasks/s"));
  EXPECT_EQ(LineStarting(lines, "emails"),
            "emails                   0       0       0       -       -       0       0");
}

TEST(TopFrame, StringsFromTheMasterCannotReachTheTerminal) {
  v1::StatsResponse now;
  *now.add_workers() = Worker("evil\033[2J\033]0;owned\007", true, 1, 0);
  TopFrame frame = FrameOf(now);
  frame.error = absl::UnavailableError("bad \033[31mnews");
  for (const std::string& line : RenderTop(frame)) {
    EXPECT_EQ(line.find_first_of("\033\007"), std::string::npos) << line;
  }
  EXPECT_EQ(LineStarting(RenderTop(frame), "evil").substr(0, 20), "evil\\x1B[2J\\x1B]0;ow");
}

TEST(TopFrame, FitsTheTerminal) {
  v1::StatsResponse now;
  for (int i = 0; i < 3; ++i) *now.add_queues() = Queue("q" + std::to_string(i), i);
  for (int i = 0; i < 30; ++i) {
    *now.add_workers() =
        Worker("w" + std::to_string(10 + i) + "-with-a-long-name-cut-in-its-column", true, 1, 0);
  }
  // A name of characters of several bytes each is cut between characters, not inside one.
  *now.add_workers() = Worker(std::string(18, 'x') + "\u00e9\u00e9\u00e9", true, 1, 0);
  TopFrame frame = FrameOf(now);
  frame.rows = 15;
  frame.columns = 60;
  const std::vector<std::string> lines = RenderTop(frame);
  ASSERT_EQ(lines.size(), 15u) << absl::StrJoin(lines, "\n");
  for (const std::string& line : lines) {
    EXPECT_LE(line.size(), 60u) << line;
  }
  // The queues fit whole; the workers take the rest of the rows and say how many are left out.
  EXPECT_EQ(LineStarting(lines, "q2").substr(0, 2), "q2");
  EXPECT_EQ(LineStarting(lines, "w10-"),
            "w10-with-a-long-name host-w10-with-a-     1       0     0 co");
  EXPECT_EQ(lines.back(), "... 26 more workers");

  // Wider than the rows allow on both sides: each table gets half.
  for (int i = 3; i < 30; ++i) *now.add_queues() = Queue("q" + std::to_string(i), i);
  frame = FrameOf(now);
  frame.rows = 16;
  const std::vector<std::string> halves = RenderTop(frame);
  ASSERT_EQ(halves.size(), 16u);
  EXPECT_EQ(LineStarting(halves, "... "), "... 26 more queues");
  EXPECT_EQ(halves.back(), "... 27 more workers");

  // Room for one table row, which goes to the workers: the queues need more than half the room.
  v1::StatsResponse small;
  *small.add_queues() = Queue("emails", 1);
  *small.add_workers() = Worker("mailer", true, 1, 0);
  TopFrame tiny = FrameOf(small);
  tiny.rows = 7;
  const std::vector<std::string> seven = RenderTop(tiny);
  ASSERT_EQ(seven.size(), 7u) << absl::StrJoin(seven, "\n");
  EXPECT_TRUE(absl::StartsWith(seven[3], "QUEUE")) << seven[3];
  EXPECT_TRUE(absl::StartsWith(seven[6], "mailer")) << seven[6];

  frame.rows = 0;
  frame.columns = 0;
  const std::vector<std::string> whole = RenderTop(frame);
  EXPECT_EQ(whole.size(), 2 + 1 + 31 + 1 + 32u);  // header, blank, queues, blank, workers
  EXPECT_TRUE(absl::StrContains(LineStarting(whole, "xxx"), "xx\u00e9\u00e9 host-"));
}

TEST(TopFrame, AFailedRefreshIsShownWithTheAgeOfTheDataBelow) {
  v1::StatsResponse now;
  *now.add_queues() = Queue("emails", 3);
  TopFrame stale = FrameOf(now);
  stale.steady_now += seconds(75);
  stale.error = absl::UnavailableError("cannot reach the master at 127.0.0.1:7070");
  const std::vector<std::string> lines = RenderTop(stale);
  EXPECT_EQ(lines[1],
            "refresh failed (retrying): cannot reach the master at 127.0.0.1:7070; the data below "
            "is 1m15s old");
  EXPECT_EQ(LineStarting(lines, "emails").substr(0, 6), "emails");

  TopFrame nothing = FrameOf(now);
  nothing.current.reset();
  nothing.error = absl::PermissionDeniedError("the token is refused");
  EXPECT_EQ(
      RenderTop(nothing),
      (std::vector<std::string>{"master 127.0.0.1:7070  12:00:00",
                                "refresh failed (retrying): the token is refused; no data yet"}));
}

TEST(TopFrame, EmptyTablesSaySo) {
  const std::vector<std::string> lines = RenderTop(FrameOf(v1::StatsResponse()));
  EXPECT_EQ(lines[1], "workers 0 connected  slots 0/0 busy  tasks 0 pending 0 leased  - tasks/s");
  EXPECT_EQ(LineStarting(lines, "(no queues"), "(no queues yet)");
  EXPECT_EQ(LineStarting(lines, "(no workers"), "(no workers)");
}

}  // namespace
}  // namespace taskmaster
