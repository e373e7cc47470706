#pragma once

#include <chrono>

namespace taskmaster {

// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and every thread it starts afterwards,
// so that they are taken only by WaitForSignal. Call first thing in main.
void BlockDaemonSignals();

// Waits up to `timeout` for SIGINT, SIGTERM or SIGHUP; returns the signal number, or 0 on
// timeout.
int WaitForSignal(std::chrono::milliseconds timeout);

}  // namespace taskmaster
