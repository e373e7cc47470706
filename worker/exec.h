// Exec handlers: a kind that runs a command the worker's configuration names, one process per task.
// The payload goes to the command's stdin and its stdout is the task's output; submitters never
// send command lines, so what runs on a worker is what its operator wrote down.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/handlers.h"

namespace taskmaster {

// Resource limits set in the child before it runs the command (soft and hard limit alike, so the
// command cannot raise them again). Unset: the worker's own limits apply.
struct ExecLimits {
  std::optional<uint64_t> address_space_bytes;  // RLIMIT_AS
  std::optional<uint64_t> cpu_seconds;          // RLIMIT_CPU: killed once used up
  std::optional<uint64_t> open_files;           // RLIMIT_NOFILE
  // The child's nice value itself (-20..19), not an increment. One below the worker's is refused
  // by MakeExecHandler unless this process may lower its nice value (CAP_SYS_NICE, RLIMIT_NICE).
  std::optional<int> nice;
};

struct ExecSpec {
  // argv[0] is an absolute path, or a bare name looked up in the child's PATH (its `env` PATH,
  // else the worker's PATH if `pass_env` names it, else kExecDefaultPath). A relative path with a
  // slash is refused: it would depend on the directory the worker was started in.
  std::vector<std::string> argv;
  // When set, argv is exactly one string, run as /bin/sh -c STRING.
  bool shell = false;
  // Absolute; empty: the worker's working directory.
  std::string cwd;
  // Set in the child's environment. When neither env nor pass_env gives the child a PATH, it gets
  // PATH=kExecDefaultPath, the one its program was looked up in.
  std::map<std::string, std::string> env;
  // Names whose values are copied from the worker's environment when the handler is made (names
  // it does not have are left out). Nothing else passes: the worker's environment may hold
  // secrets.
  std::vector<std::string> pass_env;
  // A stop (cancel, deadline) sends SIGTERM to the process group, and SIGKILL after this.
  std::chrono::milliseconds kill_grace{5'000};
  // Largest stdout kept. More is a permanent failure (the same input gives the same output), not
  // a truncated success: a cut output would look like a whole one.
  size_t max_output = 16 << 20;
  // How many of the last bytes of stderr a failure's error shows (at most kMaxExecStderrTail).
  size_t stderr_tail = 2'048;
  ExecLimits limits;
  // Exit codes (1..255) that mean the input is bad: the task is DEAD at once, without retries.
  std::set<int> permanent_exit_codes;
  // When 3..kMaxExecProgressFd, the child may write lines "progress DONE/TOTAL [message]" to this
  // descriptor, and each becomes TaskContext::ReportProgress. Other lines are ignored.
  int progress_fd = -1;
};

// The error of a task keeps kMaxErrorBytes (common/util.h): a longer tail would be cut at its end,
// which is the part worth reading.
inline constexpr size_t kMaxExecStderrTail = 3'072;
// The PATH a bare argv[0] is looked up in, and the child's PATH, when the spec's env sets none and
// pass_env brings none from the worker.
inline constexpr char kExecDefaultPath[] = "/usr/local/bin:/usr/bin:/bin";
// Descriptors above this may be over the child's RLIMIT_NOFILE, where dup2 fails.
inline constexpr int kMaxExecProgressFd = 1'023;

// Checks `spec` and returns the handler that runs it; an error (INVALID_ARGUMENT) names `kind`
// and what is wrong. The handler's errors name `kind` too:
//   - the command could not start ("cannot run '/bin/nope': No such file or directory");
//   - a non-zero exit ("exit code 3"), permanent (INVALID_ARGUMENT) when in permanent_exit_codes;
//   - death by a signal ("killed by signal 9 (SIGKILL)");
//   - stdout over max_output, permanent (INVALID_ARGUMENT): "output over the N-byte limit
//     (max_output_bytes)";
//   - a stop (CANCELLED or DEADLINE_EXCEEDED, as seen when the stop was decided; RunTask reports
//     those itself), also while the child has not exec'd yet;
//   - INTERNAL when the exit status was taken by someone else (something in the process ignores
//     SIGCHLD or waits for any child).
// Failures after a start end with the tail of stderr, made valid UTF-8.
//
// Whatever happens, when the handler returns no process of the command's process group is left,
// and no descriptor or zombie of it. A process that leaves the group (setsid, setpgid) is beyond
// its reach, and so is the group once the first process was reaped elsewhere: its id may be
// reused then, so no signal is sent to it again. Safe to call from several threads at once; the
// worker may be multi-threaded.
absl::StatusOr<Handler> MakeExecHandler(const std::string& kind, ExecSpec spec);

}  // namespace taskmaster
