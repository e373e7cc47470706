// A plugin built for another ABI version: the worker must refuse it, naming the file.
#include "taskmaster/worker.h"

static void RegisterKinds(taskmaster::Registry& registry) {}

extern "C" __attribute__((visibility("default"))) const TaskmasterPlugin* taskmaster_plugin() {
  static const TaskmasterPlugin plugin{999, RegisterKinds};
  return &plugin;
}
