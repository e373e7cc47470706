// The durable store (--store sqlite, the default): its options, opening and repair.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "master/store/store.h"

namespace taskmaster {

enum class SyncMode {
  kFull,    // fsync at every commit: a power loss loses nothing acknowledged
  kNormal,  // SQLite's synchronous=NORMAL: survives a process crash; a power loss may lose the
            // last commits
};

struct SqliteStoreOptions {
  std::string data_dir;  // created if missing; holds taskmaster.db and a LOCK file
  SyncMode sync = SyncMode::kFull;
  // While the disk is full, how long the writer waits before it tries again.
  int64_t retry_interval_ms = 1'000;
  // Disk space held in a file (RESERVE) and given back when the disk fills, so the store can
  // write again (and shrink its log) as soon as a little space is freed. 0: none.
  int64_t reserve_bytes = 4 << 20;
};

// SQLite in WAL mode under `data_dir`, locked against a second master. Refuses a database it
// cannot read, of an unknown or newer schema, or that is not a taskmaster database, and never
// overwrites one.
absl::StatusOr<std::unique_ptr<Store>> OpenSqliteStore(const SqliteStoreOptions& options);

// Keeps every record of the store in `options.data_dir` that checks out, moves the others into
// a `rejected-*.jsonl` file beside it, lowers the totals of jobs that lost tasks, and accepts
// commits its write-ahead log lost. Returns what it did, for a person to read.
absl::StatusOr<std::string> RepairSqliteStore(const SqliteStoreOptions& options);

}  // namespace taskmaster
