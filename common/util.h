#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace taskmaster {

// Reads a whole file (tokens, certificates, keys); NOT_FOUND names the path.
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);

// `n` random bytes as lowercase hex, from a per-thread generator seeded by the OS.
std::string RandomHex(size_t n);

// This machine's host name.
std::string HostName();

// Removes leading and trailing spaces, tabs and carriage returns.
std::string_view Trim(std::string_view s);

// The lines of `text`, each trimmed.
std::vector<std::string_view> SplitLines(std::string_view text);

// Words separated by spaces or tabs.
std::vector<std::string> SplitWords(std::string_view s);

// Splits "a,b,,c" into {"a","b","c"}, trimming spaces.
std::vector<std::string> SplitList(std::string_view s);

// Parses "k=v,k2=v2" into a map. Keys follow the queue-name rule.
absl::StatusOr<std::map<std::string, std::string>> ParseLabels(std::string_view s);

// Queue names, kinds, label keys and tenants: [A-Za-z0-9_.-]{1,64}.
bool IsValidName(std::string_view s);
// OK for a valid name, else INVALID_ARGUMENT "WHAT 'NAME' must match ..." (the name quoted).
absl::Status CheckName(std::string_view what, std::string_view name);

// True for 127.0.0.0/8, ::1 and localhost, with or without a port; a name other than localhost
// is not, whatever it starts with.
bool IsLoopbackAddress(const std::string& host_port);

// Equal-length comparison whose time depends only on the length of `a` (a secret's).
bool ConstantTimeEquals(std::string_view a, std::string_view b);

bool IsValidUtf8(std::string_view s);
// The first `max` bytes of `s` with every byte that is not part of a well-formed UTF-8 sequence
// (one cut at `max` included) replaced by U+FFFD: what a text field of a protobuf message (which
// must be UTF-8) may carry of outside bytes.
std::string ValidUtf8(std::string_view s, size_t max = std::string_view::npos);

// Longest error text a task keeps from its worker's result (and a worker sends), so that any
// client can read it.
inline constexpr size_t kMaxErrorBytes = 4'096;
// A peer's text for a log line or a terminal: control characters (C0, DEL, C1) and bytes that
// are not UTF-8 become \xNN, so no string from outside can move a cursor or forge a log line;
// everything else, non-ASCII letters included, stays as it is.
std::string Printable(std::string_view s);
// Outside bytes (a payload, say) for a message a person reads: printable ASCII as it is, other
// bytes as \xNN, at most `max` bytes of it, then how long the whole was.
std::string Quote(std::string_view s, size_t max = 64);

// Exponential backoff with full jitter, for reconnect loops.
class Backoff {
 public:
  Backoff(std::chrono::milliseconds initial, std::chrono::milliseconds max)
      : initial_(initial), max_(max), next_(initial) {}
  // The wait before the next attempt: uniform in [next/2, next], then next doubles up to max.
  std::chrono::milliseconds Next();
  void Reset() { next_ = initial_; }

 private:
  std::chrono::milliseconds initial_, max_, next_;
  std::mt19937_64 rng_{std::random_device{}()};
};

// A job's stream of results is complete once the job is closed (takes no more batches), every
// task of it has finished, and the reader has every finished task's result (`seen` of them, in
// completion order).
inline bool JobFullyRead(int64_t done, int64_t total, bool open, int64_t seen) {
  return !open && done == total && seen >= done;
}

}  // namespace taskmaster
