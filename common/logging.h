#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "spdlog/formatter.h"
#include "spdlog/spdlog.h"

namespace taskmaster {

enum class LogFormat {
  // "2026-12-02T16:05:36.123 info [master] message", local time, the level coloured on a
  // terminal: for people.
  kText,
  // {"time":"2026-12-02T15:05:36.123Z","level":"info","component":"master","pid":42,
  // "msg":"message"}, one object a line, UTC: for log shippers.
  kJson,
};

// Sets the default level ("trace", "debug", "info", "warn", "error") and format ("text", "json")
// of every logger, made before or after. Logs go to stderr, which systemd's journal and docker
// collect.
absl::Status SetupLogging(const std::string& level, const std::string& format);

// What SetupLogging gives every logger. A message may hold strings from peers (a worker's name,
// an error, a line of a file): in text, its control characters and bytes that are not UTF-8
// become \xNN; in JSON it is a string escaped as JSON needs, bytes that are not UTF-8 replaced by
// U+FFFD. Either way one message is one line, which no peer can forge or fill with terminal
// escapes.
std::unique_ptr<spdlog::formatter> MakeLogFormatter(LogFormat format);

// The named logger of a component ("master", "broker", "worker" ...), made on first use.
std::shared_ptr<spdlog::logger> GetLogger(const std::string& name);

}  // namespace taskmaster
