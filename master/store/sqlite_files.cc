#include "master/store/sqlite_files.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "common/util.h"
#include "master/store/sqlite_records.h"

namespace taskmaster::sqlite {
namespace {

constexpr char kRepairHint[] =
    "; run `taskmaster --repair --data-dir DIR` to keep what is valid and move the rest aside";

// The data directory holds every payload and result: only its owner may reach it. A new one is
// made 0700 whatever the umask; an existing one must be ours and not writable by others.
absl::Status SecureDataDir(const std::string& dir) {
  struct stat st {};
  if (lstat(dir.c_str(), &st) != 0) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec || chmod(dir.c_str(), 0700) != 0) {
      return absl::FailedPreconditionError(absl::StrCat("cannot create data directory ", dir, ": ",
                                                        ec ? ec.message() : std::strerror(errno)));
    }
    return absl::OkStatus();
  }
  if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("data directory ", dir, " is not a directory (a symbolic link?)"));
  }
  if (st.st_uid != geteuid()) {
    return absl::FailedPreconditionError(
        absl::StrCat("data directory ", dir, " belongs to user ", st.st_uid, ", not to this one (",
                     geteuid(), "); each master needs a directory of its own"));
  }
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "data directory ", dir, " can be written by other users: chmod go-w it (0700 is best)"));
  }
  return absl::OkStatus();
}

// Locks `dir` against a second master; returns the descriptor holding the lock.
absl::StatusOr<int> LockDataDir(const std::string& dir) {
  if (absl::Status s = SecureDataDir(dir); !s.ok()) return s;
  const std::string path = dir + "/LOCK";
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    char holder[32] = {};
    const ssize_t n = pread(fd, holder, sizeof(holder) - 1, 0);
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat(
        "data directory ", dir, " is in use by another master",
        n > 0 ? absl::StrCat(" (pid ", std::string(Trim(std::string_view(holder, n))), ")") : "",
        "; each master needs a directory of its own"));
  }
  // The pid is only a hint for the message above: the lock holds whether it is written or not.
  const std::string pid = std::to_string(getpid()) + "\n";
  if (ftruncate(fd, 0) == 0) {
    [[maybe_unused]] const ssize_t written = pwrite(fd, pid.data(), pid.size(), 0);
  }
  return fd;
}

struct Mark {
  std::string epoch;
  int64_t commits = 0;
};

// The high-water mark file: "EPOCH COMMITS". Missing: nullopt.
absl::StatusOr<std::optional<Mark>> ReadMark(const std::string& path) {
  if (!std::filesystem::exists(path)) return std::nullopt;
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return text.status();
  const std::string line(Trim(*text));
  std::vector<std::string> parts = absl::StrSplit(line, ' ', absl::SkipEmpty());
  Mark mark;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[1], &mark.commits)) {
    return absl::DataLossError(absl::StrCat(path, " is unreadable", kRepairHint));
  }
  mark.epoch = parts[0];
  return mark;
}

absl::StatusOr<int64_t> PragmaInt(sqlite3* db, const char* name) {
  Statement s;
  if (absl::Status st = s.Prepare(db, absl::StrCat("PRAGMA ", name)); !st.ok()) return st;
  if (sqlite3_step(s.get()) != SQLITE_ROW) return LastError(db, name);
  return sqlite3_column_int64(s.get(), 0);
}

absl::StatusOr<std::string> MetaValue(sqlite3* db, const char* key) {
  Statement s;
  if (absl::Status st = s.Prepare(db, absl::StrCat("SELECT value FROM meta WHERE key='", key, "'"));
      !st.ok()) {
    return st;
  }
  if (sqlite3_step(s.get()) != SQLITE_ROW) return absl::NotFoundError(key);
  return Text(s.get(), 0);
}

}  // namespace

DataDir::DataDir(std::string dir, int lock_fd)
    : dir_(std::move(dir)),
      db_path_(dir_ + "/taskmaster.db"),
      mark_path_(dir_ + "/COMMITS"),
      lock_fd_(lock_fd) {}

DataDir::~DataDir() {
  sqlite3_close_v2(db_);
  if (mark_fd_ >= 0) close(mark_fd_);
  close(lock_fd_);
}

absl::StatusOr<std::unique_ptr<DataDir>> DataDir::Open(const SqliteStoreOptions& options,
                                                       bool repairing) {
  if (options.data_dir.empty()) return absl::InvalidArgumentError("no data directory given");
  absl::StatusOr<int> lock_fd = LockDataDir(options.data_dir);
  if (!lock_fd.ok()) return lock_fd.status();
  std::unique_ptr<DataDir> dir(new DataDir(options.data_dir, *lock_fd));
  if (absl::Status s = dir->OpenDatabase(options, repairing); !s.ok()) return s;
  return dir;
}

absl::Status DataDir::OpenDatabase(const SqliteStoreOptions& options, bool repairing) {
  const bool existed =
      std::filesystem::exists(db_path_) && std::filesystem::file_size(db_path_) > 0;
  absl::StatusOr<std::optional<Mark>> mark = ReadMark(mark_path_);
  if (!mark.ok() && !repairing) return mark.status();
  if (!mark.ok()) mark = std::optional<Mark>();
  if (!existed && *mark && (*mark)->commits > 0 && !repairing) {
    return absl::DataLossError(absl::StrCat(
        db_path_, " is missing or empty, but ", mark_path_, " says store ", (*mark)->epoch,
        " held ", (*mark)->commits,
        " commits: the database was deleted. Restore it from a backup, or move the whole data "
        "directory away to start with an empty store"));
  }
  // One thread at a time uses the connection (the store's loader, then its writer alone), so
  // SQLite's own per-call mutex only costs: a quarter of a restart's time went to it.
  if (sqlite3_open_v2(
          db_path_.c_str(), &db_,
          SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOFOLLOW | SQLITE_OPEN_NOMUTEX,
          nullptr) != SQLITE_OK) {
    return Refuse("cannot be opened");
  }
  // Owner only, whatever the umask; SQLite gives its WAL and index the same mode.
  if (!existed && chmod(db_path_.c_str(), 0600) != 0) return Refuse("cannot be made private");
  sqlite3_busy_timeout(db_, 1000);
  // Read the header before changing anything: a file we cannot use stays as it was.
  absl::StatusOr<int64_t> app = PragmaInt(db_, "application_id");
  absl::StatusOr<int64_t> version = PragmaInt(db_, "user_version");
  absl::StatusOr<int64_t> tables = PragmaInt(db_, "schema_version");
  if (!app.ok() || !version.ok() || !tables.ok()) return Refuse("has an unreadable header");
  const bool fresh = !existed || (*app == 0 && *version == 0 && *tables == 0);
  if (!fresh) {
    if (*app != kApplicationId) {
      return absl::FailedPreconditionError(absl::StrCat(
          db_path_,
          " is not a taskmaster database; it was left untouched (move the data directory away "
          "to start with an empty store)"));
    }
    if (*version > kSchemaVersion) {
      return absl::FailedPreconditionError(absl::StrCat(
          db_path_, " has schema version ", *version, ", newer than this taskmaster knows (",
          kSchemaVersion, "); upgrade taskmaster. The database was left untouched"));
    }
    if (*version < 1) return Refuse(absl::StrCat("has unknown schema version ", *version));
  }
  for (const std::string& pragma :
       {std::string("PRAGMA journal_mode=WAL"),
        // Bounds the WAL file once a checkpoint has copied it back.
        std::string("PRAGMA journal_size_limit=67108864"),
        std::string(options.sync == SyncMode::kFull ? "PRAGMA synchronous=FULL"
                                                    : "PRAGMA synchronous=NORMAL")}) {
    if (absl::Status s = Exec(db_, pragma); !s.ok()) return s;
  }
  if (fresh) {
    if (absl::Status s = CreateSchema(db_, "db-" + RandomHex(8)); !s.ok()) return s;
    // The new database's first pages in its own file, not only in the WAL.
    Exec(db_, "PRAGMA wal_checkpoint(TRUNCATE)").IgnoreError();
    GetLogger("store")->info("created an empty store in {}", db_path_);
  } else if (*version < kSchemaVersion) {
    if (absl::Status s = Migrate(db_, static_cast<int>(*version)); !s.ok()) {
      return Refuse(
          absl::StrCat("could not be migrated from schema version ", *version, ": ", s.message()));
    }
    GetLogger("store")->info("migrated {} from schema version {} to {}", db_path_, *version,
                             kSchemaVersion);
  }
  absl::StatusOr<std::string> epoch = MetaValue(db_, "epoch");
  absl::StatusOr<std::string> commits = MetaValue(db_, "commits");
  if (!epoch.ok() || !commits.ok() || !absl::SimpleAtoi(*commits, &commits_)) {
    return Refuse("has no readable epoch or commit count");
  }
  epoch_ = *epoch;
  if (*mark) {
    const Mark& m = **mark;
    if (m.epoch != epoch_ && !repairing) {
      return absl::DataLossError(absl::StrCat(
          mark_path_, " belongs to store ", m.epoch, " but ", db_path_, " is store ", epoch_,
          ": the database was replaced", kRepairHint, " (it accepts the database as it is)"));
    }
    if (m.epoch == epoch_ && m.commits > commits_) {
      lost_commits_ = m.commits - commits_;
      if (!repairing) {
        return absl::DataLossError(absl::StrCat(
            db_path_, " holds ", commits_, " commits but had ", m.commits, " (", mark_path_,
            "): the last ", lost_commits_,
            " were lost, so its write-ahead log (taskmaster.db-wal) was deleted, cut short or "
            "damaged. Restore the directory from a backup if you can",
            kRepairHint, " (it accepts the loss)"));
      }
    }
  }
  if (repairing && !existed && *mark) lost_commits_ = (*mark)->commits;
  mark_fd_ = open(mark_path_.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (mark_fd_ < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open ", mark_path_, ": ", std::strerror(errno)));
  }
  if (!repairing) RecordCommits(commits_);
  return absl::OkStatus();
}

void DataDir::RecordCommits(int64_t commits) {
  commits_ = commits;
  // Fixed width, so a shorter number never leaves digits of a longer one behind.
  char line[64];
  const int n = std::snprintf(line, sizeof(line), "%s %020lld\n", epoch_.c_str(),
                              static_cast<long long>(commits));
  if (n > 0 && pwrite(mark_fd_, line, static_cast<size_t>(n), 0) == n) return;
  GetLogger("store")->warn("cannot write {}: {}", mark_path_, std::strerror(errno));
}

absl::Status DataDir::Refuse(std::string_view what) const {
  return absl::FailedPreconditionError(absl::StrCat(
      db_path_, " ", std::string(what), db_ ? absl::StrCat(" (", sqlite3_errmsg(db_), ")") : "",
      "; the database was left untouched (restore it from a backup, or move the data directory "
      "away to start with an empty store)"));
}

}  // namespace taskmaster::sqlite
