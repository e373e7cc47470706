// The worker's configuration: what `taskworker --config FILE` reads (TOML), what its flags
// override, and what --print-config shows. deploy/worker.example.toml documents every key.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "worker/exec.h"
#include "worker/worker.h"

namespace taskmaster {

struct WorkerConfig {
  WorkerOptions worker;
  std::string token_file;  // empty: $TASKMASTER_TOKEN, or none
  std::string log_level = "info";
  std::string log_format = "text";   // or json
  bool builtins = true;              // run square, echo, sleep and fail
  std::vector<std::string> plugins;  // shared objects that register kinds
  // Exec kinds, by kind (sorted by name, as the file's tables are read).
  std::vector<std::pair<std::string, ExecSpec>> exec;
};

// Reads `path` over `config`: every key present replaces the value `config` holds, which keeps
// its default otherwise. Unknown keys, wrong types and bad values fail, naming the key and line.
absl::Status LoadWorkerConfig(const std::string& path, WorkerConfig* config);

// `config` as a TOML file that LoadWorkerConfig reads back, secrets masked: the token (when it
// came from the environment, `token_from_env`) and exec environment values whose names look
// secret.
std::string FormatWorkerConfig(const WorkerConfig& config, bool token_from_env);

}  // namespace taskmaster
