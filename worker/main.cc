// taskworker: the SDK's RunWorker with no kinds of its own; the built-ins, the config's exec kinds
// and the plugins are all it runs.
#include "taskmaster/worker.h"

int main(int argc, char** argv) {
  return taskmaster::RunWorker(argc, argv, taskmaster::Registry());
}
