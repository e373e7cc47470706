// Loading the shared-object plugins of --plugin and `plugins = [...]` (see TASKMASTER_PLUGIN in
// <taskmaster/worker.h>).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "taskmaster/worker.h"

namespace taskmaster {

// Loads the plugin at `path` and adds the kinds it registers to `registry`. Refuses, naming the
// file, one that cannot be loaded, lacks the entry point, was built for another ABI version, or
// registers a kind `registry` has already. A loaded plugin stays loaded for the process's life:
// its handlers are its code.
absl::Status LoadPlugin(const std::string& path, Registry& registry);

}  // namespace taskmaster
