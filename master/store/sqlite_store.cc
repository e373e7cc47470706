// The durable store: SQLite in WAL mode, written by one thread that commits every change queued
// since its last commit in one transaction. docs/storage.md describes the files and guarantees.
#include "master/store/sqlite_store.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "master/store/completer.h"
#include "master/store/sqlite_files.h"
#include "master/store/sqlite_records.h"

namespace taskmaster {
namespace {

using sqlite::BindBlob;
using sqlite::BindText;
using sqlite::DataDir;
using sqlite::Statement;

// The master's exit code when its store cannot be trusted to hold what it wrote.
constexpr int kFatalExitCode = 70;  // EX_SOFTWARE
// The writer copies the WAL back into the database once it holds this many pages (SQLite's own
// default), itself rather than inside COMMIT, where SQLite would ignore a failed fsync.
constexpr int kCheckpointPages = 1000;

// One queued change. Changes to the same task within a batch collapse into one.
struct Op {
  enum class Kind : uint8_t {
    kSubmit,
    kUpdateTask,
    kDeleteTask,
    kDeleteJob,
    kPutWorker,
    kDeleteWorker,
    kNone
  };
  Kind kind = Kind::kNone;
  TaskId task_id = 0;    // kUpdateTask, kDeleteTask
  TaskStatusRow status;  // kUpdateTask
  std::string key;       // kDeleteJob: the job; kPutWorker, kDeleteWorker: the worker
  std::string secret;    // kPutWorker
  // kSubmit: the rows, and who waits for them to be written or refused.
  std::unique_ptr<SubmitRows> submit;
  std::function<void(absl::Status)> submitted;
};

class SqliteStore final : public Store {
 public:
  SqliteStore(SqliteStoreOptions options, std::unique_ptr<DataDir> dir)
      : options_(std::move(options)),
        dir_(std::move(dir)),
        db_(dir_->db()),
        reserve_path_(options_.data_dir + "/RESERVE"),
        log_(GetLogger("store")) {}

  ~SqliteStore() override { Close(); }

  // Called by the broker, then again by the destructor: the second call finds both threads
  // joined already.
  void Close() override {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    // The writer commits what it can and hands over its last callbacks; the completer runs them
    // and any they cause, then ends.
    if (writer_.joinable()) writer_.join();
    completer_.Close();
  }

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
    writer_ = std::thread([this] { WriterLoop(); });
    return absl::OkStatus();
  }

  std::string Epoch() const override { return dir_->epoch(); }
  bool persistent() const override { return true; }

  absl::Status Load(RecoveryVisitor* visitor) override {
    {
      absl::MutexLock lock(&mu_);
      // Nothing queued yet, so the writer has no commit under way: with loading_ set it starts
      // none, and the connection (opened without SQLite's mutexes) is the loader's alone.
      if (version_ != 0) {
        return absl::FailedPreconditionError("the store is loaded before any change, once");
      }
      loading_ = true;
    }
    absl::Status loaded = sqlite::LoadRecords(*dir_, visitor);
    absl::MutexLock lock(&mu_);
    loading_ = false;
    return loaded;
  }

  StoreMetrics Metrics() const override {
    absl::MutexLock lock(&mu_);
    return metrics_;
  }

  absl::Status Writable() const override {
    absl::MutexLock lock(&mu_);
    return error_;
  }

  void Submit(SubmitRows rows, std::function<void(absl::Status)> done) override {
    auto owned = std::make_unique<SubmitRows>(std::move(rows));
    {
      absl::MutexLock lock(&mu_);
      if (!writer_done_) {
        Op& op = Append(Op::Kind::kSubmit);
        op.submit = std::move(owned);
        op.submitted = std::move(done);
        return;
      }
    }
    Answer(std::move(done), ClosedError());
  }

  void UpdateTask(TaskId id, TaskStatusRow status) override {
    absl::MutexLock lock(&mu_);
    ++version_;
    if (auto it = task_ops_.find(id); it != task_ops_.end()) {
      Op& earlier = pending_[it->second];
      if (earlier.kind == Op::Kind::kUpdateTask) {
        earlier.status = std::move(status);
        return;
      }
    }
    Op& op = Append(Op::Kind::kUpdateTask);
    op.task_id = id;
    op.status = std::move(status);
    task_ops_[id] = pending_.size() - 1;
  }

  void DeleteTask(TaskId id) override {
    absl::MutexLock lock(&mu_);
    if (auto it = task_ops_.find(id); it != task_ops_.end()) {
      // Whatever this batch would have written of the task is moot now.
      pending_[it->second].kind = Op::Kind::kNone;
    }
    Op& op = Append(Op::Kind::kDeleteTask);
    op.task_id = id;
    task_ops_[id] = pending_.size() - 1;
  }

  void DeleteJob(const std::string& job_id) override {
    absl::MutexLock lock(&mu_);
    Op& op = Append(Op::Kind::kDeleteJob);
    op.key = job_id;
  }

  void PutWorker(const WorkerRow& worker) override {
    absl::MutexLock lock(&mu_);
    Op& op = Append(Op::Kind::kPutWorker);
    op.key = worker.worker_id;
    op.secret = worker.secret;
  }

  void DeleteWorker(const std::string& worker_id) override {
    absl::MutexLock lock(&mu_);
    Append(Op::Kind::kDeleteWorker).key = worker_id;
  }

  void Flush(std::function<void(absl::Status)> done) override {
    bool durable = false;
    bool closed = false;
    {
      absl::MutexLock lock(&mu_);
      if (writer_done_ && durable_ < version_) {
        closed = true;
      } else if (durable_ < version_ || !error_.ok()) {
        waiters_.push_back({version_, std::move(done)});
        return;
      } else {
        durable = true;
      }
    }
    if (closed) {
      Answer(std::move(done), ClosedError());
    } else {
      done(durable ? absl::OkStatus() : ClosedError());
    }
  }

 private:
  Op& Append(Op::Kind kind) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ++version_;
    pending_.emplace_back().kind = kind;
    return pending_.back();
  }

  void WriterLoop() {
    bool failing = false;  // the last commit failed for want of space: wait, then try again
    while (true) {
      if (failing) SleepUnlessStopping(options_.retry_interval_ms);
      std::vector<Op> batch;
      uint64_t target;
      {
        absl::MutexLock lock(&mu_);
        // While failing, an empty commit still writes the commit count: it tells when the disk
        // takes writes again, so new submits are accepted again.
        auto work = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return !loading_ && (stop_ || !pending_.empty() || !error_.ok());
        };
        mu_.Await(absl::Condition(&work));
        if (stop_ && (pending_.empty() || failing)) {
          if (!pending_.empty()) {
            log_->error("stopping with {} changes that could not be written", pending_.size());
          }
          StopWriting();
          return;
        }
        batch.swap(pending_);
        task_ops_.clear();
        target = version_;
      }
      const auto began = std::chrono::steady_clock::now();
      absl::Status status = Commit(batch);
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - began;
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
      // Submits are written whole or dropped: a client told that its batch failed must never
      // find it stored later. Every other change is kept and written again before newer ones.
      std::vector<std::function<void(absl::Status)>> done;
      for (Op& op : batch) {
        if (op.kind != Op::Kind::kSubmit) continue;
        done.push_back(std::move(op.submitted));
        op.kind = Op::Kind::kNone;
      }
      const size_t submits = done.size();
      bool changed;  // from writing to failing or back
      bool idle;     // nothing waits to be written
      {
        absl::MutexLock lock(&mu_);
        if (status.ok()) {
          durable_ = target;
          metrics_.commit_seconds.Observe(took.count());
          metrics_.commit_changes.Observe(static_cast<double>(batch.size()));
        }
        changed = status.ok() != error_.ok();
        error_ = status;
        auto first_pending = std::partition(waiters_.begin(), waiters_.end(),
                                            [&](const auto& w) { return w.first <= target; });
        for (auto it = waiters_.begin(); it != first_pending; ++it) {
          done.push_back(std::move(it->second));
        }
        waiters_.erase(waiters_.begin(), first_pending);
        if (!status.ok()) Requeue(std::move(batch));
        idle = pending_.empty();
      }
      failing = !status.ok();
      if (changed && status.ok()) log_->info("the store writes again");
      if (changed && !status.ok()) {
        log_->error("{}; new submits are refused until it writes again",
                    std::string(status.message()));
      }
      if (!status.ok() && submits > 0) {
        log_->warn("{} submits were refused for want of space and not stored", submits);
      }
      // With nothing to commit next, the answers go out from here: a hand-off to the completer
      // would cost a sequential round trip a thread's wake-up per commit.
      if (idle) {
        completer_.RunOrPost(std::move(done), status);
      } else {
        completer_.Post(std::move(done), status);
      }
    }
  }

  // The writer's last act: whoever still waits is told that the store closed first.
  void StopWriting() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<std::function<void(absl::Status)>> done;
    for (Op& op : pending_) {
      if (op.kind == Op::Kind::kSubmit) done.push_back(std::move(op.submitted));
    }
    for (auto& [version, callback] : waiters_) done.push_back(std::move(callback));
    waiters_.clear();
    completer_.Post(std::move(done), ClosedError());
    writer_done_ = true;
  }

  static absl::Status ClosedError() {
    return absl::UnavailableError("the master stopped before this was written");
  }

  // After the writer stopped: the completer answers while it runs, the caller once it is closed.
  void Answer(std::function<void(absl::Status)> done, absl::Status status) {
    std::vector<std::function<void(absl::Status)>> one;
    one.push_back(std::move(done));
    if (!completer_.Post(std::move(one), status)) one.front()(status);
  }

  // Puts the changes of a failed commit back before those queued since, collapsing the changes
  // of each task again, so a long outage keeps one pending change per task instead of a list.
  void Requeue(std::vector<Op> failed) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<Op> newer;
    newer.swap(pending_);
    task_ops_.clear();
    for (std::vector<Op>* ops : {&failed, &newer}) {
      for (Op& op : *ops) {
        if (op.kind == Op::Kind::kNone) continue;
        const bool per_task = op.kind == Op::Kind::kUpdateTask || op.kind == Op::Kind::kDeleteTask;
        auto earlier = per_task ? task_ops_.find(op.task_id) : task_ops_.end();
        if (earlier != task_ops_.end()) {
          Op& e = pending_[earlier->second];
          if (op.kind == Op::Kind::kUpdateTask && e.kind == Op::Kind::kUpdateTask) {
            e.status = std::move(op.status);
            continue;
          }
          if (op.kind == Op::Kind::kDeleteTask) e.kind = Op::Kind::kNone;
        }
        if (per_task) task_ops_[op.task_id] = pending_.size();
        pending_.push_back(std::move(op));
      }
    }
  }

  // Sleeps `ms` unless the store is closing meanwhile, in steps on the monotonic clock: a timed
  // mutex wait here would follow the wall clock.
  void SleepUnlessStopping(int64_t ms) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (std::chrono::steady_clock::now() < until) {
      {
        absl::MutexLock lock(&mu_);
        if (stop_) return;
      }
      std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(
          std::chrono::milliseconds(20), until - std::chrono::steady_clock::now()));
    }
  }

  // A write failed for a reason other than space: the disk may no longer hold what an fsync
  // claimed, and retrying could report lost data as saved. Stop, and let recovery read what is
  // really on disk.
  [[noreturn]] void Fatal(const absl::Status& status) {
    log_->critical(
        "{}; stopping the master: after a failed write or fsync the disk may not hold what it "
        "was told to, and only a restart reads what it really holds",
        std::string(status.message()));
    log_->flush();
    std::_Exit(kFatalExitCode);
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

  absl::Status Commit(const std::vector<Op>& batch) {
    if (absl::Status s = sqlite::Exec(db_, "BEGIN IMMEDIATE"); !s.ok()) return s;
    absl::Status status;
    for (const Op& op : batch) {
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

  absl::Status Apply(const Op& op) {
    switch (op.kind) {
      case Op::Kind::kNone:
        return absl::OkStatus();
      case Op::Kind::kSubmit:
        return ApplySubmit(*op.submit);
      case Op::Kind::kUpdateTask:
        BindStatus(update_task_.get(), 1, op.task_id, op.status);
        sqlite3_bind_int64(update_task_.get(), 12, static_cast<int64_t>(op.task_id));
        return update_task_.Run();
      case Op::Kind::kDeleteTask:
        sqlite3_bind_int64(delete_task_.get(), 1, static_cast<int64_t>(op.task_id));
        return delete_task_.Run();
      case Op::Kind::kDeleteJob:
        BindText(delete_members_.get(), 1, op.key);
        if (absl::Status s = delete_members_.Run(); !s.ok()) return s;
        BindText(delete_job_.get(), 1, op.key);
        return delete_job_.Run();
      case Op::Kind::kPutWorker:
        BindText(put_worker_.get(), 1, op.key);
        BindText(put_worker_.get(), 2, op.secret);
        sqlite3_bind_int64(put_worker_.get(), 3, sqlite::WorkerChecksum({op.key, op.secret}));
        return put_worker_.Run();
      case Op::Kind::kDeleteWorker:
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
      const std::string labels = sqlite::EncodeLabels(t.labels);
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
  const std::shared_ptr<spdlog::logger> log_;
  Statement insert_task_, update_task_, delete_task_, insert_job_, delete_job_, delete_members_,
      insert_member_, put_worker_, delete_worker_, count_commit_;
  std::thread writer_;
  Completer completer_;
  // Writer thread only (the WAL hook runs inside its commits).
  int wal_pages_ = 0;
  bool reserve_held_ = false;
  bool reserve_warned_ = false;

  mutable absl::Mutex mu_;
  std::vector<Op> pending_ ABSL_GUARDED_BY(mu_);
  std::unordered_map<TaskId, size_t> task_ops_ ABSL_GUARDED_BY(mu_);  // task → its op in pending_
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;                         // changes recorded
  uint64_t durable_ ABSL_GUARDED_BY(mu_) = 0;                         // changes committed
  std::vector<std::pair<uint64_t, std::function<void(absl::Status)>>> waiters_ ABSL_GUARDED_BY(mu_);
  StoreMetrics metrics_ ABSL_GUARDED_BY(mu_);  // of the commits that succeeded
  absl::Status error_ ABSL_GUARDED_BY(mu_);    // the last commit's error, OK once one succeeds
  bool stop_ ABSL_GUARDED_BY(mu_) = false;     // Close began
  // Load reads the database: the writer waits, as the connection takes one thread at a time.
  bool loading_ ABSL_GUARDED_BY(mu_) = false;
  bool writer_done_ ABSL_GUARDED_BY(mu_) = false;  // the writer ended: nothing more is written
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
