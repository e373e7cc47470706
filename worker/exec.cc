// Exec handlers. The parent prepares everything (argv, envp, the program's path, the pipes),
// vforks, and the child only makes system calls until execve: it shares the worker's memory until
// then, and another thread may have held any lock (malloc's included) at the moment of the vfork.
// The parent then feeds stdin and reads stdout, stderr and the progress pipe in one poll() loop,
// and ends the command's whole process group before it reaps the command's first process.
#include "worker/exec.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cstdlib>
#include <memory>
#include <system_error>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/util.h"

namespace taskmaster {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// How long a stop (cancel, deadline) may go unseen: the loop wakes at least this often.
constexpr auto kPollInterval = milliseconds(10);
// How long the pipes are read after the command's first process exited and its group was killed.
// The killed processes close their ends within milliseconds; only a process that left the group
// can hold a pipe open longer, and it must not hold the task.
constexpr auto kDrainBound = milliseconds(1'000);
// The longest stop grace a spec may ask for: the task's slot stays busy meanwhile.
constexpr auto kMaxKillGrace = std::chrono::hours(1);
constexpr size_t kReadChunk = 64 << 10;
// Reads of one descriptor per wake-up, so that a fast writer cannot keep the loop from its checks.
constexpr int kReadsPerWake = 16;
constexpr size_t kWriteChunk = 1 << 20;
// Longer progress lines are ignored whole: a child writing garbage cannot grow the worker.
constexpr size_t kMaxProgressLine = 4'096;
// Below this an address-space limit makes even the exec of a small program fail.
constexpr uint64_t kMinAddressSpace = 1 << 20;
constexpr char kShell[] = "/bin/sh";

std::string ErrnoText(int err) {
  // strerrordesc_np, unlike strerror, is thread-safe and locale-free.
  const char* text = strerrordesc_np(err);
  return text ? text : absl::StrCat("errno ", err);
}

std::string SignalText(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  return abbrev ? absl::StrCat("signal ", sig, " (SIG", abbrev, ")") : absl::StrCat("signal ", sig);
}

// An owned descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      Reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { Reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Linux closes the descriptor even when close() fails (EINTR included): never retried.
  void Reset() {
    if (fd_ >= 0) close(std::exchange(fd_, -1));
  }

 private:
  int fd_ = -1;
};

struct Pipe {
  Fd read, write;
};

// Both ends are close-on-exec, so that a child another thread forks meanwhile cannot keep them past
// its exec. The parent's end is non-blocking: one thread serves all of a child's pipes.
absl::StatusOr<Pipe> MakePipe(bool parent_reads) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot make a pipe: ", ErrnoText(errno)));
  }
  Pipe pipe{Fd(fds[0]), Fd(fds[1])};
  const int parent_end = parent_reads ? pipe.read.get() : pipe.write.get();
  const int flags = fcntl(parent_end, F_GETFL);
  if (flags < 0 || fcntl(parent_end, F_SETFL, flags | O_NONBLOCK) != 0) {
    return absl::InternalError(absl::StrCat("cannot make a pipe non-blocking: ", ErrnoText(errno)));
  }
  return pipe;
}

// What the child fails at before execve, sent to the parent on the report pipe.
enum class Stage : int32_t { kDescriptors, kChdir, kAddressSpace, kCpu, kOpenFiles, kNice, kExec };
struct ChildFailure {
  int32_t stage;
  int32_t error;
};

// Everything the child needs, computed before fork: the child only reads it.
struct ChildPlan {
  const char* path;
  char* const* argv;
  char* const* envp;
  const char* cwd;  // nullptr: stay in the worker's directory
  int stdin_fd, stdout_fd, stderr_fd;
  int progress_fd;      // the child's end of the progress pipe, or -1
  int progress_target;  // the descriptor number it gets in the command, or -1
  int report_fd;
  const ExecLimits* limits;
};

[[noreturn]] void ChildFail(int report_fd, Stage stage) {
  const ChildFailure failure{static_cast<int32_t>(stage), errno};
  // Eight bytes to a pipe are written at once or not at all; a failed report is an exit 127.
  [[maybe_unused]] ssize_t n = write(report_fd, &failure, sizeof failure);
  _exit(127);
}

// Closes [lo, hi]. close_range (Linux 5.9) in one call, else one close() per possible descriptor.
void ChildCloseRange(unsigned lo, unsigned hi) {
  if (lo > hi) return;
  if (close_range(lo, hi, 0) == 0) return;
  rlimit limit{};
  unsigned max = 1 << 20;
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY &&
      limit.rlim_cur < max) {
    max = static_cast<unsigned>(limit.rlim_cur);
  }
  for (unsigned fd = lo; fd <= hi && fd < max; ++fd) close(static_cast<int>(fd));
}

void ChildSetLimit(int resource, const std::optional<uint64_t>& value, int report_fd, Stage stage) {
  if (!value) return;
  // Hard and soft alike: the command cannot raise its own limit again.
  const rlimit limit{static_cast<rlim_t>(*value), static_cast<rlim_t>(*value)};
  if (setrlimit(resource, &limit) != 0) ChildFail(report_fd, stage);
}

// Runs in the vforked child: system calls only, no allocation, no exceptions, never returns.
[[noreturn]] void RunChild(const ChildPlan& plan) {
  // Its own process group, so that a stop reaches everything the command starts.
  setpgid(0, 0);
  // Every signal is blocked here (see Spawn). Handlers are reset by execve anyway, but an ignored
  // signal stays ignored: the worker ignores SIGPIPE, and a command that ignored it would loop on
  // EPIPE instead of dying when its reader goes away.
  struct sigaction default_action {};
  default_action.sa_handler = SIG_DFL;
  sigemptyset(&default_action.sa_mask);
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig != SIGKILL && sig != SIGSTOP) sigaction(sig, &default_action, nullptr);
  }

  // First move every descriptor we hand on above every target number, so that no dup2 overwrites
  // a source still needed (the worker may run with 0, 1 or 2 closed, making a pipe end one of
  // them).
  const int floor = std::max(3, plan.progress_target + 1);
  const int report = fcntl(plan.report_fd, F_DUPFD_CLOEXEC, floor);
  if (report < 0) ChildFail(plan.report_fd, Stage::kDescriptors);
  const int sources[4] = {plan.stdin_fd, plan.stdout_fd, plan.stderr_fd, plan.progress_fd};
  const int targets[4] = {0, 1, 2, plan.progress_target};
  int moved[4] = {-1, -1, -1, -1};
  for (int i = 0; i < 4; ++i) {
    if (sources[i] < 0) continue;
    moved[i] = fcntl(sources[i], F_DUPFD_CLOEXEC, floor);
    if (moved[i] < 0) ChildFail(report, Stage::kDescriptors);
  }
  for (int i = 0; i < 4; ++i) {
    // dup2 leaves the new descriptor without FD_CLOEXEC: it survives the exec.
    if (moved[i] >= 0 && dup2(moved[i], targets[i]) < 0) ChildFail(report, Stage::kDescriptors);
  }
  // Everything else goes: the worker's sockets, pipes and token files, and the pipes of commands
  // other threads are running. Kept: 0-2, the progress descriptor, and the report pipe, which is
  // close-on-exec.
  unsigned lo = 3;
  if (plan.progress_target >= 3) {
    ChildCloseRange(lo, static_cast<unsigned>(plan.progress_target) - 1);
    lo = static_cast<unsigned>(plan.progress_target) + 1;
  }
  ChildCloseRange(lo, static_cast<unsigned>(report) - 1);
  ChildCloseRange(static_cast<unsigned>(report) + 1, ~0U);

  if (plan.cwd && chdir(plan.cwd) != 0) ChildFail(report, Stage::kChdir);
  ChildSetLimit(RLIMIT_AS, plan.limits->address_space_bytes, report, Stage::kAddressSpace);
  ChildSetLimit(RLIMIT_CPU, plan.limits->cpu_seconds, report, Stage::kCpu);
  ChildSetLimit(RLIMIT_NOFILE, plan.limits->open_files, report, Stage::kOpenFiles);
  if (plan.limits->nice && setpriority(PRIO_PROCESS, 0, *plan.limits->nice) != 0) {
    ChildFail(report, Stage::kNice);
  }
  // The worker's threads block SIGINT, SIGTERM and SIGHUP; the command starts with none blocked.
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  execve(plan.path, plan.argv, plan.envp);
  ChildFail(report, Stage::kExec);
}

// The command's first process and its process group, whose id is that process's pid. Signals go
// to the group only while the process is unreaped: until then its pid, so the group's id, cannot
// be reused. Only this class reaps it, but something else in the process can (a waitpid(-1), or
// SIGCHLD set to SIG_IGN, which has the kernel reap it at its exit): so every signal is preceded
// by a waitid(WNOWAIT) that confirms the process is still ours, running or an unreaped zombie.
// Once it is not (ECHILD), its status is lost and the group's id may be anyone's: no signal is
// sent again and no wait is made (the pid may even be another thread's new child by then).
// Destroyed unreaped (an early return, an exception), it kills the group and reaps.
class ChildGroup {
 public:
  explicit ChildGroup(pid_t pid) : pid_(pid) {}
  ChildGroup(const ChildGroup&) = delete;
  ChildGroup& operator=(const ChildGroup&) = delete;
  ~ChildGroup() {
    if (pid_ > 0) {
      Signal(SIGKILL);
      Reap();
    }
  }

  pid_t pid() const { return pid_; }
  // True once the process was found reaped by someone else.
  bool lost() const { return lost_; }

  // Sends `sig` to the group if its first process is still ours; false when not (or no more).
  bool Signal(int sig) {
    siginfo_t info{};
    if (!Peek(info)) return false;
    kill(-pid_, sig);
    return true;
  }

  // Whether the process exited, without reaping it. A lost process counts as exited.
  bool Exited() {
    siginfo_t info{};
    if (!Peek(info)) return true;
    return info.si_pid != 0;
  }

  // Waits for the process (it has exited, or was just killed). nullopt: its status is lost
  // (someone else reaped it).
  std::optional<int> Reap() {
    siginfo_t info{};
    if (!Peek(info)) {
      pid_ = -1;
      return std::nullopt;
    }
    int status = 0;
    pid_t r;
    do {
      r = waitpid(pid_, &status, 0);
    } while (r < 0 && errno == EINTR);
    pid_ = -1;
    if (r < 0) {
      // Reaped elsewhere while this thread waited (SIGCHLD ignored: the wait ends at the exit).
      lost_ = true;
      return std::nullopt;
    }
    return status;
  }

 private:
  // waitid(WNOWAIT): true while the process is ours (info.si_pid is 0 while it runs, its pid once
  // it exited); false, and lost from then on, once it is not (ECHILD).
  bool Peek(siginfo_t& info) {
    if (pid_ <= 0 || lost_) return false;
    int r;
    do {
      r = waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOHANG | WNOWAIT);
    } while (r != 0 && errno == EINTR);
    if (r != 0) lost_ = true;
    return r == 0;
  }

  pid_t pid_;
  bool lost_ = false;
};

// Why a run was stopped. The handler's context tells only ShouldStop() and the deadline, so a
// stop seen before the deadline is the cancel; one seen at or past it counts as the deadline
// (RunTask reads the cancel flag itself, and a cancel wins there). Decided when the stop is seen,
// not after the kill grace, which may well run past the deadline.
enum class Ending { kNone, kCancelled, kDeadline, kOverLimit };

Ending StopReason(const TaskContext& ctx) {
  return Clock::now() < ctx.deadline() ? Ending::kCancelled : Ending::kDeadline;
}

absl::Status StoppedError(Ending why, std::string message) {
  return why == Ending::kDeadline ? absl::DeadlineExceededError(message)
                                  : absl::CancelledError(message);
}

// Writing to a pipe whose reader is gone raises SIGPIPE in the writing thread. The worker ignores
// it, but a handler must not depend on its host for that: SIGPIPE is blocked in this thread while
// the command runs, and one it raised is taken back before the old mask returns.
class ScopedSigpipeBlock {
 public:
  ScopedSigpipeBlock() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
  }
  ScopedSigpipeBlock(const ScopedSigpipeBlock&) = delete;
  ScopedSigpipeBlock& operator=(const ScopedSigpipeBlock&) = delete;
  ~ScopedSigpipeBlock() {
    if (raised_) {
      sigset_t pending;
      const timespec zero{};
      if (sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE)) {
        sigtimedwait(&pipe_, nullptr, &zero);
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  void Raised() { raised_ = true; }

 private:
  sigset_t pipe_, old_;
  bool raised_ = false;
};

// "progress DONE/TOTAL [message]" → ReportProgress; anything else is ignored.
void ParseProgress(std::string_view line, const TaskContext& ctx) {
  constexpr std::string_view kWord = "progress ";
  line = Trim(line);
  if (line.substr(0, kWord.size()) != kWord) return;
  line.remove_prefix(kWord.size());
  const size_t space = line.find(' ');
  const std::string_view numbers = line.substr(0, space);
  const std::string_view message =
      space == std::string_view::npos ? std::string_view() : Trim(line.substr(space + 1));
  const size_t slash = numbers.find('/');
  if (slash == std::string_view::npos) return;
  auto parse = [](std::string_view text, int64_t& out) {
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
    return !text.empty() && ec == std::errc() && end == text.data() + text.size() && out >= 0;
  };
  int64_t done = 0, total = 0;
  if (!parse(numbers.substr(0, slash), done) || !parse(numbers.substr(slash + 1), total)) return;
  if (total > 0 && done > total) return;
  ctx.ReportProgress(done, total, ValidUtf8(message));
}

// Splits the progress pipe's bytes into lines.
class ProgressLines {
 public:
  explicit ProgressLines(const TaskContext& ctx) : ctx_(ctx) {}

  void Feed(std::string_view data) {
    while (!data.empty()) {
      const size_t nl = data.find('\n');
      const std::string_view part = data.substr(0, nl);
      if (!overlong_) {
        if (line_.size() + part.size() > kMaxProgressLine) {
          overlong_ = true;
          line_.clear();
        } else {
          line_.append(part);
        }
      }
      if (nl == std::string_view::npos) return;
      if (!overlong_) ParseProgress(line_, ctx_);
      line_.clear();
      overlong_ = false;
      data.remove_prefix(nl + 1);
    }
  }
  // The pipe's end also ends a last line without a newline.
  void End() {
    if (!overlong_ && !line_.empty()) ParseProgress(line_, ctx_);
    line_.clear();
  }

 private:
  const TaskContext& ctx_;
  std::string line_;
  bool overlong_ = false;  // the current line is too long: skipped to its newline
};

// The spec, checked, and what every run of it shares: built once, read by any number of threads.
struct Prepared {
  std::string kind;
  ExecSpec spec;
  std::string program;      // the path to exec, or empty: argv[0] is looked up in search_path
  std::string search_path;  // the child's PATH
  std::vector<std::string> args;
  std::vector<std::string> env;  // "NAME=value"
  // Pointers into args and env (which never change after), null-terminated, for execve.
  std::vector<char*> argv, envp;

  std::string Prefix() const { return absl::StrCat("kind '", kind, "': "); }
};

bool IsEnvName(std::string_view name) {
  if (name.empty() || (name[0] >= '0' && name[0] <= '9')) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
  });
}

bool HasNul(std::string_view s) { return s.find('\0') != std::string_view::npos; }

// A limit above the worker's own hard limit could only fail in every child: refused at the start.
absl::Status CheckLimit(const std::string& prefix, const char* name, int resource,
                        const std::optional<uint64_t>& value, uint64_t min) {
  if (!value) return absl::OkStatus();
  if (*value < min) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "limits.", name, " must be at least ", min));
  }
  rlimit limit{};
  if (getrlimit(resource, &limit) == 0 && limit.rlim_max != RLIM_INFINITY &&
      *value > limit.rlim_max) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, "limits.", name, " ", *value,
                                                   " is over the worker's own hard limit ",
                                                   limit.rlim_max));
  }
  return absl::OkStatus();
}

// Lowering a nice value takes CAP_SYS_NICE or an RLIMIT_NICE that allows it; without either, every
// child would fail at its setpriority (EACCES): refused at the start instead. A thread tries it,
// which asks the kernel itself (user namespaces, LSMs and all): on Linux a nice value is a
// thread's, so the probe changes nothing else, and it starts with the calling thread's value,
// capabilities and limits, as a forked child does.
absl::Status CheckNice(const std::string& prefix, int nice) {
  errno = 0;
  const int current = getpriority(PRIO_PROCESS, 0);
  if (current == -1 && errno != 0) return absl::OkStatus();  // cannot tell: each run will
  if (nice >= current) return absl::OkStatus();
  bool allowed = true;
  int error = 0;
  try {
    std::thread([&] {
      allowed = setpriority(PRIO_PROCESS, 0, nice) == 0;
      error = errno;
    }).join();
  } catch (const std::system_error&) {
    return absl::OkStatus();  // no thread to try in: each run will tell
  }
  if (allowed) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      prefix, "limits.nice ", nice, " is below the worker's ", current,
      " and this process may not lower it (that needs CAP_SYS_NICE or an RLIMIT_NICE of at least ",
      20 - nice, "): ", ErrnoText(error)));
}

absl::Status CheckSpec(const std::string& prefix, const ExecSpec& spec) {
  auto invalid = [&prefix](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, parts...));
  };
  if (spec.argv.empty() || spec.argv[0].empty()) return invalid("argv must name a program");
  for (const std::string& arg : spec.argv) {
    if (HasNul(arg)) return invalid("argv must not contain NUL bytes");
  }
  if (spec.shell) {
    if (spec.argv.size() != 1) {
      return invalid("a shell command is exactly one string, not ", spec.argv.size());
    }
  } else if (spec.argv[0].find('/') != std::string::npos && spec.argv[0][0] != '/') {
    return invalid("program '", Quote(spec.argv[0]),
                   "' must be an absolute path or a bare name looked up in PATH");
  }
  if (!spec.cwd.empty() && (spec.cwd[0] != '/' || HasNul(spec.cwd))) {
    return invalid("cwd '", Quote(spec.cwd), "' must be an absolute path");
  }
  for (const auto& [name, value] : spec.env) {
    if (!IsEnvName(name)) return invalid("environment name '", Quote(name), "' is not valid");
    if (HasNul(value)) return invalid("environment value of ", name, " contains a NUL byte");
  }
  for (const std::string& name : spec.pass_env) {
    if (!IsEnvName(name)) return invalid("pass_env name '", Quote(name), "' is not valid");
    if (spec.env.count(name)) return invalid(name, " is both in env and in pass_env");
  }
  if (spec.kill_grace < milliseconds(0) || spec.kill_grace > kMaxKillGrace) {
    return invalid("kill_grace must be between 0 and ", kMaxKillGrace.count(), " hour");
  }
  if (spec.max_output == 0) return invalid("max_output must be positive");
  if (spec.stderr_tail > kMaxExecStderrTail) {
    return invalid("stderr_tail must be at most ", kMaxExecStderrTail);
  }
  for (int code : spec.permanent_exit_codes) {
    if (code < 1 || code > 255) return invalid("permanent exit code ", code, " is not in 1..255");
  }
  if (spec.progress_fd != -1 && (spec.progress_fd < 3 || spec.progress_fd > kMaxExecProgressFd)) {
    return invalid("progress_fd must be -1 (none) or in 3..", kMaxExecProgressFd, ", not ",
                   spec.progress_fd);
  }
  const ExecLimits& limits = spec.limits;
  if (absl::Status s = CheckLimit(prefix, "address_space_bytes", RLIMIT_AS,
                                  limits.address_space_bytes, kMinAddressSpace);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckLimit(prefix, "cpu_seconds", RLIMIT_CPU, limits.cpu_seconds, 1);
      !s.ok()) {
    return s;
  }
  // The command's stdin, stdout and stderr take three.
  if (absl::Status s = CheckLimit(prefix, "open_files", RLIMIT_NOFILE, limits.open_files, 3);
      !s.ok()) {
    return s;
  }
  if (limits.nice && (*limits.nice < -20 || *limits.nice > 19)) {
    return invalid("limits.nice must be in -20..19, not ", *limits.nice);
  }
  if (limits.nice) return CheckNice(prefix, *limits.nice);
  return absl::OkStatus();
}

// argv[0]'s path, looked up in the child's PATH when it is a bare name. Each run looks again: a
// program installed after the worker started is found.
absl::StatusOr<std::string> FindProgram(const Prepared& p) {
  if (!p.program.empty()) return p.program;
  const std::string& name = p.args[0];
  std::string_view dirs = p.search_path;
  while (true) {
    const size_t colon = dirs.find(':');
    const std::string_view dir = dirs.substr(0, colon);
    // A relative entry (an empty one is ".") would depend on the worker's directory: skipped.
    if (!dir.empty() && dir[0] == '/') {
      std::string candidate(dir);
      if (dir.back() != '/') candidate += '/';
      candidate += name;
      struct stat st {};
      if (stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
          access(candidate.c_str(), X_OK) == 0) {
        return candidate;
      }
    }
    if (colon == std::string_view::npos) break;
    dirs.remove_prefix(colon + 1);
  }
  return absl::FailedPreconditionError(absl::StrCat(
      p.Prefix(), "cannot run '", Quote(name), "': not found in PATH ", Quote(p.search_path, 256)));
}

// The message, then as much of the end of stderr as the error a task keeps has room for.
std::string WithStderr(std::string message, std::string_view tail, bool cut) {
  constexpr std::string_view kLabel = "; stderr: ";
  constexpr std::string_view kCut = "...";
  std::string text = ValidUtf8(Trim(tail));
  if (text.empty()) return message;
  const size_t room =
      kMaxErrorBytes - std::min(kMaxErrorBytes, message.size() + kLabel.size() + kCut.size());
  if (text.size() > room) {
    size_t start = text.size() - room;
    // Start on a character, not inside one: the text stays valid UTF-8.
    while (start < text.size() && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) {
      ++start;
    }
    text.erase(0, start);
    cut = true;
  }
  message.append(kLabel);
  if (cut) message.append(kCut);
  return message.append(text);
}

// Reads what `fd` has now, up to kReadsPerWake chunks, into `sink`; closes it at its end.
template <typename Sink>
void ReadSome(Fd& fd, std::string& buffer, Sink&& sink) {
  for (int i = 0; i < kReadsPerWake && fd.valid(); ++i) {
    const ssize_t n = read(fd.get(), buffer.data(), buffer.size());
    if (n > 0) {
      sink(std::string_view(buffer.data(), static_cast<size_t>(n)));
    } else if (n == 0) {
      fd.Reset();
    } else if (errno == EINTR) {
      continue;
    } else if (errno == EAGAIN) {
      return;
    } else {
      fd.Reset();  // nothing more can come from it
    }
  }
}

absl::StatusOr<std::string> Run(const Prepared& p, const TaskContext& ctx) {
  if (ctx.ShouldStop()) return absl::CancelledError(p.Prefix() + "stopped before it started");
  absl::StatusOr<std::string> program = FindProgram(p);
  if (!program.ok()) return program.status();

  absl::StatusOr<Pipe> in = MakePipe(/*parent_reads=*/false);
  if (!in.ok()) return in.status();
  absl::StatusOr<Pipe> out = MakePipe(true);
  if (!out.ok()) return out.status();
  absl::StatusOr<Pipe> err = MakePipe(true);
  if (!err.ok()) return err.status();
  absl::StatusOr<Pipe> progress = Pipe{};
  if (p.spec.progress_fd >= 0) progress = MakePipe(true);
  if (!progress.ok()) return progress.status();
  // Tells the parent why the child could not exec; its end at the exec means success.
  int report_fds[2];
  if (pipe2(report_fds, O_CLOEXEC) != 0) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot make a pipe: ", ErrnoText(errno)));
  }
  Fd report_read(report_fds[0]), report_write(report_fds[1]);

  const ChildPlan plan{
      .path = program->c_str(),
      .argv = p.argv.data(),
      .envp = p.envp.data(),
      .cwd = p.spec.cwd.empty() ? nullptr : p.spec.cwd.c_str(),
      .stdin_fd = in->read.get(),
      .stdout_fd = out->write.get(),
      .stderr_fd = err->write.get(),
      .progress_fd = progress->write.get(),
      .progress_target = p.spec.progress_fd,
      .report_fd = report_write.get(),
      .limits = &p.spec.limits,
  };
  ScopedSigpipeBlock sigpipe;
  // vfork, not fork: the child shares the worker's memory until its exec, so no page table is
  // copied and no page is copied on write; that makes an exec task several times cheaper in a
  // process the size of a worker (measured: 3.8x the tasks/s of /bin/cat). The price: this thread
  // waits until the child has exec'd, so a child that hangs before it (a cwd on a hung mount) holds
  // the slot, and the watchdog reports its task timed out at the deadline. The child may only make
  // system calls (RunChild) and never returns; with every signal blocked across the vfork, none of
  // the worker's handlers can run in it (on the shared memory) before it resets them, and it
  // unblocks them just before execve.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  const pid_t pid = vfork();
  if (pid == 0) RunChild(plan);
  const int fork_error = errno;
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (pid < 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat(p.Prefix(), "cannot fork: ", ErrnoText(fork_error)));
  }
  ChildGroup group(pid);
  // The child does the same: whichever runs first, the group exists before any signal is sent to
  // it. Fails harmlessly (EACCES) once the child has exec'd.
  setpgid(pid, pid);
  in->read.Reset();
  out->write.Reset();
  err->write.Reset();
  progress->write.Reset();
  report_write.Reset();

  // vfork returned: the child has exec'd (the report pipe's end) or written why it could not.
  ChildFailure failure{};
  size_t got = 0;
  while (got < sizeof failure) {
    const ssize_t n =
        read(report_read.get(), reinterpret_cast<char*>(&failure) + got, sizeof failure - got);
    if (n > 0) {
      got += static_cast<size_t>(n);
    } else if (n == 0 || errno != EINTR) {
      break;
    }
  }
  report_read.Reset();
  if (got == sizeof failure) {
    group.Reap();
    const std::string why = ErrnoText(failure.error);
    const ExecLimits& limits = p.spec.limits;
    std::string message;
    switch (static_cast<Stage>(failure.stage)) {
      case Stage::kDescriptors:
        message = absl::StrCat("cannot set up the descriptors of '", Quote(*program), "': ", why);
        break;
      case Stage::kChdir:
        message = absl::StrCat("cannot change to directory '", Quote(p.spec.cwd, 256), "': ", why);
        break;
      case Stage::kAddressSpace:
        message = absl::StrCat("cannot set RLIMIT_AS to ", *limits.address_space_bytes, ": ", why);
        break;
      case Stage::kCpu:
        message = absl::StrCat("cannot set RLIMIT_CPU to ", *limits.cpu_seconds, ": ", why);
        break;
      case Stage::kOpenFiles:
        message = absl::StrCat("cannot set RLIMIT_NOFILE to ", *limits.open_files, ": ", why);
        break;
      case Stage::kNice:
        message = absl::StrCat("cannot set the nice value to ", *limits.nice, ": ", why);
        break;
      case Stage::kExec:
      default:
        message = absl::StrCat("cannot run '", Quote(*program, 256), "': ", why);
        break;
    }
    return absl::FailedPreconditionError(p.Prefix() + message);
  }

  // The exit of the command's first process, without reaping it: a pidfd (Linux 5.3) in the
  // poll set, else waitid(WNOWAIT) at every wake-up. The raw system call, because glibc 2.36's
  // <sys/pidfd.h> lacks extern "C" and its pidfd_open cannot be linked from C++.
  Fd pidfd(static_cast<int>(syscall(SYS_pidfd_open, pid, 0)));
  // Had the process been reaped elsewhere before pidfd_open, the pid may be another's by now, and
  // so the pidfd's: the process must still be ours after it. (Once it is, the pidfd is its.)
  if (pidfd.valid() && group.Exited() && group.lost()) pidfd.Reset();

  std::string_view payload = ctx.payload();
  Fd& stdin_fd = in->write;
  Fd& stdout_fd = out->read;
  Fd& stderr_fd = err->read;
  Fd& progress_fd = progress->read;
  if (payload.empty()) stdin_fd.Reset();

  std::string buffer(kReadChunk, '\0');
  std::string output;
  bool over_limit = false;
  std::string stderr_tail;
  bool stderr_cut = false;
  ProgressLines progress_lines(ctx);

  Ending ending = Ending::kNone;
  // SIGKILL for the group, after a SIGTERM; max(): none due. (Not an optional: GCC 12 at -O3
  // takes its value for uninitialized.)
  Clock::time_point kill_at = Clock::time_point::max();
  std::optional<Clock::time_point> drain_until;  // set once the first process exited

  auto stop = [&](Ending why) {
    ending = why;
    // Each signal only while the first process is still ours (see ChildGroup).
    group.Signal(SIGTERM);
    // A stopped process acts on SIGTERM only once it runs again.
    group.Signal(SIGCONT);
    kill_at = Clock::now() + p.spec.kill_grace;
  };

  while (true) {
    pollfd fds[5];
    nfds_t count = 0;
    auto add = [&](const Fd& fd, short events) {
      if (!fd.valid()) return -1;
      fds[count] = {fd.get(), events, 0};
      return static_cast<int>(count++);
    };
    const int stdin_at = add(stdin_fd, POLLOUT);
    const int stdout_at = add(stdout_fd, POLLIN);
    const int stderr_at = add(stderr_fd, POLLIN);
    const int progress_at = add(progress_fd, POLLIN);
    const int pidfd_at = drain_until ? -1 : add(pidfd, POLLIN);
    auto timeout = kPollInterval;
    if (drain_until) {
      timeout = std::min(timeout, std::chrono::ceil<milliseconds>(*drain_until - Clock::now()));
    }
    const int ready = poll(fds, count, static_cast<int>(std::max<int64_t>(timeout.count(), 0)));
    if (ready < 0 && errno != EINTR) {
      return absl::InternalError(absl::StrCat(p.Prefix(), "poll failed: ", ErrnoText(errno)));
    }
    auto revents = [&](int at) -> short { return ready > 0 && at >= 0 ? fds[at].revents : 0; };

    if (revents(stdin_at) != 0) {
      while (!payload.empty()) {
        const ssize_t n =
            write(stdin_fd.get(), payload.data(), std::min(payload.size(), kWriteChunk));
        if (n > 0) {
          payload.remove_prefix(static_cast<size_t>(n));
        } else if (n < 0 && errno == EINTR) {
          continue;
        } else if (n < 0 && errno == EAGAIN) {
          break;
        } else {
          // EPIPE: the command does not read its stdin, its own business.
          if (errno == EPIPE) sigpipe.Raised();
          payload = {};
        }
      }
      if (payload.empty()) stdin_fd.Reset();
    }
    if (revents(stdout_at) != 0) {
      ReadSome(stdout_fd, buffer, [&](std::string_view data) {
        if (over_limit) return;
        if (output.size() + data.size() > p.spec.max_output) {
          over_limit = true;
          std::string().swap(output);
        } else {
          output.append(data);
        }
      });
    }
    if (revents(stderr_at) != 0) {
      ReadSome(stderr_fd, buffer, [&](std::string_view data) {
        const size_t keep = p.spec.stderr_tail;
        if (data.size() >= keep) {
          stderr_cut = stderr_cut || data.size() > keep || !stderr_tail.empty();
          stderr_tail.assign(data.substr(data.size() - keep));
        } else {
          stderr_tail.append(data);
          if (stderr_tail.size() > keep) {
            stderr_tail.erase(0, stderr_tail.size() - keep);
            stderr_cut = true;
          }
        }
      });
    }
    if (revents(progress_at) != 0) {
      ReadSome(progress_fd, buffer, [&](std::string_view data) { progress_lines.Feed(data); });
      if (!progress_fd.valid()) progress_lines.End();
    }

    if (drain_until) {
      const bool drained = !stdout_fd.valid() && !stderr_fd.valid() && !progress_fd.valid();
      if (drained || Clock::now() >= *drain_until) break;
      continue;
    }
    if (ending == Ending::kNone && over_limit) stop(Ending::kOverLimit);
    if (ending == Ending::kNone && ctx.ShouldStop()) stop(StopReason(ctx));
    if (Clock::now() >= kill_at) {
      group.Signal(SIGKILL);
      kill_at = Clock::time_point::max();
    }
    // The pidfd is readable once the process exited; waitid(WNOWAIT) says the same without one.
    // Either way a process reaped elsewhere counts as exited.
    const bool exited = pidfd.valid() ? revents(pidfd_at) != 0 : group.Exited();
    if (exited) {
      // Whatever the command left running (a background job holding its stdout, say) goes now,
      // if the first process is still unreaped, so that the group's id is still this command's.
      // Reaped elsewhere, it may be anyone's: nothing is sent (what the command left running is
      // beyond reach then).
      group.Signal(SIGKILL);
      stdin_fd.Reset();
      drain_until = Clock::now() + kDrainBound;
      // Usually the pipes closed before the exit was seen: nothing left to drain, and another
      // poll would only wait out its timeout (a whole kPollInterval per task).
      if (!stdout_fd.valid() && !stderr_fd.valid() && !progress_fd.valid()) break;
    }
  }
  if (progress_fd.valid()) progress_lines.End();

  const std::optional<int> status = group.Reap();
  const std::string prefix = p.Prefix();
  if (ending == Ending::kOverLimit || over_limit) {
    // Permanent: the same input gives the same output, so a retry would only fail again.
    return absl::InvalidArgumentError(absl::StrCat(prefix, "output over the ", p.spec.max_output,
                                                   "-byte limit (max_output_bytes)"));
  }
  if (ending == Ending::kCancelled || ending == Ending::kDeadline) {
    std::string message = absl::StrCat(
        prefix, "stopped: ", ending == Ending::kDeadline ? "past its deadline" : "cancelled");
    if (status && WIFSIGNALED(*status)) {
      absl::StrAppend(&message, ", killed by ", SignalText(WTERMSIG(*status)));
    }
    return StoppedError(ending, std::move(message));
  }
  if (!status) {
    return absl::InternalError(absl::StrCat(
        prefix,
        "its exit status was taken by someone else (something in the worker ignores SIGCHLD or "
        "waits for any child), so how the command ended is unknown"));
  }
  if (WIFEXITED(*status)) {
    const int code = WEXITSTATUS(*status);
    if (code == 0) return output;
    std::string message =
        WithStderr(absl::StrCat(prefix, "exit code ", code), stderr_tail, stderr_cut);
    if (p.spec.permanent_exit_codes.count(code)) return absl::InvalidArgumentError(message);
    return absl::UnknownError(message);
  }
  std::string what = absl::StrCat(prefix, "killed by ", SignalText(WTERMSIG(*status)));
  if (WCOREDUMP(*status)) what += " (core dumped)";
  return absl::AbortedError(WithStderr(std::move(what), stderr_tail, stderr_cut));
}

}  // namespace

absl::StatusOr<Handler> MakeExecHandler(const std::string& kind, ExecSpec spec) {
  if (absl::Status s = CheckName("kind", kind); !s.ok()) return s;
  auto p = std::make_shared<Prepared>();
  p->kind = kind;
  if (absl::Status s = CheckSpec(p->Prefix(), spec); !s.ok()) return s;
  p->spec = std::move(spec);
  const ExecSpec& s = p->spec;

  if (s.shell) {
    p->program = kShell;
    p->args = {kShell, "-c", s.argv[0]};
  } else {
    p->args = s.argv;
    if (s.argv[0][0] == '/') p->program = s.argv[0];
  }
  // The environment is read once, here: getenv is not safe against a setenv in another thread,
  // and every run of a kind should see the same environment.
  for (const std::string& name : s.pass_env) {
    if (const char* value = std::getenv(name.c_str())) {
      p->env.push_back(absl::StrCat(name, "=", value));
    }
  }
  for (const auto& [name, value] : s.env) p->env.push_back(absl::StrCat(name, "=", value));
  std::sort(p->env.begin(), p->env.end());
  p->env.erase(std::unique(p->env.begin(), p->env.end()), p->env.end());
  p->search_path = kExecDefaultPath;
  bool has_path = false;
  for (const std::string& entry : p->env) {
    if (entry.rfind("PATH=", 0) == 0) {
      p->search_path = entry.substr(5);
      has_path = true;
    }
  }
  // The child searches the PATH its program was found in (a shell command's commands, execvp).
  if (!has_path) {
    p->env.push_back(absl::StrCat("PATH=", kExecDefaultPath));
    std::sort(p->env.begin(), p->env.end());
  }
  for (std::string& arg : p->args) p->argv.push_back(arg.data());
  p->argv.push_back(nullptr);
  for (std::string& entry : p->env) p->envp.push_back(entry.data());
  p->envp.push_back(nullptr);

  return Handler([p = std::shared_ptr<const Prepared>(std::move(p))](const TaskContext& ctx) {
    return Run(*p, ctx);
  });
}

}  // namespace taskmaster
