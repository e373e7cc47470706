// A taskworker plugin: `taskworker --plugin ./libreverse.so` runs kind `reverse`, which answers
// its payload's bytes in reverse order. Build it against the installed SDK header:
//   g++ -std=c++20 -shared -fPIC reverse.cc -o libreverse.so
#include <taskmaster/worker.h>

#include <string>

static void RegisterKinds(taskmaster::Registry& registry) {
  registry
      .Register("reverse",
                [](const taskmaster::TaskContext& ctx) -> absl::StatusOr<std::string> {
                  return std::string(ctx.payload().rbegin(), ctx.payload().rend());
                })
      .IgnoreError();  // a refusal stays in registry.refused(): the worker refuses the plugin
}

TASKMASTER_PLUGIN(RegisterKinds)
