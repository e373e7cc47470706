#pragma once

// The files of a SQLite store's data directory: the lock, the database, the commit high-water
// mark. docs/storage.md describes them.

#include <sqlite3.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "master/store/sqlite_store.h"

namespace taskmaster::sqlite {

// One master's data directory, locked against a second master while this lives.
class DataDir {
 public:
  // Locks `options.data_dir`, opens (or creates) its database, migrates an older schema and
  // checks the database against the commit high-water mark kept beside it. A database that holds
  // fewer commits than the mark (its write-ahead log was deleted or cut short) is refused, or
  // with `repairing` reported in lost_commits(). A database that is not ours, or newer than this
  // taskmaster, is refused untouched.
  static absl::StatusOr<std::unique_ptr<DataDir>> Open(const SqliteStoreOptions& options,
                                                       bool repairing);
  ~DataDir();
  DataDir(const DataDir&) = delete;
  DataDir& operator=(const DataDir&) = delete;

  sqlite3* db() const { return db_; }
  const std::string& dir() const { return dir_; }
  const std::string& db_path() const { return db_path_; }
  const std::string& epoch() const { return epoch_; }
  // Commits the database holds (its `commits` meta row).
  int64_t commits() const { return commits_; }
  // Commits the high-water mark had that the database lacks (repairing only).
  int64_t lost_commits() const { return lost_commits_; }
  // Moves the high-water mark to `commits`. Written after every commit without an fsync: it
  // only has to outlive the process, as the WAL's fsync makes the commit itself durable.
  void RecordCommits(int64_t commits);

 private:
  DataDir(std::string dir, int lock_fd);
  absl::Status OpenDatabase(const SqliteStoreOptions& options, bool repairing);
  // Refuses at start: the database stays as it is.
  absl::Status Refuse(std::string_view what) const;

  const std::string dir_;
  const std::string db_path_;
  const std::string mark_path_;
  const int lock_fd_;
  int mark_fd_ = -1;
  sqlite3* db_ = nullptr;
  std::string epoch_;
  int64_t commits_ = 0;
  int64_t lost_commits_ = 0;
};

// Replays the records of an open store into `visitor`, only those that check out: a damaged
// record stops the start with a message naming it (and the repair command), rather than a
// silently shorter queue or a payload nobody submitted.
absl::Status LoadRecords(const DataDir& dir, RecoveryVisitor* visitor);

}  // namespace taskmaster::sqlite
