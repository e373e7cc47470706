#include "common/signals.h"

#include <pthread.h>
#include <signal.h>

#include <ctime>

namespace taskmaster {

namespace {
sigset_t DaemonSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  return set;
}
}  // namespace

void BlockDaemonSignals() {
  const sigset_t set = DaemonSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  // A broken client connection must be an error value, not a process exit.
  signal(SIGPIPE, SIG_IGN);
}

int WaitForSignal(std::chrono::milliseconds timeout) {
  const sigset_t set = DaemonSignals();
  timespec ts{};
  ts.tv_sec = timeout.count() / 1000;
  ts.tv_nsec = (timeout.count() % 1000) * 1'000'000;
  const int sig = sigtimedwait(&set, nullptr, &ts);
  return sig > 0 ? sig : 0;
}

}  // namespace taskmaster
