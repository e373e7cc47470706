// The durable store: SQLite in WAL mode, written by one thread that commits every change queued
// since its last commit in one transaction. docs/storage.md describes the schema.
#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <thread>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/util.h"
#include "master/store.h"
#include "nlohmann/json.hpp"

namespace taskmaster {
namespace {

// 'TMS1': marks a taskmaster database, so we never adopt somebody else's SQLite file.
constexpr int kApplicationId = 0x544D5331;
// Bump when the schema changes, with a migration from every older version.
constexpr int kSchemaVersion = 1;

constexpr char kSchema[] = R"sql(
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE jobs(job_id TEXT PRIMARY KEY, total INTEGER NOT NULL, created_ms INTEGER NOT NULL)
  WITHOUT ROWID;
CREATE TABLE tasks(
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, queue TEXT NOT NULL, kind TEXT NOT NULL,
  labels TEXT NOT NULL, payload BLOB NOT NULL, priority INTEGER NOT NULL,
  max_attempts INTEGER NOT NULL, timeout_ms INTEGER NOT NULL, created_ms INTEGER NOT NULL,
  idempotency_key TEXT NOT NULL,
  state INTEGER NOT NULL, attempts INTEGER NOT NULL, not_before_ms INTEGER NOT NULL,
  finished_ms INTEGER NOT NULL, seq INTEGER NOT NULL, completion_seq INTEGER NOT NULL,
  output BLOB NOT NULL, error TEXT NOT NULL, worker TEXT NOT NULL, worker_id TEXT NOT NULL);
CREATE TABLE job_members(job_id TEXT NOT NULL, task_id INTEGER NOT NULL,
  position INTEGER NOT NULL, PRIMARY KEY(job_id, task_id)) WITHOUT ROWID;
)sql";

constexpr char kTaskColumns[] =
    "id, job_id, queue, kind, labels, payload, priority, max_attempts, timeout_ms, created_ms, "
    "idempotency_key, state, attempts, not_before_ms, finished_ms, seq, completion_seq, output, "
    "error, worker, worker_id";

std::string EncodeLabels(const Labels& labels) {
  if (labels.empty()) return "";
  return nlohmann::json(labels).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

Labels DecodeLabels(std::string_view text) {
  if (text.empty()) return {};
  return nlohmann::json::parse(text).get<Labels>();
}

// One queued change. Changes to the same task within a batch collapse into one.
struct Op {
  enum class Kind : uint8_t {
    kInsertJob,
    kInsertTask,
    kUpdateTask,
    kAddMember,
    kDeleteTask,
    kDeleteJob,
    kNone
  };
  Kind kind = Kind::kNone;
  TaskRow task;  // kInsertTask: all of it; kUpdateTask and kDeleteTask: id and status
  JobRow job;
  JobMemberRow member;
};

class Statement {
 public:
  Statement() = default;
  Statement(const Statement&) = delete;
  ~Statement() { sqlite3_finalize(stmt_); }
  sqlite3_stmt** out() { return &stmt_; }
  sqlite3_stmt* get() const { return stmt_; }

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

class SqliteStore final : public Store {
 public:
  SqliteStore(SqliteStoreOptions options, int lock_fd)
      : options_(std::move(options)),
        db_path_(options_.data_dir + "/taskmaster.db"),
        lock_fd_(lock_fd),
        log_(GetLogger("store")) {}

  ~SqliteStore() override {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    if (writer_.joinable()) writer_.join();
    for (Statement* s : {&insert_task_, &update_task_, &delete_task_, &insert_job_, &delete_job_,
                         &delete_members_, &insert_member_}) {
      sqlite3_finalize(s->get());
      *s->out() = nullptr;
    }
    sqlite3_close(db_);
    close(lock_fd_);
  }

  absl::Status Open() {
    const bool existed =
        std::filesystem::exists(db_path_) && std::filesystem::file_size(db_path_) > 0;
    if (sqlite3_open_v2(db_path_.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                        nullptr) != SQLITE_OK) {
      return Refuse("cannot open it");
    }
    sqlite3_busy_timeout(db_, 1000);
    // Read the header before changing anything: a file we cannot use stays as it was.
    absl::StatusOr<int64_t> app = PragmaInt("application_id");
    if (!app.ok()) return app.status();
    absl::StatusOr<int64_t> version = PragmaInt("user_version");
    if (!version.ok()) return version.status();
    const bool fresh = !existed || (*app == 0 && *version == 0 && TableCount() == 0);
    if (!fresh) {
      if (*app != kApplicationId) {
        return absl::FailedPreconditionError(
            absl::StrCat(db_path_,
                         " is not a taskmaster database; it was left untouched (move it away to "
                         "start with an empty store)"));
      }
      if (*version > kSchemaVersion) {
        return absl::FailedPreconditionError(absl::StrCat(
            db_path_, " has schema version ", *version, ", newer than this taskmaster knows (",
            kSchemaVersion, "); upgrade taskmaster. The database was left untouched"));
      }
      if (*version != kSchemaVersion) {
        return absl::FailedPreconditionError(absl::StrCat(
            db_path_, " has unknown schema version ", *version, " (this taskmaster knows ",
            kSchemaVersion, "); the database was left untouched"));
      }
    }
    if (absl::Status s = Exec("PRAGMA journal_mode=WAL"); !s.ok()) return s;
    // Bounds the WAL file once a checkpoint has copied it back.
    if (absl::Status s = Exec("PRAGMA journal_size_limit=67108864"); !s.ok()) return s;
    if (absl::Status s = Exec(options_.sync == SyncMode::kFull ? "PRAGMA synchronous=FULL"
                                                               : "PRAGMA synchronous=NORMAL");
        !s.ok()) {
      return s;
    }
    if (fresh) {
      const std::string create =
          absl::StrCat("BEGIN;", kSchema, "INSERT INTO meta VALUES('epoch', 'db-", RandomHex(8),
                       "');PRAGMA application_id=", kApplicationId,
                       ";PRAGMA user_version=", kSchemaVersion, ";COMMIT;");
      if (absl::Status s = Exec(create); !s.ok()) return s;
      log_->info("created an empty store in {}", db_path_);
    }
    absl::StatusOr<std::string> epoch = ReadEpoch();
    if (!epoch.ok()) return epoch.status();
    epoch_ = *epoch;
    if (absl::Status s = Prepare(); !s.ok()) return s;
    writer_ = std::thread([this] { WriterLoop(); });
    return absl::OkStatus();
  }

  std::string Epoch() const override { return epoch_; }
  bool persistent() const override { return true; }

  absl::Status Load(RecoveryVisitor* visitor) override {
    absl::Status status =
        ForEachRow("SELECT job_id, total, created_ms FROM jobs", "its jobs", [&](sqlite3_stmt* s) {
          visitor->OnJob({Text(s, 0), sqlite3_column_int64(s, 1), sqlite3_column_int64(s, 2)});
          return absl::OkStatus();
        });
    if (!status.ok()) return status;
    status = ForEachRow(absl::StrCat("SELECT ", kTaskColumns, " FROM tasks"), "its tasks",
                        [&](sqlite3_stmt* s) {
                          absl::StatusOr<TaskRow> row = ReadTask(s);
                          if (!row.ok()) return row.status();
                          visitor->OnTask(std::move(*row));
                          return absl::OkStatus();
                        });
    if (!status.ok()) return status;
    status = ForEachRow(
        "SELECT job_id, task_id, position FROM job_members", "its job members",
        [&](sqlite3_stmt* s) {
          visitor->OnJobMember({Text(s, 0), static_cast<TaskId>(sqlite3_column_int64(s, 1)),
                                sqlite3_column_int64(s, 2)});
          return absl::OkStatus();
        });
    if (!status.ok()) return status;
    // AUTOINCREMENT remembers the highest id ever stored, so deleted ids are never reused.
    return ForEachRow("SELECT seq FROM sqlite_sequence WHERE name='tasks'", "its id sequence",
                      [&](sqlite3_stmt* s) {
                        visitor->OnHighestTaskId(static_cast<TaskId>(sqlite3_column_int64(s, 0)));
                        return absl::OkStatus();
                      });
  }

  absl::Status Writable() const override {
    absl::MutexLock lock(&mu_);
    return error_;
  }

  void InsertJob(const JobRow& job) override {
    absl::MutexLock lock(&mu_);
    Op& op = Append(Op::Kind::kInsertJob);
    op.job = job;
  }

  void InsertTask(TaskRow task) override {
    absl::MutexLock lock(&mu_);
    const TaskId id = task.id;
    Op& op = Append(Op::Kind::kInsertTask);
    op.task = std::move(task);
    task_ops_[id] = pending_.size() - 1;
  }

  void UpdateTask(TaskId id, TaskStatusRow status) override {
    absl::MutexLock lock(&mu_);
    ++version_;
    if (auto it = task_ops_.find(id); it != task_ops_.end()) {
      Op& earlier = pending_[it->second];
      if (earlier.kind == Op::Kind::kInsertTask || earlier.kind == Op::Kind::kUpdateTask) {
        earlier.task.status = std::move(status);
        return;
      }
    }
    Op& op = Append(Op::Kind::kUpdateTask);
    op.task.id = id;
    op.task.status = std::move(status);
    task_ops_[id] = pending_.size() - 1;
  }

  void AddJobMember(const JobMemberRow& member) override {
    absl::MutexLock lock(&mu_);
    Op& op = Append(Op::Kind::kAddMember);
    op.member = member;
  }

  void DeleteTask(TaskId id) override {
    absl::MutexLock lock(&mu_);
    if (auto it = task_ops_.find(id); it != task_ops_.end()) {
      // Whatever this batch would have written of the task is moot now.
      pending_[it->second].kind = Op::Kind::kNone;
    }
    Op& op = Append(Op::Kind::kDeleteTask);
    op.task.id = id;
    task_ops_[id] = pending_.size() - 1;
  }

  void DeleteJob(const std::string& job_id) override {
    absl::MutexLock lock(&mu_);
    Op& op = Append(Op::Kind::kDeleteJob);
    op.job.job_id = job_id;
  }

  void Flush(std::function<void(absl::Status)> done) override {
    {
      absl::MutexLock lock(&mu_);
      if (durable_ < version_ || !error_.ok()) {
        waiters_.push_back({version_, std::move(done)});
        return;
      }
    }
    done(absl::OkStatus());
  }

 private:
  Op& Append(Op::Kind kind) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ++version_;
    pending_.emplace_back().kind = kind;
    return pending_.back();
  }

  void WriterLoop() {
    std::vector<Op> retry;  // a batch that failed, written again before anything newer
    while (true) {
      std::vector<Op> batch;
      uint64_t target;
      {
        absl::MutexLock lock(&mu_);
        auto work = [this]()
                        ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !pending_.empty(); };
        auto stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_; };
        if (retry.empty()) {
          mu_.Await(absl::Condition(&work));
        } else {
          mu_.AwaitWithTimeout(absl::Condition(&stopping),
                               absl::Milliseconds(options_.retry_interval_ms));
        }
        if (stop_ && pending_.empty() && retry.empty()) return;
        batch.swap(pending_);
        task_ops_.clear();
        target = version_;
      }
      if (!retry.empty()) {
        retry.insert(retry.end(), std::make_move_iterator(batch.begin()),
                     std::make_move_iterator(batch.end()));
        batch = std::move(retry);
        retry.clear();
      }
      const absl::Status status = Commit(batch);
      std::vector<std::function<void(absl::Status)>> done;
      bool stopping;
      bool changed;  // from writing to failing or back
      {
        absl::MutexLock lock(&mu_);
        if (status.ok()) durable_ = target;
        changed = status.ok() != error_.ok();
        error_ = status;
        auto first_pending = std::partition(waiters_.begin(), waiters_.end(),
                                            [&](const auto& w) { return w.first <= target; });
        for (auto it = waiters_.begin(); it != first_pending; ++it) {
          done.push_back(std::move(it->second));
        }
        waiters_.erase(waiters_.begin(), first_pending);
        stopping = stop_;
      }
      if (changed && status.ok()) log_->info("the store writes again");
      if (changed && !status.ok()) {
        log_->error("{}; new submits are refused until it writes again", status.ToString());
      }
      for (auto& callback : done) callback(status);
      if (!status.ok()) {
        if (stopping) {
          log_->error("stopping with {} changes that could not be written", batch.size());
          return;
        }
        retry = std::move(batch);
      }
    }
  }

  absl::Status Commit(const std::vector<Op>& batch) {
    if (absl::Status s = Exec("BEGIN IMMEDIATE"); !s.ok()) return s;
    for (const Op& op : batch) {
      if (absl::Status s = Apply(op); !s.ok()) {
        Exec("ROLLBACK").IgnoreError();
        return s;
      }
    }
    if (absl::Status s = Exec("COMMIT"); !s.ok()) {
      Exec("ROLLBACK").IgnoreError();
      return s;
    }
    return absl::OkStatus();
  }

  absl::Status Apply(const Op& op) {
    sqlite3_stmt* s = nullptr;
    switch (op.kind) {
      case Op::Kind::kNone:
        return absl::OkStatus();
      case Op::Kind::kInsertJob:
        s = insert_job_.get();
        BindText(s, 1, op.job.job_id);
        sqlite3_bind_int64(s, 2, op.job.total);
        sqlite3_bind_int64(s, 3, op.job.created_ms);
        break;
      case Op::Kind::kInsertTask: {
        s = insert_task_.get();
        const TaskRow& t = op.task;
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
        BindStatus(s, 12, t.status);
        return Step(s);  // before `labels` goes away
      }
      case Op::Kind::kUpdateTask:
        s = update_task_.get();
        BindStatus(s, 1, op.task.status);
        sqlite3_bind_int64(s, 11, static_cast<int64_t>(op.task.id));
        break;
      case Op::Kind::kAddMember:
        s = insert_member_.get();
        BindText(s, 1, op.member.job_id);
        sqlite3_bind_int64(s, 2, static_cast<int64_t>(op.member.task_id));
        sqlite3_bind_int64(s, 3, op.member.position);
        break;
      case Op::Kind::kDeleteTask:
        s = delete_task_.get();
        sqlite3_bind_int64(s, 1, static_cast<int64_t>(op.task.id));
        break;
      case Op::Kind::kDeleteJob:
        BindText(delete_members_.get(), 1, op.job.job_id);
        if (absl::Status st = Step(delete_members_.get()); !st.ok()) return st;
        s = delete_job_.get();
        BindText(s, 1, op.job.job_id);
        break;
    }
    return Step(s);
  }

  // Binds the ten status columns starting at `first`.
  static void BindStatus(sqlite3_stmt* s, int first, const TaskStatusRow& st) {
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
  }

  static void BindText(sqlite3_stmt* s, int i, const std::string& v) {
    sqlite3_bind_text(s, i, v.data(), static_cast<int>(v.size()), SQLITE_STATIC);
  }
  static void BindBlob(sqlite3_stmt* s, int i, const std::string& v) {
    sqlite3_bind_blob(s, i, v.data(), static_cast<int>(v.size()), SQLITE_STATIC);
  }
  static std::string Text(sqlite3_stmt* s, int i) {
    const void* p = sqlite3_column_blob(s, i);
    return p ? std::string(static_cast<const char*>(p), sqlite3_column_bytes(s, i)) : "";
  }

  absl::Status Step(sqlite3_stmt* s) {
    const int rc = sqlite3_step(s);
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    if (rc != SQLITE_DONE) return WriteError();
    return absl::OkStatus();
  }

  absl::StatusOr<TaskRow> ReadTask(sqlite3_stmt* s) {
    TaskRow t;
    t.id = static_cast<TaskId>(sqlite3_column_int64(s, 0));
    t.job_id = Text(s, 1);
    t.queue = Text(s, 2);
    t.kind = Text(s, 3);
    try {
      t.labels = DecodeLabels(Text(s, 4));
    } catch (const std::exception& e) {
      return absl::DataLossError(
          absl::StrCat(db_path_, ": task ", t.id, " has unreadable labels: ", e.what()));
    }
    t.payload = Text(s, 5);
    t.priority = sqlite3_column_int(s, 6);
    t.max_attempts = sqlite3_column_int(s, 7);
    t.timeout_ms = sqlite3_column_int64(s, 8);
    t.created_ms = sqlite3_column_int64(s, 9);
    t.idempotency_key = Text(s, 10);
    const int state = sqlite3_column_int(s, 11);
    if (state < 0 || state > static_cast<int>(TaskState::kCancelled)) {
      return absl::DataLossError(
          absl::StrCat(db_path_, ": task ", t.id, " has an unknown state ", state));
    }
    t.status.state = static_cast<TaskState>(state);
    t.status.attempts = sqlite3_column_int(s, 12);
    t.status.not_before_ms = sqlite3_column_int64(s, 13);
    t.status.finished_ms = sqlite3_column_int64(s, 14);
    t.status.seq = static_cast<uint64_t>(sqlite3_column_int64(s, 15));
    t.status.completion_seq = static_cast<uint64_t>(sqlite3_column_int64(s, 16));
    t.status.output = Text(s, 17);
    t.status.error = Text(s, 18);
    t.status.worker = Text(s, 19);
    t.status.worker_id = Text(s, 20);
    return t;
  }

  absl::Status Prepare() {
    const std::string insert_task =
        absl::StrCat("INSERT OR REPLACE INTO tasks(", kTaskColumns,
                     ") VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
    for (auto [sql, stmt] : std::vector<std::pair<std::string, Statement*>>{
             {insert_task, &insert_task_},
             {"UPDATE tasks SET state=?, attempts=?, not_before_ms=?, finished_ms=?, seq=?, "
              "completion_seq=?, output=?, error=?, worker=?, worker_id=? WHERE id=?",
              &update_task_},
             {"DELETE FROM tasks WHERE id=?", &delete_task_},
             {"INSERT OR REPLACE INTO jobs(job_id, total, created_ms) VALUES(?,?,?)", &insert_job_},
             {"DELETE FROM jobs WHERE job_id=?", &delete_job_},
             {"DELETE FROM job_members WHERE job_id=?", &delete_members_},
             {"INSERT OR REPLACE INTO job_members(job_id, task_id, position) VALUES(?,?,?)",
              &insert_member_}}) {
      if (absl::Status s = PrepareOne(sql, stmt); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  // Runs `sql` and hands each row to `on_row`; `what` names the rows in an error.
  absl::Status ForEachRow(const std::string& sql, std::string_view what,
                          const std::function<absl::Status(sqlite3_stmt*)>& on_row) {
    Statement stmt;
    if (absl::Status s = PrepareOne(sql, &stmt); !s.ok()) return s;
    int rc;
    while ((rc = sqlite3_step(stmt.get())) == SQLITE_ROW) {
      if (absl::Status s = on_row(stmt.get()); !s.ok()) return s;
    }
    if (rc != SQLITE_DONE) return Refuse(absl::StrCat("cannot read ", std::string(what)));
    return absl::OkStatus();
  }

  absl::Status PrepareOne(const std::string& sql, Statement* stmt) {
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, stmt->out(), nullptr) != SQLITE_OK) {
      return Refuse("cannot read its schema");
    }
    return absl::OkStatus();
  }

  absl::Status Exec(const std::string& sql) {
    char* error = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &error) != SQLITE_OK) {
      sqlite3_free(error);
      return WriteError();
    }
    return absl::OkStatus();
  }

  absl::StatusOr<int64_t> PragmaInt(const char* name) {
    Statement s;
    if (sqlite3_prepare_v2(db_, absl::StrCat("PRAGMA ", name).c_str(), -1, s.out(), nullptr) !=
            SQLITE_OK ||
        sqlite3_step(s.get()) != SQLITE_ROW) {
      return Refuse("cannot read its header");
    }
    return sqlite3_column_int64(s.get(), 0);
  }

  int64_t TableCount() {
    Statement s;
    if (sqlite3_prepare_v2(db_, "SELECT count(*) FROM sqlite_master", -1, s.out(), nullptr) !=
            SQLITE_OK ||
        sqlite3_step(s.get()) != SQLITE_ROW) {
      return -1;
    }
    return sqlite3_column_int64(s.get(), 0);
  }

  absl::StatusOr<std::string> ReadEpoch() {
    Statement s;
    if (sqlite3_prepare_v2(db_, "SELECT value FROM meta WHERE key='epoch'", -1, s.out(), nullptr) !=
            SQLITE_OK ||
        sqlite3_step(s.get()) != SQLITE_ROW) {
      return Refuse("has no epoch");
    }
    return Text(s.get(), 0);
  }

  // An error at start: the database is left as it is.
  absl::Status Refuse(std::string_view what) {
    return absl::FailedPreconditionError(absl::StrCat(
        db_path_, " ", std::string(what), ": ", sqlite3_errmsg(db_),
        "; the database was left untouched (restore it from a backup, or move it away to start "
        "with an empty store)"));
  }

  absl::Status WriteError() {
    const int code = sqlite3_errcode(db_);
    const std::string message = absl::StrCat("cannot write ", db_path_, ": ", sqlite3_errmsg(db_));
    return code == SQLITE_FULL ? absl::ResourceExhaustedError(message)
                               : absl::UnavailableError(message);
  }

  const SqliteStoreOptions options_;
  const std::string db_path_;
  const int lock_fd_;
  const std::shared_ptr<spdlog::logger> log_;
  std::string epoch_;  // set by Open
  // Used by Open and Load before any change is recorded, then by the writer thread only.
  sqlite3* db_ = nullptr;
  Statement insert_task_, update_task_, delete_task_, insert_job_, delete_job_, delete_members_,
      insert_member_;
  std::thread writer_;

  mutable absl::Mutex mu_;
  std::vector<Op> pending_ ABSL_GUARDED_BY(mu_);
  std::unordered_map<TaskId, size_t> task_ops_ ABSL_GUARDED_BY(mu_);  // task → its op in pending_
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;                         // changes recorded
  uint64_t durable_ ABSL_GUARDED_BY(mu_) = 0;                         // changes committed
  std::vector<std::pair<uint64_t, std::function<void(absl::Status)>>> waiters_ ABSL_GUARDED_BY(mu_);
  absl::Status error_ ABSL_GUARDED_BY(mu_);  // the last commit's error, OK once one succeeds
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
};

// Locks `dir` against a second master; returns the descriptor holding the lock.
absl::StatusOr<int> LockDataDir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create data directory ", dir, ": ", ec.message()));
  }
  const std::string path = dir + "/LOCK";
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
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

}  // namespace

absl::StatusOr<std::unique_ptr<Store>> OpenSqliteStore(const SqliteStoreOptions& options) {
  if (options.data_dir.empty()) return absl::InvalidArgumentError("no data directory given");
  absl::StatusOr<int> lock_fd = LockDataDir(options.data_dir);
  if (!lock_fd.ok()) return lock_fd.status();
  auto store = std::make_unique<SqliteStore>(options, *lock_fd);
  if (absl::Status s = store->Open(); !s.ok()) return s;
  return store;
}

}  // namespace taskmaster
