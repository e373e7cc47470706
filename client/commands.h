#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <string>
#include <vector>

#include "client/client.h"

namespace taskmaster {

// Exit codes of taskctl.
inline constexpr int kExitOk = 0;
inline constexpr int kExitTaskFailed = 1;  // a task ended DEAD or CANCELLED
inline constexpr int kExitNotServing = 1;  // health: the master answers but does not serve
inline constexpr int kExitError = 2;       // bad input, master unreachable, refused ...

enum class OutputFormat { kText, kJson };

// Where a command writes. `progress` draws a progress bar on `err` (a terminal).
struct Console {
  std::ostream& out;
  std::ostream& err;
  OutputFormat format = OutputFormat::kText;
  bool progress = false;
};

struct SubmitArgs {
  std::string kind;
  // Gives the next payload, false once there are no more: input of any size streams through.
  std::function<bool(std::string*)> next_payload;
  // Whether next_payload may wait for its input (a pipe, a terminal): it is then read on a thread
  // of its own, so that a batch goes out after batch_wait even while the input is silent.
  bool input_may_block = true;
  // Payloads per submit call (and at most batch_bytes of them): more make one job of several
  // calls, followed as it grows with --wait.
  size_t batch_size = 10'000;
  size_t batch_bytes = 8 << 20;
  // A batch goes out this long after its first payload at the latest, full or not.
  std::chrono::milliseconds batch_wait{200};
  std::string queue;
  int32_t priority = 0;
  int64_t delay_ms = 0;
  int64_t timeout_ms = 0;
  int32_t max_attempts = 0;
  std::string key;  // one task: the key; several: key/0, key/1 ...
  std::string labels;
  bool wait = false;
};

// Each returns the process exit code and has written what the user needs to know.
int RunSubmit(const Client& client, const SubmitArgs& args, const Console& console);
int RunWait(const Client& client, const std::string& job_id, const Console& console);
int RunStatus(const Client& client, const std::string& id, const Console& console);
int RunCancel(const Client& client, const std::string& id, const Console& console);
int RunStats(const Client& client, const Console& console);
// Prints SERVING or NOT_SERVING; exit 0 only when SERVING (a probe for containers and systemd).
int RunHealth(const Client& client, const Console& console);
int RunWorkers(const Client& client, const Console& console);

// Writes "taskctl: MESSAGE" (made printable) on console.err; returns kExitError.
int Fail(const Console& console, const absl::Status& status);

// connected, draining, disconnected, or "silent": connected but not heard for three heartbeat
// intervals, so likely cut off (the master takes its tasks back at the lease timeout).
std::string WorkerState(const v1::WorkerInfo& w);

// "250ms", "2s", "1.5m", "1h"; a bare number is seconds.
absl::StatusOr<int64_t> ParseDurationMs(const std::string& text);

}  // namespace taskmaster
