#pragma once

// taskctl top: a live view of the master's queues and workers. The frame is drawn by a pure
// function (RenderTop) so that what it shows is tested without a terminal; RunTop does the rest.

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/commands.h"

namespace taskmaster {

// One answer of the master and when it came (rates divide by the steady time between two).
struct TopSample {
  v1::StatsResponse stats;
  std::chrono::steady_clock::time_point taken;
};

// What one frame is drawn from.
struct TopFrame {
  std::string master;  // the address, for the header
  absl::Time now;      // the header's clock, in `zone`
  absl::TimeZone zone;
  std::chrono::steady_clock::time_point steady_now;  // ages the last good data
  std::optional<TopSample> current;                  // the latest good answer
  std::optional<TopSample> previous;                 // the good answer before it: rates
  absl::Status error;  // why the latest refresh failed; OK when `current` is from it
  // The terminal's size; 0 draws everything at full width (plain output).
  int rows = 0;
  int columns = 0;
};

// The frame's lines: the master and the time, the last refresh's error if any, the totals and
// throughput, then a table of queues and one of workers, cut to rows x columns. Strings from the
// master are made printable; no line holds an escape sequence.
std::vector<std::string> RenderTop(const TopFrame& frame);

struct TopArgs {
  std::chrono::milliseconds interval{1'000};
  int64_t count = 0;  // refreshes before exiting; 0: until q (or, in plain output, forever)
};

// On a terminal (stdin and stdout both): a full-screen view redrawn every interval until q,
// the terminal restored on every way out (a signal is re-raised once it is). Otherwise one plain
// snapshot per interval, separated by blank lines. A failed refresh is shown and retried. Exits
// 0, or kExitError when the last refresh of a --count run failed.
int RunTop(const Client& client, const TopArgs& args, const Console& console);

}  // namespace taskmaster
