// dlopen, the entry point, the ABI check, and the kinds merged only when all of them are new.
#include "worker/plugin.h"

#include <dlfcn.h>

#include "absl/strings/str_cat.h"

namespace taskmaster {

absl::Status LoadPlugin(const std::string& path, Registry& registry) {
  auto refuse = [&](const std::string& why) {
    return absl::FailedPreconditionError(absl::StrCat("plugin ", path, ": ", why));
  };
  // RTLD_NOW: a plugin missing a symbol fails here, at start, not in its first task.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) return refuse(dlerror());
  using Entry = const TaskmasterPlugin* (*)();
  auto entry = reinterpret_cast<Entry>(dlsym(handle, "taskmaster_plugin"));
  if (!entry) {
    dlclose(handle);
    return refuse("no entry point 'taskmaster_plugin' (build it with TASKMASTER_PLUGIN)");
  }
  const TaskmasterPlugin* plugin = entry();
  if (!plugin || plugin->abi_version != TASKMASTER_PLUGIN_ABI) {
    const uint32_t version = plugin ? plugin->abi_version : 0;
    dlclose(handle);
    return refuse(absl::StrCat("built for plugin ABI ", version, ", this worker loads ABI ",
                               TASKMASTER_PLUGIN_ABI, ": rebuild it against this taskmaster"));
  }
  if (!plugin->register_kinds) {
    dlclose(handle);
    return refuse("its entry point gives no function to register kinds");
  }
  // Never dlclose'd from here on: the handlers it registers are its code. Into a registry of its
  // own first: a plugin whose kinds clash adds none of them.
  Registry own;
  plugin->register_kinds(own);
  if (!own.refused().ok()) return refuse(std::string(own.refused().message()));
  if (own.Kinds().empty()) return refuse("registers no kind");
  if (absl::Status s = registry.Add(own); !s.ok()) return refuse(std::string(s.message()));
  return absl::OkStatus();
}

}  // namespace taskmaster
