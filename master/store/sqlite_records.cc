#include "master/store/sqlite_records.h"

#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/checksum.h"
#include "common/util.h"
#include "master/store/labels.h"

namespace taskmaster::sqlite {
namespace {

constexpr char kSchema[] = R"sql(
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE jobs(job_id TEXT PRIMARY KEY, total INTEGER NOT NULL, created_ms INTEGER NOT NULL,
  crc INTEGER NOT NULL, tenant TEXT NOT NULL, open INTEGER NOT NULL, batches INTEGER NOT NULL)
  WITHOUT ROWID;
CREATE TABLE tasks(
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, queue TEXT NOT NULL, kind TEXT NOT NULL,
  labels TEXT NOT NULL, payload BLOB NOT NULL, priority INTEGER NOT NULL,
  max_attempts INTEGER NOT NULL, timeout_ms INTEGER NOT NULL, created_ms INTEGER NOT NULL,
  idempotency_key TEXT NOT NULL,
  state INTEGER NOT NULL, attempts INTEGER NOT NULL, not_before_ms INTEGER NOT NULL,
  finished_ms INTEGER NOT NULL, seq INTEGER NOT NULL, completion_seq INTEGER NOT NULL,
  output BLOB NOT NULL, error TEXT NOT NULL, worker TEXT NOT NULL, worker_id TEXT NOT NULL,
  spec_crc INTEGER NOT NULL, status_crc INTEGER NOT NULL);
CREATE TABLE job_members(job_id TEXT NOT NULL, task_id INTEGER NOT NULL,
  position INTEGER NOT NULL, crc INTEGER NOT NULL, PRIMARY KEY(job_id, task_id)) WITHOUT ROWID;
CREATE TABLE workers(worker_id TEXT PRIMARY KEY, secret TEXT NOT NULL, crc INTEGER NOT NULL)
  WITHOUT ROWID;
INSERT INTO meta VALUES('commits', '0');
)sql";

// Version 1 had no checksums, no commit count and no workers.
constexpr char kMigrateFrom1[] = R"sql(
CREATE TABLE workers(worker_id TEXT PRIMARY KEY, secret TEXT NOT NULL, crc INTEGER NOT NULL)
  WITHOUT ROWID;
ALTER TABLE jobs ADD COLUMN crc INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN spec_crc INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN status_crc INTEGER NOT NULL DEFAULT 0;
ALTER TABLE job_members ADD COLUMN crc INTEGER NOT NULL DEFAULT 0;
INSERT INTO meta VALUES('commits', '0');
)sql";

// Version 2 had no tenants: its jobs belong to the default one, and their checksums still hold.
constexpr char kMigrateFrom2[] = R"sql(
ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
)sql";

// Version 3 had no jobs built from several submits: each was one closed batch, and its checksum
// still holds.
constexpr char kMigrateFrom3[] = R"sql(
ALTER TABLE jobs ADD COLUMN open INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN batches INTEGER NOT NULL DEFAULT 1;
)sql";

constexpr char kJobColumns[] = "job_id, total, created_ms, crc, tenant, open, batches";
constexpr char kMemberColumns[] = "job_id, task_id, position, crc";

// Runs `sql` and hands each row to `on_row`.
absl::Status ForEachRow(sqlite3* db, const std::string& sql,
                        const std::function<absl::Status(sqlite3_stmt*)>& on_row) {
  Statement stmt;
  if (absl::Status s = stmt.Prepare(db, sql); !s.ok()) return s;
  int rc;
  while ((rc = sqlite3_step(stmt.get())) == SQLITE_ROW) {
    if (absl::Status s = on_row(stmt.get()); !s.ok()) return s;
  }
  if (rc != SQLITE_DONE) return LastError(db, sql);
  return absl::OkStatus();
}

JobRow ReadJob(sqlite3_stmt* s) {
  return {Text(s, 0), sqlite3_column_int64(s, 1),      sqlite3_column_int64(s, 2),
          Text(s, 4), sqlite3_column_int64(s, 5) != 0, sqlite3_column_int64(s, 6)};
}

JobMemberRow ReadMember(sqlite3_stmt* s) {
  return {Text(s, 0), static_cast<TaskId>(sqlite3_column_int64(s, 1)), sqlite3_column_int64(s, 2)};
}

uint32_t StoredCrc(sqlite3_stmt* s, int i) {
  return static_cast<uint32_t>(sqlite3_column_int64(s, i));
}

// Reads a task row (kTaskColumns) and says what is wrong with it on its own.
TaskRow ReadTask(sqlite3_stmt* s, std::string* problem) {
  TaskRow t;
  t.id = static_cast<TaskId>(sqlite3_column_int64(s, 0));
  t.job_id = Text(s, 1);
  t.queue = Text(s, 2);
  t.kind = Text(s, 3);
  const std::string labels = Text(s, 4);
  t.payload = Text(s, 5);
  t.priority = sqlite3_column_int(s, 6);
  t.max_attempts = sqlite3_column_int(s, 7);
  t.timeout_ms = sqlite3_column_int64(s, 8);
  t.created_ms = sqlite3_column_int64(s, 9);
  t.idempotency_key = Text(s, 10);
  const int state = sqlite3_column_int(s, 11);
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
  if (SpecChecksum(t, labels) != StoredCrc(s, 22)) {
    *problem = "checksum mismatch in what was submitted (queue, kind, payload, ...)";
  } else if (StatusChecksum(t.id, t.status) != StoredCrc(s, 21)) {
    *problem = "checksum mismatch in its status";
  } else if (state < 0 || state > static_cast<int>(TaskState::kCancelled)) {
    *problem = absl::StrCat("unknown state ", state);
  } else if (!IsValidName(t.queue) || !IsValidName(t.kind)) {
    *problem = "invalid queue or kind name";
  } else if (t.max_attempts < 1 || t.status.attempts < 0 || t.status.attempts > t.max_attempts) {
    *problem = absl::StrCat("attempts ", t.status.attempts, " of ", t.max_attempts);
  } else if (IsFinished(t.status.state) != (t.status.completion_seq > 0)) {
    *problem = "finished state and completion order disagree";
  } else if (t.status.state == TaskState::kLeased && t.status.worker_id.empty()) {
    *problem = "leased to no worker";
  } else {
    absl::StatusOr<Labels> decoded = DecodeLabels(labels);
    if (decoded.ok()) {
      t.labels = std::move(*decoded);
    } else {
      *problem = std::string(decoded.status().message());
    }
  }
  return t;
}

}  // namespace

absl::Status Statement::Prepare(sqlite3* db, const std::string& sql) {
  sqlite3_finalize(stmt_);
  stmt_ = nullptr;
  if (sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt_, nullptr) != SQLITE_OK) {
    return LastError(db, sql);
  }
  return absl::OkStatus();
}

absl::Status Statement::Run() {
  const int rc = sqlite3_step(stmt_);
  absl::Status status =
      rc == SQLITE_DONE ? absl::OkStatus() : LastError(sqlite3_db_handle(stmt_), "a write");
  sqlite3_reset(stmt_);
  sqlite3_clear_bindings(stmt_);
  return status;
}

void BindText(sqlite3_stmt* s, int i, std::string_view v) {
  sqlite3_bind_text(s, i, v.data(), static_cast<int>(v.size()), SQLITE_STATIC);
}

void BindBlob(sqlite3_stmt* s, int i, std::string_view v) {
  sqlite3_bind_blob(s, i, v.data(), static_cast<int>(v.size()), SQLITE_STATIC);
}

std::string Text(sqlite3_stmt* s, int i) {
  const void* p = sqlite3_column_blob(s, i);
  return p ? std::string(static_cast<const char*>(p), sqlite3_column_bytes(s, i)) : "";
}

absl::Status LastError(sqlite3* db, std::string_view doing) {
  const std::string message = absl::StrCat(sqlite3_db_filename(db, "main"), ": ",
                                           sqlite3_errmsg(db), " (", std::string(doing), ")");
  return sqlite3_errcode(db) == SQLITE_FULL ? absl::ResourceExhaustedError(message)
                                            : absl::UnavailableError(message);
}

absl::Status Exec(sqlite3* db, const std::string& sql) {
  if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr) != SQLITE_OK) {
    return LastError(db, sql.substr(0, 40));
  }
  return absl::OkStatus();
}

absl::Status CreateSchema(sqlite3* db, const std::string& epoch) {
  return Exec(db, absl::StrCat("BEGIN;", kSchema, "INSERT INTO meta VALUES('epoch', '", epoch,
                               "');PRAGMA application_id=", kApplicationId,
                               ";PRAGMA user_version=", kSchemaVersion, ";COMMIT;"));
}

absl::Status Migrate(sqlite3* db, int from_version) {
  if (from_version < 1 || from_version >= kSchemaVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("no migration from schema version ", from_version));
  }
  if (absl::Status s =
          Exec(db, absl::StrCat("BEGIN;", from_version <= 1 ? kMigrateFrom1 : "",
                                from_version <= 2 ? kMigrateFrom2 : "", kMigrateFrom3));
      !s.ok()) {
    Exec(db, "ROLLBACK").IgnoreError();
    return s;
  }
  if (from_version >= 2) {
    return Exec(db, absl::StrCat("PRAGMA user_version=", kSchemaVersion, ";COMMIT;"));
  }
  auto fail = [db](absl::Status s) {
    Exec(db, "ROLLBACK").IgnoreError();
    return s;
  };
  // Checksums of the records as they are: they guard against damage from now on.
  std::vector<std::pair<TaskRow, std::string>> tasks;
  absl::Status s =
      ForEachRow(db, absl::StrCat("SELECT ", kTaskColumns, " FROM tasks"), [&](sqlite3_stmt* row) {
        std::string ignored;
        TaskRow t = ReadTask(row, &ignored);
        tasks.emplace_back(std::move(t), Text(row, 4));
        return absl::OkStatus();
      });
  if (!s.ok()) return fail(s);
  Statement update;
  if (s = update.Prepare(db, "UPDATE tasks SET spec_crc=?, status_crc=? WHERE id=?"); !s.ok()) {
    return fail(s);
  }
  for (const auto& [t, labels] : tasks) {
    sqlite3_bind_int64(update.get(), 1, SpecChecksum(t, labels));
    sqlite3_bind_int64(update.get(), 2, StatusChecksum(t.id, t.status));
    sqlite3_bind_int64(update.get(), 3, static_cast<int64_t>(t.id));
    if (s = update.Run(); !s.ok()) return fail(s);
  }
  std::vector<JobRow> jobs;
  s = ForEachRow(db, absl::StrCat("SELECT ", kJobColumns, " FROM jobs"), [&](sqlite3_stmt* row) {
    jobs.push_back(ReadJob(row));
    return absl::OkStatus();
  });
  if (!s.ok()) return fail(s);
  if (s = update.Prepare(db, "UPDATE jobs SET crc=? WHERE job_id=?"); !s.ok()) return fail(s);
  for (const JobRow& j : jobs) {
    sqlite3_bind_int64(update.get(), 1, JobChecksum(j));
    BindText(update.get(), 2, j.job_id);
    if (s = update.Run(); !s.ok()) return fail(s);
  }
  std::vector<JobMemberRow> members;
  s = ForEachRow(db, absl::StrCat("SELECT ", kMemberColumns, " FROM job_members"),
                 [&](sqlite3_stmt* row) {
                   members.push_back(ReadMember(row));
                   return absl::OkStatus();
                 });
  if (!s.ok()) return fail(s);
  if (s = update.Prepare(db, "UPDATE job_members SET crc=? WHERE job_id=? AND task_id=?");
      !s.ok()) {
    return fail(s);
  }
  for (const JobMemberRow& m : members) {
    sqlite3_bind_int64(update.get(), 1, MemberChecksum(m));
    BindText(update.get(), 2, m.job_id);
    sqlite3_bind_int64(update.get(), 3, static_cast<int64_t>(m.task_id));
    if (s = update.Run(); !s.ok()) return fail(s);
  }
  return Exec(db, absl::StrCat("PRAGMA user_version=", kSchemaVersion, ";COMMIT;"));
}

uint32_t JobChecksum(const JobRow& job) {
  RecordChecksum crc;
  crc.Add(job.job_id).Add(job.total).Add(job.created_ms);
  // Jobs of the default tenant keep the checksum they had before tenants existed, and closed
  // jobs of one batch the one they had before jobs took several.
  if (!job.tenant.empty()) crc.Add(job.tenant);
  if (job.open || job.batches != 1) crc.Add(int64_t{job.open}).Add(job.batches);
  return crc.value();
}

uint32_t SpecChecksum(const TaskRow& t, std::string_view encoded_labels) {
  return RecordChecksum()
      .Add(static_cast<int64_t>(t.id))
      .Add(t.job_id)
      .Add(t.queue)
      .Add(t.kind)
      .Add(encoded_labels)
      .Add(t.payload)
      .Add(t.priority)
      .Add(t.max_attempts)
      .Add(t.timeout_ms)
      .Add(t.created_ms)
      .Add(t.idempotency_key)
      .value();
}

uint32_t StatusChecksum(TaskId id, const TaskStatusRow& s) {
  return RecordChecksum()
      .Add(static_cast<int64_t>(id))
      .Add(static_cast<int64_t>(s.state))
      .Add(s.attempts)
      .Add(s.not_before_ms)
      .Add(s.finished_ms)
      .Add(static_cast<int64_t>(s.seq))
      .Add(static_cast<int64_t>(s.completion_seq))
      .Add(s.output)
      .Add(s.error)
      .Add(s.worker)
      .Add(s.worker_id)
      .value();
}

uint32_t WorkerChecksum(const WorkerRow& worker) {
  return RecordChecksum().Add(worker.worker_id).Add(worker.secret).value();
}

uint32_t MemberChecksum(const JobMemberRow& m) {
  return RecordChecksum()
      .Add(m.job_id)
      .Add(static_cast<int64_t>(m.task_id))
      .Add(m.position)
      .value();
}

absl::Status Scan(sqlite3* db, const ScanCallbacks& callbacks) {
  struct Tally {
    int64_t total = 0;
    int64_t found = 0;
    bool sound = true;
  };
  std::unordered_map<std::string, Tally> jobs;
  std::unordered_set<TaskId> unsound_tasks;  // a job following one of them lost it too
  // The job a record belongs to, when it is sound and known; else says why not in `problem`.
  auto job_of = [&](const std::string& job_id, std::string* problem) -> Tally* {
    auto it = jobs.find(job_id);
    if (it == jobs.end()) {
      *problem = absl::StrCat("its job ", job_id, " is not stored");
      return nullptr;
    }
    if (!it->second.sound) {
      *problem = absl::StrCat("its job ", job_id, " is damaged");
      return nullptr;
    }
    return &it->second;
  };

  absl::Status status =
      ForEachRow(db, absl::StrCat("SELECT ", kJobColumns, " FROM jobs"), [&](sqlite3_stmt* s) {
        JobRow job = ReadJob(s);
        std::string problem;
        if (JobChecksum(job) != StoredCrc(s, 3)) {
          problem = "checksum mismatch";
        } else if (job.total < 1) {
          problem = absl::StrCat("total of ", job.total, " tasks");
        } else if (job.batches < 1) {
          problem = absl::StrCat("count of ", job.batches, " batches");
        }
        Tally& tally = jobs[job.job_id];
        tally.total = job.total;
        tally.sound = problem.empty();
        return callbacks.job(std::move(job), problem);
      });
  if (!status.ok()) return status;
  status =
      ForEachRow(db, absl::StrCat("SELECT ", kTaskColumns, " FROM tasks"), [&](sqlite3_stmt* s) {
        std::string problem;
        TaskRow task = ReadTask(s, &problem);
        Tally* job = problem.empty() ? job_of(task.job_id, &problem) : nullptr;
        if (job) job->found++;
        if (!problem.empty()) unsound_tasks.insert(task.id);
        return callbacks.task(std::move(task), problem);
      });
  if (!status.ok()) return status;
  status = ForEachRow(db, absl::StrCat("SELECT ", kMemberColumns, " FROM job_members"),
                      [&](sqlite3_stmt* s) {
                        JobMemberRow member = ReadMember(s);
                        std::string problem;
                        if (MemberChecksum(member) != StoredCrc(s, 3)) {
                          problem = "checksum mismatch";
                        } else if (member.position < -1) {
                          problem = absl::StrCat("position ", member.position);
                        } else if (unsound_tasks.contains(member.task_id)) {
                          problem = absl::StrCat("its task ", member.task_id, " is damaged");
                        }
                        Tally* job = problem.empty() ? job_of(member.job_id, &problem) : nullptr;
                        if (job) job->found++;
                        return callbacks.member(std::move(member), problem);
                      });
  if (!status.ok()) return status;
  status = ForEachRow(db, "SELECT worker_id, secret, crc FROM workers", [&](sqlite3_stmt* s) {
    WorkerRow worker{Text(s, 0), Text(s, 1)};
    const bool sound = WorkerChecksum(worker) == StoredCrc(s, 2);
    return callbacks.worker(std::move(worker), sound ? "" : "checksum mismatch");
  });
  if (!status.ok()) return status;
  for (const auto& [id, tally] : jobs) {
    if (!tally.sound || tally.found == tally.total) continue;
    if (status = callbacks.short_job(id, tally.total, tally.found); !status.ok()) return status;
  }
  return absl::OkStatus();
}

absl::StatusOr<TaskId> HighestTaskId(sqlite3* db) {
  TaskId highest = 0;
  absl::Status s =
      ForEachRow(db, "SELECT seq FROM sqlite_sequence WHERE name='tasks'", [&](sqlite3_stmt* row) {
        highest = static_cast<TaskId>(sqlite3_column_int64(row, 0));
        return absl::OkStatus();
      });
  if (!s.ok()) return s;
  return highest;
}

}  // namespace taskmaster::sqlite
