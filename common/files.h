// Files a daemon keeps beside its work: the default data directory and the port file.
#pragma once

#include <string>

#include "absl/status/status.h"

namespace taskmaster {

// $STATE_DIRECTORY (set by systemd), else $XDG_DATA_HOME/taskmaster, else
// ~/.local/share/taskmaster, else ./taskmaster-data.
std::string DefaultDataDir();

// Writes `port` to `path` whole (through a temporary file renamed over it), following no
// symbolic link.
absl::Status WritePortFile(const std::string& path, int port);

}  // namespace taskmaster
