// What the commit high-water mark costs each group commit of the durable store: the mark's
// write (DataDir::RecordCommits, a pwrite of one line) beside the fdatasync that every commit
// with --sync full pays anyway, both measured here on the same disk. Prints one JSON line.
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>

#include "master/store/sqlite_files.h"

int main() {
  using Clock = std::chrono::steady_clock;
  char pattern[] = "/tmp/taskmaster-commit-mark-XXXXXX";
  if (!mkdtemp(pattern)) return 1;
  const std::string dir = pattern;
  int rc = 0;
  {
    taskmaster::SqliteStoreOptions options;
    options.data_dir = dir;
    auto data = taskmaster::sqlite::DataDir::Open(options, /*repairing=*/false);
    if (!data.ok()) {
      fprintf(stderr, "%s\n", std::string(data.status().message()).c_str());
      rc = 1;
    } else {
      constexpr int kMarks = 20'000, kSyncs = 200;
      auto start = Clock::now();
      for (int i = 1; i <= kMarks; ++i) (*data)->RecordCommits((*data)->commits() + 1);
      const double mark_us =
          std::chrono::duration<double, std::micro>(Clock::now() - start).count() / kMarks;
      // A commit's fsync: a page appended to a log, then fdatasync.
      const int fd = open((dir + "/log").c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
      const std::string page(4096, 'x');
      start = Clock::now();
      for (int i = 0; i < kSyncs && fd >= 0; ++i) {
        if (write(fd, page.data(), page.size()) < 0 || fdatasync(fd) != 0) rc = 1;
      }
      const double sync_us =
          std::chrono::duration<double, std::micro>(Clock::now() - start).count() / kSyncs;
      if (fd >= 0) close(fd);
      printf("{\"mark_us\":%.2f,\"fsync_us\":%.1f}\n", mark_us, sync_us);
    }
  }
  std::filesystem::remove_all(dir);
  return rc;
}
