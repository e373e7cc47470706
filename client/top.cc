#include "client/top.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <map>
#include <memory>
#include <ostream>
#include <span>
#include <string_view>
#include <thread>
#include <tuple>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/util.h"

namespace taskmaster {
namespace {

using Steady = std::chrono::steady_clock;

// ---- Drawing ----

struct Column {
  const char* title;
  size_t width;
  bool left;  // text; numbers are right-aligned
};

// Both tables fit 80 columns.
constexpr Column kQueueColumns[] = {
    {"QUEUE", 18, true},  {"PENDING", 7, false}, {"DELAYED", 7, false}, {"LEASED", 7, false},
    {"OLDEST", 7, false}, {"DONE/s", 7, false},  {"FAILED", 7, false},  {"DEAD", 7, false}};
constexpr Column kWorkerColumns[] = {
    {"WORKER", 20, true}, {"HOST", 16, true},  {"SLOTS", 5, false}, {"RUNNING", 7, false},
    {"STUCK", 5, false},  {"STATE", 12, true}, {"HEARD", 7, false}};

bool StartsCharacter(char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; }

// Characters, not bytes: a worker's name may hold any UTF-8 (Printable keeps it).
size_t Characters(std::string_view s) {
  return static_cast<size_t>(std::count_if(s.begin(), s.end(), StartsCharacter));
}

// The first `width` characters of `s`, never cutting one in two.
std::string Cut(std::string_view s, size_t width) {
  size_t seen = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (StartsCharacter(s[i]) && seen++ == width) return std::string(s.substr(0, i));
  }
  return std::string(s);
}

std::string Row(std::span<const Column> columns, const std::vector<std::string>& cells) {
  std::string row;
  for (size_t i = 0; i < columns.size(); ++i) {
    const std::string text = Cut(cells[i], columns[i].width);
    const std::string pad(columns[i].width - Characters(text), ' ');
    absl::StrAppend(&row, i == 0 ? "" : " ", columns[i].left ? "" : pad, text,
                    columns[i].left ? pad : "");
  }
  return row;
}

std::string TitleRow(std::span<const Column> columns) {
  std::vector<std::string> titles;
  for (const Column& c : columns) titles.push_back(c.title);
  return Row(columns, titles);
}

// "42s", "3m04s", "2h05m", "6d03h".
std::string Age(int64_t ms) {
  const int64_t s = std::max<int64_t>(ms, 0) / 1000;
  if (s < 60) return absl::StrCat(s, "s");
  if (s < 3'600) return absl::StrCat(s / 60, "m", absl::Dec(s % 60, absl::kZeroPad2), "s");
  if (s < 86'400) {
    return absl::StrCat(s / 3'600, "h", absl::Dec(s % 3'600 / 60, absl::kZeroPad2), "m");
  }
  return absl::StrCat(s / 86'400, "d", absl::Dec(s % 86'400 / 3'600, absl::kZeroPad2), "h");
}

// Tasks that finished, whichever way: what throughput counts.
int64_t Done(const v1::QueueStats& q) { return q.succeeded() + q.dead() + q.cancelled(); }

// Per second between two counts, to a tenth; "-" without an earlier count, or when the count
// went down (the master restarted and counts from 0 again).
std::string Rate(std::optional<int64_t> before, int64_t after, double seconds) {
  if (!before || seconds <= 0 || after < *before) return "-";
  const int64_t tenths = std::llround(static_cast<double>(after - *before) * 10 / seconds);
  return absl::StrCat(tenths / 10, ".", tenths % 10);
}

// The table's title and as many of its rows as `shown` allows; when some do not fit, the last
// line shown says how many are missing.
void AppendTable(std::vector<std::string>& lines, std::span<const Column> columns,
                 const std::vector<std::string>& rows, size_t shown, const char* what) {
  lines.push_back(TitleRow(columns));
  if (shown >= rows.size()) {
    lines.insert(lines.end(), rows.begin(), rows.end());
    return;
  }
  if (shown == 0) return;
  lines.insert(lines.end(), rows.begin(), rows.begin() + static_cast<ptrdiff_t>(shown - 1));
  absl::StrAppend(&lines.emplace_back(), "... ", rows.size() - shown + 1, " more ", what);
}

// The header's totals, summed over the tables' rows.
struct Totals {
  int64_t pending = 0, leased = 0, done = 0;
  int64_t connected = 0, busy = 0, slots = 0;
};

// One row per queue, with its rate since the previous sample.
std::vector<std::string> QueueRows(const TopFrame& frame, double seconds, Totals& totals) {
  std::map<std::string, int64_t> done_before;
  if (frame.previous) {
    for (const v1::QueueStats& q : frame.previous->stats.queues()) done_before[q.queue()] = Done(q);
  }
  std::vector<std::string> rows;
  for (const v1::QueueStats& q : frame.current->stats.queues()) {
    totals.pending += q.pending();
    totals.leased += q.leased();
    totals.done += Done(q);
    const auto before = done_before.find(q.queue());
    rows.push_back(Row(
        kQueueColumns,
        {Printable(q.queue()), absl::StrCat(q.pending()), absl::StrCat(q.delayed()),
         absl::StrCat(q.leased()), q.oldest_ready_age_ms() > 0 ? Age(q.oldest_ready_age_ms()) : "-",
         Rate(before == done_before.end() ? std::nullopt : std::optional(before->second), Done(q),
              seconds),
         absl::StrCat(q.failed()), absl::StrCat(q.dead())}));
  }
  if (rows.empty()) rows.push_back("(no queues yet)");
  return rows;
}

// One row per worker: connected ones first, then by name, so rows stay in place from one frame
// to the next.
std::vector<std::string> WorkerRows(const v1::StatsResponse& stats, Totals& totals) {
  std::vector<const v1::WorkerInfo*> sorted;
  for (const v1::WorkerInfo& w : stats.workers()) sorted.push_back(&w);
  std::sort(sorted.begin(), sorted.end(), [](const v1::WorkerInfo* a, const v1::WorkerInfo* b) {
    return std::tuple(!a->connected(), a->name(), a->host(), a->worker_id()) <
           std::tuple(!b->connected(), b->name(), b->host(), b->worker_id());
  });
  std::vector<std::string> rows;
  for (const v1::WorkerInfo* w : sorted) {
    if (w->connected()) {
      ++totals.connected;
      totals.slots += w->slots();
      // A stuck handler keeps its slot after its task is gone.
      totals.busy += std::min(w->slots(), w->running() + w->stuck());
    }
    rows.push_back(
        Row(kWorkerColumns, {Printable(w->name()), Printable(w->host()), absl::StrCat(w->slots()),
                             absl::StrCat(w->running()), absl::StrCat(w->stuck()), WorkerState(*w),
                             Age(w->heartbeat_age_ms())}));
  }
  if (rows.empty()) rows.push_back("(no workers)");
  return rows;
}

// How many rows of each table `room` rows show: both tables whole when they fit; otherwise
// the one longer than half the room gives way.
std::pair<size_t, size_t> Share(size_t room, size_t queues, size_t workers) {
  if (queues + workers <= room) return {queues, workers};
  if (queues <= room / 2) return {queues, room - queues};
  if (workers <= room - room / 2) return {room - workers, workers};
  return {room / 2, room - room / 2};
}

}  // namespace

std::vector<std::string> RenderTop(const TopFrame& frame) {
  std::vector<std::string> lines;
  lines.push_back(absl::StrCat("master ", Printable(frame.master), "  ",
                               absl::FormatTime("%H:%M:%S", frame.now, frame.zone)));
  if (!frame.error.ok()) {
    const auto age = std::chrono::duration_cast<std::chrono::milliseconds>(
        frame.steady_now - (frame.current ? frame.current->taken : frame.steady_now));
    lines.push_back(absl::StrCat(
        "refresh failed (retrying): ", Printable(std::string(frame.error.message())), "; ",
        frame.current ? absl::StrCat("the data below is ", Age(age.count()), " old")
                      : "no data yet"));
  }
  if (frame.current) {
    const double seconds =
        frame.previous
            ? std::chrono::duration<double>(frame.current->taken - frame.previous->taken).count()
            : 0;
    std::optional<int64_t> done_before;
    if (frame.previous) {
      done_before = 0;
      for (const v1::QueueStats& q : frame.previous->stats.queues()) *done_before += Done(q);
    }
    Totals totals;
    const std::vector<std::string> queues = QueueRows(frame, seconds, totals);
    const std::vector<std::string> workers = WorkerRows(frame.current->stats, totals);
    lines.push_back(absl::StrCat("workers ", totals.connected, " connected  slots ", totals.busy,
                                 "/", totals.slots, " busy  tasks ", totals.pending, " pending ",
                                 totals.leased, " leased  ",
                                 Rate(done_before, totals.done, seconds), " tasks/s"));

    auto [shown_queues, shown_workers] = std::pair(queues.size(), workers.size());
    if (frame.rows > 0) {
      const size_t around = lines.size() + 4;  // these, the two titles and the blank lines
      const auto rows = static_cast<size_t>(frame.rows);
      std::tie(shown_queues, shown_workers) =
          Share(rows > around ? rows - around : 0, queues.size(), workers.size());
    }
    lines.emplace_back();
    AppendTable(lines, kQueueColumns, queues, shown_queues, "queues");
    lines.emplace_back();
    AppendTable(lines, kWorkerColumns, workers, shown_workers, "workers");
  }
  if (frame.rows > 0 && lines.size() > static_cast<size_t>(frame.rows)) lines.resize(frame.rows);
  if (frame.columns > 0) {
    for (std::string& line : lines) line = Cut(line, frame.columns);
  }
  return lines;
}

namespace {

// ---- Running ----

// Asks the master; keeps the last good answer (and the one before it, for rates) on failure.
void Refresh(const Client& client, TopFrame& frame) {
  absl::StatusOr<v1::StatsResponse> stats = client.Stats();
  frame.now = absl::Now();
  frame.steady_now = Steady::now();
  frame.error = stats.status();
  if (!stats.ok()) return;
  frame.previous = std::move(frame.current);
  frame.current = TopSample{*std::move(stats), frame.steady_now};
}

int RunPlain(const Client& client, const TopArgs& args, const Console& console, TopFrame& frame) {
  Steady::time_point next = Steady::now();
  // Unbounded without --count, as documented: plain output runs until killed.
  for (int64_t n = 0; args.count == 0 || n < args.count; ++n) {
    if (n > 0) {
      std::this_thread::sleep_until(next);
      console.out << "\n";
    }
    Refresh(client, frame);
    for (const std::string& line : RenderTop(frame)) console.out << line << "\n";
    console.out.flush();
    if (!console.out) return kExitError;  // the reader went away
    // A refresh slower than the interval delays the next one rather than bunching them up.
    next = std::max(next + args.interval, Steady::now());
  }
  return frame.error.ok() ? kExitOk : Fail(console, frame.error);
}

// The write end of the pipe the signal handler wakes the loop through: the handler may run on
// any thread (gRPC's too), and a pipe reaches poll() from all of them.
int signal_pipe_write = -1;

void OnSignal(int sig) {
  const int saved_errno = errno;
  const auto byte = static_cast<unsigned char>(sig);
  [[maybe_unused]] const ssize_t written = write(signal_pipe_write, &byte, 1);
  errno = saved_errno;
}

constexpr int kCaughtSignals[] = {SIGINT, SIGTERM, SIGHUP, SIGWINCH};

// While it lives, the signals above arrive as bytes on read_fd() instead of ending the process,
// so the terminal is restored before taskctl ends.
class SignalPipe {
 public:
  static absl::StatusOr<std::unique_ptr<SignalPipe>> Open() {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) {
      return absl::ErrnoToStatus(errno, "cannot make a pipe for signals");
    }
    return std::unique_ptr<SignalPipe>(new SignalPipe(fds[0], fds[1]));
  }
  ~SignalPipe() {
    for (size_t i = 0; i < std::size(kCaughtSignals); ++i) {
      sigaction(kCaughtSignals[i], &previous_[i], nullptr);
    }
    signal_pipe_write = -1;
    close(read_);
    close(write_);
  }
  SignalPipe(const SignalPipe&) = delete;
  SignalPipe& operator=(const SignalPipe&) = delete;
  int read_fd() const { return read_; }

 private:
  SignalPipe(int read, int write) : read_(read), write_(write) {
    signal_pipe_write = write_;
    struct sigaction action = {};
    action.sa_handler = OnSignal;
    action.sa_flags = SA_RESTART;  // gRPC's threads' calls go on undisturbed
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < std::size(kCaughtSignals); ++i) {
      sigaction(kCaughtSignals[i], nullptr, &previous_[i]);
      // One ignored from the start (nohup) stays ignored.
      if (previous_[i].sa_handler != SIG_IGN) sigaction(kCaughtSignals[i], &action, nullptr);
    }
  }

  int read_, write_;
  struct sigaction previous_[std::size(kCaughtSignals)];
};

// The full-screen mode while it lives: the alternate screen (the shell's screen comes back
// as it was), no cursor, and each key read as it is typed, without echo. Ctrl-C still sends
// SIGINT (ISIG stays), which SignalPipe turns into a clean exit.
class FullScreen {
 public:
  static absl::StatusOr<std::unique_ptr<FullScreen>> Enter(std::ostream& out) {
    termios saved;
    if (tcgetattr(STDIN_FILENO, &saved) != 0) {
      return absl::ErrnoToStatus(errno, "cannot read the terminal's settings");
    }
    termios raw = saved;
    raw.c_lflag &= ~static_cast<tcflag_t>(ICANON | ECHO);
    raw.c_cc[VMIN] = 1;
    raw.c_cc[VTIME] = 0;
    if (tcsetattr(STDIN_FILENO, TCSANOW, &raw) != 0) {
      return absl::ErrnoToStatus(errno, "cannot set the terminal to read keys one by one");
    }
    return std::unique_ptr<FullScreen>(new FullScreen(out, saved));
  }
  ~FullScreen() {
    out_ << "\033[?25h\033[?1049l" << std::flush;
    tcsetattr(STDIN_FILENO, TCSANOW, &saved_);
  }
  FullScreen(const FullScreen&) = delete;
  FullScreen& operator=(const FullScreen&) = delete;

  // The terminal's size now (24x80 if it does not say).
  static std::pair<int, int> Size() {
    winsize size = {};
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &size) != 0 || size.ws_row == 0 || size.ws_col == 0) {
      return {24, 80};
    }
    return {size.ws_row, size.ws_col};
  }

  // Each line in place, cleared first; then the rows below cleared. Nothing scrolls: RenderTop
  // gives at most `rows` lines, none wider than the screen.
  void Draw(const std::vector<std::string>& lines, int rows) {
    std::string screen;
    for (size_t i = 0; i < lines.size(); ++i) {
      absl::StrAppend(&screen, "\033[", i + 1, ";1H\033[2K", lines[i]);
    }
    // Below the last row the cursor would stay on it, and clear it.
    if (lines.size() < static_cast<size_t>(rows)) {
      absl::StrAppend(&screen, "\033[", lines.size() + 1, ";1H\033[J");
    }
    out_ << screen << std::flush;
  }

 private:
  FullScreen(std::ostream& out, const termios& saved) : out_(out), saved_(saved) {
    out_ << "\033[?1049h\033[?25l" << std::flush;
  }

  std::ostream& out_;
  const termios saved_;
};

// Why the full-screen loop ended; told once the terminal is back.
struct Ending {
  int code = kExitOk;
  int signal = 0;                         // to re-raise
  absl::Status error = absl::OkStatus();  // to print
};

Ending RunFullScreen(const Client& client, const TopArgs& args, const Console& console,
                     TopFrame& frame) {
  absl::StatusOr<std::unique_ptr<SignalPipe>> signals = SignalPipe::Open();
  if (!signals.ok()) return {kExitError, 0, signals.status()};
  absl::StatusOr<std::unique_ptr<FullScreen>> screen = FullScreen::Enter(console.out);
  if (!screen.ok()) return {kExitError, 0, screen.status()};
  auto draw = [&] {
    std::tie(frame.rows, frame.columns) = FullScreen::Size();
    (*screen)->Draw(RenderTop(frame), frame.rows);
    return static_cast<bool>(console.out);
  };
  // Unbounded without --count, as documented: it runs until q.
  for (int64_t n = 0; args.count == 0 || n < args.count; ++n) {
    const Steady::time_point next = Steady::now() + args.interval;
    Refresh(client, frame);
    if (!draw()) return {kExitError};  // the terminal went away
    if (n + 1 == args.count) break;
    // Until the next refresh; each pass takes a key, a signal, or ends at the deadline.
    for (Steady::time_point now = Steady::now(); now < next; now = Steady::now()) {
      pollfd fds[] = {{STDIN_FILENO, POLLIN, 0}, {(*signals)->read_fd(), POLLIN, 0}};
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(next - now);
      if (poll(fds, std::size(fds), static_cast<int>(left.count())) < 0) {
        if (errno == EINTR) continue;
        return {kExitError, 0, absl::ErrnoToStatus(errno, "cannot wait for keys")};
      }
      if (fds[0].revents != 0) {
        char keys[64];
        const ssize_t got = read(STDIN_FILENO, keys, sizeof(keys));
        if (got <= 0) return {kExitOk};  // the terminal hung up
        if (std::string_view(keys, got).find_first_of("qQ") != std::string_view::npos) {
          return {kExitOk};
        }
      }
      if (fds[1].revents != 0) {
        unsigned char caught[16];
        const ssize_t got = read((*signals)->read_fd(), caught, sizeof(caught));
        for (ssize_t i = 0; i < got; ++i) {
          if (caught[i] != SIGWINCH) return {kExitOk, caught[i]};
        }
        if (got > 0 && !draw()) return {kExitError};  // resized: at once, with the data it has
      }
    }
  }
  return {frame.error.ok() ? kExitOk : kExitError, 0, frame.error};
}

}  // namespace

int RunTop(const Client& client, const TopArgs& args, const Console& console) {
  TopFrame frame;
  frame.master = client.options().master.address;
  frame.zone = absl::LocalTimeZone();
  if (isatty(STDIN_FILENO) != 1 || isatty(STDOUT_FILENO) != 1) {
    return RunPlain(client, args, console, frame);
  }
  const Ending ending = RunFullScreen(client, args, console, frame);
  // The terminal is back and the handlers are gone: the signal ends taskctl as it would have.
  if (ending.signal != 0) raise(ending.signal);
  if (!ending.error.ok()) return Fail(console, ending.error);
  return ending.code;
}

}  // namespace taskmaster
