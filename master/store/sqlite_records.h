#pragma once

// The SQLite store's on-disk records: schema, migrations, checksums, and the checked scan that
// both recovery and --repair read the database with. docs/storage.md describes the format.

#include <sqlite3.h>

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "master/store/store.h"

namespace taskmaster::sqlite {

// 'TMS1': marks a taskmaster database, so we never adopt somebody else's SQLite file.
inline constexpr int kApplicationId = 0x544D5331;
// Bump when the schema changes, with a migration from every older version (see Migrate).
inline constexpr int kSchemaVersion = 4;

inline constexpr char kTaskColumns[] =
    "id, job_id, queue, kind, labels, payload, priority, max_attempts, timeout_ms, created_ms, "
    "idempotency_key, state, attempts, not_before_ms, finished_ms, seq, completion_seq, output, "
    "error, worker, worker_id, status_crc, spec_crc";

// A prepared statement, finalized with its owner.
class Statement {
 public:
  Statement() = default;
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  ~Statement() { sqlite3_finalize(stmt_); }
  absl::Status Prepare(sqlite3* db, const std::string& sql);
  sqlite3_stmt* get() const { return stmt_; }
  // Runs a statement that returns no rows, then resets it for the next use.
  absl::Status Run();

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

// Bound values must outlive the statement's next step.
void BindText(sqlite3_stmt* s, int i, std::string_view v);
void BindBlob(sqlite3_stmt* s, int i, std::string_view v);
std::string Text(sqlite3_stmt* s, int i);

// The error of the last call on `db`: RESOURCE_EXHAUSTED when the disk is full, since only that
// one is worth retrying; UNAVAILABLE otherwise.
absl::Status LastError(sqlite3* db, std::string_view doing);
absl::Status Exec(sqlite3* db, const std::string& sql);

// Creates the tables of kSchemaVersion with `epoch`, in one transaction.
absl::Status CreateSchema(sqlite3* db, const std::string& epoch);
// Brings a database of an older schema version to kSchemaVersion, in one transaction.
absl::Status Migrate(sqlite3* db, int from_version);

uint32_t JobChecksum(const JobRow& job);
uint32_t SpecChecksum(const TaskRow& task, std::string_view encoded_labels);
uint32_t StatusChecksum(TaskId id, const TaskStatusRow& status);
uint32_t MemberChecksum(const JobMemberRow& member);
uint32_t WorkerChecksum(const WorkerRow& worker);

// Reads every record, checking each against its checksum, its own rules and the records read
// before it (jobs, then tasks, then job members, then workers), then each job against the records
// it has.
// Each record goes to its callback with what is wrong with it ("" when nothing); only records
// without a problem count for their job. A table that cannot be read at all stops the scan with
// the error, as does an error from a callback.
struct ScanCallbacks {
  std::function<absl::Status(JobRow, const std::string& problem)> job;
  std::function<absl::Status(TaskRow, const std::string& problem)> task;
  std::function<absl::Status(JobMemberRow, const std::string& problem)> member;
  std::function<absl::Status(WorkerRow worker, const std::string& problem)> worker;
  // A sound job that has `found` of the `total` records it was submitted with.
  std::function<absl::Status(const std::string& job_id, int64_t total, int64_t found)> short_job;
};
absl::Status Scan(sqlite3* db, const ScanCallbacks& callbacks);

// The highest task id ever stored (deleted ones included), so ids are never reused.
absl::StatusOr<TaskId> HighestTaskId(sqlite3* db);

}  // namespace taskmaster::sqlite
