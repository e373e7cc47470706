#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "spdlog/spdlog.h"

namespace taskmaster {

// Sets the default level ("trace", "debug", "info", "warn", "error") for every logger made
// afterwards. Logs go to stderr, which systemd's journal and docker collect.
absl::Status SetupLogging(const std::string& level);

// The named logger of a component ("master", "broker", "worker" ...), made on first use.
std::shared_ptr<spdlog::logger> GetLogger(const std::string& name);

}  // namespace taskmaster
