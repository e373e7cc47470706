// A fault-injection shim for tests, preloaded into a daemon with LD_PRELOAD (see FaultShimEnv in
// harness.h). It steps the wall clock and fails fsync on demand, as a hostile operator would,
// without touching the monotonic clock. It calls the kernel directly and never allocates:
// libfaketime-style dlsym lookups deadlock with jemalloc at start.
#include <errno.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>

namespace {

// Seconds the wall clock is shifted by, re-read from the clock file at most every 10 ms.
std::atomic<long> offset_s{0};
std::atomic<long> next_read_ns{0};

long MonotonicNs() {
  timespec ts{};
  syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1'000'000'000L + ts.tv_nsec;
}

long ReadOffset(const char* path) {
  const int fd = static_cast<int>(syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC));
  if (fd < 0) return 0;
  char buf[32] = {};
  const long n = syscall(SYS_read, fd, buf, sizeof(buf) - 1);
  syscall(SYS_close, fd);
  if (n <= 0) return 0;
  return std::strtol(buf, nullptr, 10);
}

long Offset() {
  static const char* path = getenv("TM_SHIM_CLOCK_FILE");
  if (!path || !*path) return 0;
  const long now = MonotonicNs();
  if (now >= next_read_ns.load(std::memory_order_relaxed)) {
    offset_s.store(ReadOffset(path), std::memory_order_relaxed);
    next_read_ns.store(now + 10'000'000L, std::memory_order_relaxed);
  }
  return offset_s.load(std::memory_order_relaxed);
}

bool IsWall(clockid_t clock) { return clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE; }

bool FsyncFails() {
  static const char* path = getenv("TM_SHIM_FSYNC_FAIL_FILE");
  return path && *path && syscall(SYS_faccessat, AT_FDCWD, path, F_OK, 0) == 0;
}

}  // namespace

extern "C" {

int clock_gettime(clockid_t clock, timespec* ts) {
  const long rc = syscall(SYS_clock_gettime, clock, ts);
  if (rc == 0 && IsWall(clock)) ts->tv_sec += Offset();
  return static_cast<int>(rc);
}

int gettimeofday(timeval* tv, void*) {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  tv->tv_sec = ts.tv_sec;
  tv->tv_usec = ts.tv_nsec / 1000;
  return 0;
}

time_t time(time_t* out) {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  if (out) *out = ts.tv_sec;
  return ts.tv_sec;
}

int fsync(int fd) {
  if (FsyncFails()) {
    errno = EIO;
    return -1;
  }
  return static_cast<int>(syscall(SYS_fsync, fd));
}

int fdatasync(int fd) {
  if (FsyncFails()) {
    errno = EIO;
    return -1;
  }
  return static_cast<int>(syscall(SYS_fdatasync, fd));
}

}  // extern "C"
