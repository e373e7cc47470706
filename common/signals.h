#pragma once

#include <chrono>

namespace taskmaster {

// Blocks SIGINT and SIGTERM in the calling thread and every thread it starts afterwards, so
// that they are taken only by WaitForTermination. Call first thing in main.
void BlockTerminationSignals();

// Waits up to `timeout` for SIGINT or SIGTERM; returns the signal number, or 0 on timeout.
int WaitForTermination(std::chrono::milliseconds timeout);

}  // namespace taskmaster
