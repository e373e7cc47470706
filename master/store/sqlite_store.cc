// The durable store: SQLite in WAL mode, written by one thread that commits every change queued
// since its last commit in one transaction. docs/storage.md describes the files and guarantees.
#include "master/store/sqlite_store.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "master/store/labels.h"
#include "master/store/queued_store.h"
#include "master/store/sqlite_files.h"
#include "master/store/sqlite_records.h"

namespace taskmaster {
namespace {

using sqlite::BindBlob;
using sqlite::BindText;
using sqlite::DataDir;
using sqlite::Statement;

// The writer copies the WAL back into the database once it holds this many pages (SQLite's own
// default), itself rather than inside COMMIT, where SQLite would ignore a failed fsync.
constexpr int kCheckpointPages = 1000;

class SqliteStore final : public QueuedStore {
 public:
  SqliteStore(SqliteStoreOptions options, std::unique_ptr<DataDir> dir)
      : QueuedStore(GetLogger("store"), options.retry_interval_ms),
        options_(std::move(options)),
        dir_(std::move(dir)),
        db_(dir_->db()),
        reserve_path_(options_.data_dir + "/RESERVE") {}

  ~SqliteStore() override { Close(); }

  absl::Status Start() {
    const std::string insert_task =
        absl::StrCat("INSERT OR REPLACE INTO tasks(", sqlite::kTaskColumns,
                     ") VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
    for (auto [sql, stmt] : std::vector<std::pair<std::string, Statement*>>{
             {insert_task, &insert_task_},
             {"UPDATE tasks SET state=?, attempts=?, not_before_ms=?, finished_ms=?, seq=?, "
              "completion_seq=?, output=?, error=?, worker=?, worker_id=?, status_crc=? "
              "WHERE id=?",
              &update_task_},
             {"DELETE FROM tasks WHERE id=?", &delete_task_},
             {"INSERT OR REPLACE INTO jobs(job_id, total, created_ms, crc, tenant, open, batches) "
              "VALUES(?,?,?,?,?,?,?)",
              &insert_job_},
             {"DELETE FROM jobs WHERE job_id=?", &delete_job_},
             {"DELETE FROM job_members WHERE job_id=?", &delete_members_},
             {"INSERT OR REPLACE INTO job_members(job_id, task_id, position, crc) "
              "VALUES(?,?,?,?)",
              &insert_member_},
             {"INSERT OR REPLACE INTO workers(worker_id, secret, crc) VALUES(?,?,?)", &put_worker_},
             {"DELETE FROM workers WHERE worker_id=?", &delete_worker_},
             {"UPDATE meta SET value=? WHERE key='commits'", &count_commit_}}) {
      if (absl::Status s = stmt->Prepare(db_, sql); !s.ok()) return s;
    }
    // Replaces SQLite's automatic checkpoints (see kCheckpointPages).
    sqlite3_wal_hook(
        db_,
        [](void* self, sqlite3*, const char*, int pages) {
          static_cast<SqliteStore*>(self)->wal_pages_ = pages;
          return SQLITE_OK;
        },
        this);
    KeepReserve();
    StartWriter();
    return absl::OkStatus();
  }

  std::string Epoch() const override { return dir_->epoch(); }
  bool persistent() const override { return true; }

  absl::Status LoadRecords(RecoveryVisitor* visitor) override {
    return sqlite::LoadRecords(*dir_, visitor);
  }

 private:
  CommitFailure AfterCommit(const absl::Status& status) override {
    if (status.ok() && wal_pages_ >= kCheckpointPages) {
      // A full disk stops the checkpoint, not the commit: the WAL holds the data meanwhile.
      absl::Status copied = Checkpoint(SQLITE_CHECKPOINT_PASSIVE);
      if (!copied.ok() && !absl::IsResourceExhausted(copied)) Fatal(copied);
    }
    if (!status.ok() && !absl::IsResourceExhausted(status)) Fatal(status);
    if (status.ok()) {
      KeepReserve();
    } else {
      MakeRoom();
    }
    return CommitFailure::kRefuseSubmits;
  }

  // A write failed for a reason other than space: the disk may no longer hold what an fsync
  // claimed, and retrying could report lost data as saved. Stop, and let recovery read what is
  // really on disk.
  [[noreturn]] void Fatal(const absl::Status& status) {
    StopTheMaster(status,
                  "after a failed write or fsync the disk may not hold what it was told to, and "
                  "only a restart reads what it really holds");
  }

  // The disk is full: give back the reserve and shrink the WAL to nothing, so the next commit
  // has room even if whatever filled the disk frees little.
  void MakeRoom() {
    if (reserve_held_) {
      std::error_code ec;
      std::filesystem::remove(reserve_path_, ec);
      reserve_held_ = false;
      log_->warn("disk full: released the {} byte reserve {}", options_.reserve_bytes,
                 reserve_path_);
    }
    if (absl::Status s = Checkpoint(SQLITE_CHECKPOINT_TRUNCATE);
        !s.ok() && !absl::IsResourceExhausted(s)) {
      Fatal(s);
    }
  }

  // Copies the WAL into the database. A full disk can stop it (RESOURCE_EXHAUSTED); any other
  // error is an I/O error on the database's own fsync.
  absl::Status Checkpoint(int mode) {
    const int rc = sqlite3_wal_checkpoint_v2(db_, nullptr, mode, nullptr, nullptr);
    if (rc != SQLITE_OK && rc != SQLITE_BUSY) return sqlite::LastError(db_, "a checkpoint");
    return absl::OkStatus();
  }

  // Holds `reserve_bytes` of disk in a file, for MakeRoom to give back when the disk fills; taken
  // again only once twice that is free, so the reserve never takes the room the store needs.
  void KeepReserve() {
    if (reserve_held_ || options_.reserve_bytes <= 0) return;
    struct statvfs fs {};
    if (statvfs(options_.data_dir.c_str(), &fs) != 0 ||
        static_cast<int64_t>(fs.f_bavail * fs.f_frsize) < 2 * options_.reserve_bytes) {
      return;
    }
    const int fd = open(reserve_path_.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) return;
    reserve_held_ = posix_fallocate(fd, 0, options_.reserve_bytes) == 0;
    close(fd);
    if (reserve_held_) return;
    std::error_code ec;
    std::filesystem::remove(reserve_path_, ec);  // a partial reserve only takes space
    if (!reserve_warned_) {
      log_->warn("cannot set aside a {} byte disk reserve in {}; trying again after commits",
                 options_.reserve_bytes, options_.data_dir);
      reserve_warned_ = true;
    }
  }

  absl::Status Commit(const std::vector<StoreChange>& batch) override {
    if (absl::Status s = sqlite::Exec(db_, "BEGIN IMMEDIATE"); !s.ok()) return s;
    absl::Status status;
    for (const StoreChange& op : batch) {
      if (status = Apply(op); !status.ok()) break;
    }
    const int64_t commits = dir_->commits() + 1;
    if (status.ok()) {
      sqlite3_bind_text(count_commit_.get(), 1, std::to_string(commits).c_str(), -1,
                        SQLITE_TRANSIENT);
      status = count_commit_.Run();
    }
    if (status.ok()) status = sqlite::Exec(db_, "COMMIT");
    if (!status.ok()) {
      sqlite::Exec(db_, "ROLLBACK").IgnoreError();
      return status;
    }
    dir_->RecordCommits(commits);
    return absl::OkStatus();
  }

  absl::Status Apply(const StoreChange& op) {
    switch (op.kind) {
      case StoreChange::Kind::kNone:
        return absl::OkStatus();
      case StoreChange::Kind::kSubmit:
        return ApplySubmit(*op.submit);
      case StoreChange::Kind::kUpdateTask:
        BindStatus(update_task_.get(), 1, op.task_id, op.status);
        sqlite3_bind_int64(update_task_.get(), 12, static_cast<int64_t>(op.task_id));
        return update_task_.Run();
      case StoreChange::Kind::kDeleteTask:
        sqlite3_bind_int64(delete_task_.get(), 1, static_cast<int64_t>(op.task_id));
        return delete_task_.Run();
      case StoreChange::Kind::kDeleteJob:
        BindText(delete_members_.get(), 1, op.key);
        if (absl::Status s = delete_members_.Run(); !s.ok()) return s;
        BindText(delete_job_.get(), 1, op.key);
        return delete_job_.Run();
      case StoreChange::Kind::kPutWorker:
        BindText(put_worker_.get(), 1, op.key);
        BindText(put_worker_.get(), 2, op.secret);
        sqlite3_bind_int64(put_worker_.get(), 3, sqlite::WorkerChecksum({op.key, op.secret}));
        return put_worker_.Run();
      case StoreChange::Kind::kDeleteWorker:
        BindText(delete_worker_.get(), 1, op.key);
        return delete_worker_.Run();
    }
    return absl::OkStatus();
  }

  absl::Status ApplySubmit(const SubmitRows& rows) {
    sqlite3_stmt* s = insert_job_.get();
    BindText(s, 1, rows.job.job_id);
    sqlite3_bind_int64(s, 2, rows.job.total);
    sqlite3_bind_int64(s, 3, rows.job.created_ms);
    sqlite3_bind_int64(s, 4, sqlite::JobChecksum(rows.job));
    BindText(s, 5, rows.job.tenant);
    sqlite3_bind_int64(s, 6, rows.job.open ? 1 : 0);
    sqlite3_bind_int64(s, 7, rows.job.batches);
    if (absl::Status st = insert_job_.Run(); !st.ok()) return st;
    s = insert_task_.get();
    for (const TaskRow& t : rows.tasks) {
      sqlite3_bind_int64(s, 1, static_cast<int64_t>(t.id));
      BindText(s, 2, t.job_id);
      BindText(s, 3, t.queue);
      BindText(s, 4, t.kind);
      const std::string labels = EncodeLabels(t.labels);
      BindText(s, 5, labels);
      BindBlob(s, 6, t.payload);
      sqlite3_bind_int(s, 7, t.priority);
      sqlite3_bind_int(s, 8, t.max_attempts);
      sqlite3_bind_int64(s, 9, t.timeout_ms);
      sqlite3_bind_int64(s, 10, t.created_ms);
      BindText(s, 11, t.idempotency_key);
      BindStatus(s, 12, t.id, t.status);
      sqlite3_bind_int64(s, 23, sqlite::SpecChecksum(t, labels));
      if (absl::Status st = insert_task_.Run(); !st.ok()) return st;  // before `labels` goes
    }
    s = insert_member_.get();
    for (const JobMemberRow& m : rows.members) {
      BindText(s, 1, m.job_id);
      sqlite3_bind_int64(s, 2, static_cast<int64_t>(m.task_id));
      sqlite3_bind_int64(s, 3, m.position);
      sqlite3_bind_int64(s, 4, sqlite::MemberChecksum(m));
      if (absl::Status st = insert_member_.Run(); !st.ok()) return st;
    }
    return absl::OkStatus();
  }

  // Binds the ten status columns starting at `first`, then their checksum.
  static void BindStatus(sqlite3_stmt* s, int first, TaskId id, const TaskStatusRow& st) {
    sqlite3_bind_int(s, first, static_cast<int>(st.state));
    sqlite3_bind_int(s, first + 1, st.attempts);
    sqlite3_bind_int64(s, first + 2, st.not_before_ms);
    sqlite3_bind_int64(s, first + 3, st.finished_ms);
    sqlite3_bind_int64(s, first + 4, static_cast<int64_t>(st.seq));
    sqlite3_bind_int64(s, first + 5, static_cast<int64_t>(st.completion_seq));
    BindBlob(s, first + 6, st.output);
    BindText(s, first + 7, st.error);
    BindText(s, first + 8, st.worker);
    BindText(s, first + 9, st.worker_id);
    sqlite3_bind_int64(s, first + 10, sqlite::StatusChecksum(id, st));
  }

  const SqliteStoreOptions options_;
  const std::unique_ptr<DataDir> dir_;
  // Used by Start and Load before any change is recorded, then by the writer thread only.
  sqlite3* const db_;
  const std::string reserve_path_;
  Statement insert_task_, update_task_, delete_task_, insert_job_, delete_job_, delete_members_,
      insert_member_, put_worker_, delete_worker_, count_commit_;
  // Writer thread only (the WAL hook runs inside its commits).
  int wal_pages_ = 0;
  bool reserve_held_ = false;
  bool reserve_warned_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Store>> OpenSqliteStore(const SqliteStoreOptions& options) {
  absl::StatusOr<std::unique_ptr<DataDir>> dir = DataDir::Open(options, /*repairing=*/false);
  if (!dir.ok()) return dir.status();
  auto store = std::make_unique<SqliteStore>(options, std::move(*dir));
  if (absl::Status s = store->Start(); !s.ok()) return s;
  return store;
}

}  // namespace taskmaster
