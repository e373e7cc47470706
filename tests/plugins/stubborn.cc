// A plugin whose kind `stubborn` sleeps its payload's milliseconds and never looks at its deadline
// or a cancel: the worker must report its task timed out without it.
#include <chrono>
#include <string>
#include <thread>

#include "taskmaster/worker.h"

static void RegisterKinds(taskmaster::Registry& registry) {
  registry
      .Register("stubborn",
                [](const taskmaster::TaskContext& ctx) -> absl::StatusOr<std::string> {
                  std::this_thread::sleep_for(
                      std::chrono::milliseconds(std::stoi(std::string(ctx.payload()))));
                  return std::string("finished at last");
                })
      .IgnoreError();  // a refusal stays in registry.refused(): the worker refuses the plugin
}

TASKMASTER_PLUGIN(RegisterKinds)
