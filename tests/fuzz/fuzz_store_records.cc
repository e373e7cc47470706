// fuzz_store_records: what the SQLite store's recovery and --repair read from a damaged or
// forged database. The input fills the store's tables (sqlite::CreateSchema, in memory) with rows
// whose every column is the input's choice: NULL, an integer, a real, text, a blob, or a word of
// the store's own vocabulary (a queue name, a job id, labels in JSON). A checksum column may also
// be sealed: given the checksum of the row as it reads back, so rows get past the checksums to
// the checks behind them. Then sqlite::Scan reads everything with callbacks that count, and
// sqlite::HighestTaskId reads the id sequence.
//
// Asserts: the scan completes (every table is readable); a record it finds sound has a known
// state, valid queue and kind names, attempts within its bounds, a finished state that agrees
// with its completion order, a worker when leased, and a job with at least one task; a short job
// is reported only when its count differs.

#include <fuzzer/FuzzedDataProvider.h>
#include <sqlite3.h>

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>

#include "common/util.h"
#include "master/store/sqlite_records.h"
#include "tests/fuzz/fuzz_common.h"

namespace taskmaster::fuzz {
namespace {

// A checksum column holding this is sealed after the insert (see the header comment).
constexpr int64_t kSeal = 0x5EA1;

constexpr const char* kWords[] = {"",      "default", "square",  "q2", "job-1",
                                  "job-2", "w-1",     "secret",  "{}", "{\"gpu\":\"1\"}",
                                  "[1]",   "{\"a\":", "\xff\xfe"};

// Column values the way sqlite::Scan reads them (sqlite3_column_blob and _bytes for text,
// _int64 and _int for numbers), from a seal function's arguments.
std::string TextArg(sqlite3_value* v) {
  const void* p = sqlite3_value_blob(v);
  return p ? std::string(static_cast<const char*>(p), sqlite3_value_bytes(v)) : "";
}
int64_t IntArg(sqlite3_value* v) { return sqlite3_value_int64(v); }

// The checksums the store would have written for a row, as SQL functions of its columns, in
// the order of the tables' columns (see kTaskColumns).
void JobCrc(sqlite3_context* c, int, sqlite3_value** a) {
  JobRow job{TextArg(a[0]), IntArg(a[1]),      IntArg(a[2]),
             TextArg(a[3]), IntArg(a[4]) != 0, IntArg(a[5])};
  sqlite3_result_int64(c, sqlite::JobChecksum(job));
}

void SpecCrc(sqlite3_context* c, int, sqlite3_value** a) {
  TaskRow t;
  t.id = static_cast<TaskId>(IntArg(a[0]));
  t.job_id = TextArg(a[1]);
  t.queue = TextArg(a[2]);
  t.kind = TextArg(a[3]);
  t.payload = TextArg(a[5]);
  t.priority = sqlite3_value_int(a[6]);
  t.max_attempts = sqlite3_value_int(a[7]);
  t.timeout_ms = IntArg(a[8]);
  t.created_ms = IntArg(a[9]);
  t.idempotency_key = TextArg(a[10]);
  sqlite3_result_int64(c, sqlite::SpecChecksum(t, TextArg(a[4])));
}

void StatusCrc(sqlite3_context* c, int, sqlite3_value** a) {
  TaskStatusRow s;
  s.state = static_cast<TaskState>(sqlite3_value_int(a[1]));
  s.attempts = sqlite3_value_int(a[2]);
  s.not_before_ms = IntArg(a[3]);
  s.finished_ms = IntArg(a[4]);
  s.seq = static_cast<uint64_t>(IntArg(a[5]));
  s.completion_seq = static_cast<uint64_t>(IntArg(a[6]));
  s.output = TextArg(a[7]);
  s.error = TextArg(a[8]);
  s.worker = TextArg(a[9]);
  s.worker_id = TextArg(a[10]);
  sqlite3_result_int64(c, sqlite::StatusChecksum(static_cast<TaskId>(IntArg(a[0])), s));
}

void MemberCrc(sqlite3_context* c, int, sqlite3_value** a) {
  JobMemberRow m{TextArg(a[0]), static_cast<TaskId>(IntArg(a[1])), IntArg(a[2])};
  sqlite3_result_int64(c, sqlite::MemberChecksum(m));
}

void WorkerCrc(sqlite3_context* c, int, sqlite3_value** a) {
  sqlite3_result_int64(c, sqlite::WorkerChecksum({TextArg(a[0]), TextArg(a[1])}));
}

struct Table {
  const char* insert;
  int columns;
  const char* seal;  // gives every checksum column holding kSeal (each ?) its row's checksum
};

constexpr Table kTables[] = {
    {"INSERT INTO jobs(job_id, total, created_ms, crc, tenant, open, batches) "
     "VALUES(?,?,?,?,?,?,?)",
     7,
     "UPDATE jobs SET crc=job_crc(job_id, total, created_ms, tenant, open, batches) WHERE crc=?"},
    {"INSERT INTO tasks(id, job_id, queue, kind, labels, payload, priority, max_attempts, "
     "timeout_ms, created_ms, idempotency_key, state, attempts, not_before_ms, finished_ms, seq, "
     "completion_seq, output, error, worker, worker_id, status_crc, spec_crc) "
     "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
     23,
     "UPDATE tasks SET "
     "spec_crc=CASE WHEN spec_crc=? THEN spec_crc(id, job_id, queue, kind, labels, payload, "
     "priority, max_attempts, timeout_ms, created_ms, idempotency_key) ELSE spec_crc END, "
     "status_crc=CASE WHEN status_crc=? THEN status_crc(id, state, attempts, not_before_ms, "
     "finished_ms, seq, completion_seq, output, error, worker, worker_id) ELSE status_crc END"},
    {"INSERT INTO job_members(job_id, task_id, position, crc) VALUES(?,?,?,?)", 4,
     "UPDATE job_members SET crc=member_crc(job_id, task_id, position) WHERE crc=?"},
    {"INSERT INTO workers(worker_id, secret, crc) VALUES(?,?,?)", 3,
     "UPDATE workers SET crc=worker_crc(worker_id, secret) WHERE crc=?"},
};

void BindValue(FuzzedDataProvider& in, sqlite3_stmt* stmt, int i) {
  switch (in.ConsumeIntegralInRange(0, 7)) {
    case 0:
      sqlite3_bind_null(stmt, i);
      break;
    case 1:
      sqlite3_bind_int64(stmt, i, in.ConsumeIntegralInRange<int64_t>(-2, 12));
      break;
    case 2:
      sqlite3_bind_int64(stmt, i, in.ConsumeIntegral<int64_t>());
      break;
    case 3:
      sqlite3_bind_double(stmt, i, in.ConsumeFloatingPoint<double>());
      break;
    case 4: {
      const std::string text = in.ConsumeRandomLengthString(48);
      sqlite3_bind_text(stmt, i, text.data(), static_cast<int>(text.size()), SQLITE_TRANSIENT);
      break;
    }
    case 5: {
      const std::string blob = in.ConsumeRandomLengthString(48);
      sqlite3_bind_blob(stmt, i, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT);
      break;
    }
    case 6: {
      const char* word = in.PickValueInArray(kWords);
      sqlite3_bind_text(stmt, i, word, -1, SQLITE_STATIC);
      break;
    }
    default:
      sqlite3_bind_int64(stmt, i, kSeal);
  }
}

struct SealFunction {
  const char* name;
  int args;
  void (*fn)(sqlite3_context*, int, sqlite3_value**);
};

constexpr SealFunction kSealFunctions[] = {{"job_crc", 6, &JobCrc},
                                           {"spec_crc", 11, &SpecCrc},
                                           {"status_crc", 11, &StatusCrc},
                                           {"member_crc", 3, &MemberCrc},
                                           {"worker_crc", 2, &WorkerCrc}};

// The store's tables in memory, made once: opening and creating them for every input would take
// most of the time. Each input starts from empty tables.
class Database {
 public:
  Database() {
    FUZZ_CHECK(sqlite3_open(":memory:", &db_) == SQLITE_OK);
    FUZZ_CHECK(sqlite::CreateSchema(db_, "fuzz").ok());
    for (const SealFunction& f : kSealFunctions) {
      FUZZ_CHECK(sqlite3_create_function(db_, f.name, f.args, SQLITE_UTF8, nullptr, f.fn, nullptr,
                                         nullptr) == SQLITE_OK);
    }
    for (size_t t = 0; t < std::size(kTables); ++t) {
      FUZZ_CHECK(inserts_[t].Prepare(db_, kTables[t].insert).ok());
      FUZZ_CHECK(seals_[t].Prepare(db_, kTables[t].seal).ok());
    }
  }

  sqlite3* Fill(FuzzedDataProvider& in) {
    FUZZ_CHECK(sqlite::Exec(db_,
                            "DELETE FROM jobs; DELETE FROM tasks; DELETE FROM job_members; "
                            "DELETE FROM workers; DELETE FROM sqlite_sequence;")
                   .ok());
    for (int rows = 0; rows < 64 && in.remaining_bytes() > 0; ++rows) {
      const size_t t = in.ConsumeIntegralInRange<size_t>(0, std::size(kTables) - 1);
      for (int i = 1; i <= kTables[t].columns; ++i) BindValue(in, inserts_[t].get(), i);
      inserts_[t].Run().IgnoreError();  // a constraint may refuse the row, as a real file's would
    }
    for (sqlite::Statement& seal : seals_) {
      for (int i = 1; i <= sqlite3_bind_parameter_count(seal.get()); ++i) {
        sqlite3_bind_int64(seal.get(), i, kSeal);
      }
      FUZZ_CHECK(seal.Run().ok());
    }
    return db_;
  }

 private:
  sqlite3* db_ = nullptr;  // lives as long as the process
  sqlite::Statement inserts_[std::size(kTables)];
  sqlite::Statement seals_[std::size(kTables)];
};

struct Counts {
  int64_t sound = 0;
  int64_t damaged = 0;
};

}  // namespace
}  // namespace taskmaster::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace taskmaster;
  using namespace taskmaster::fuzz;
  FuzzedDataProvider in(data, size);
  static Database* const database = new Database;
  sqlite3* db = database->Fill(in);

  Counts jobs, tasks, members, workers;
  int64_t short_jobs = 0;
  auto count = [](Counts& c, const std::string& problem) {
    ++(problem.empty() ? c.sound : c.damaged);
    return absl::OkStatus();
  };
  sqlite::ScanCallbacks callbacks;
  callbacks.job = [&](JobRow job, const std::string& problem) {
    if (problem.empty()) FUZZ_CHECK(job.total >= 1);
    return count(jobs, problem);
  };
  callbacks.task = [&](TaskRow t, const std::string& problem) {
    if (problem.empty()) {
      FUZZ_CHECK(t.status.state <= TaskState::kCancelled);
      FUZZ_CHECK(IsValidName(t.queue) && IsValidName(t.kind));
      FUZZ_CHECK(t.max_attempts >= 1 && t.status.attempts >= 0 &&
                 t.status.attempts <= t.max_attempts);
      FUZZ_CHECK(IsFinished(t.status.state) == (t.status.completion_seq > 0));
      FUZZ_CHECK(t.status.state != TaskState::kLeased || !t.status.worker_id.empty());
    }
    return count(tasks, problem);
  };
  callbacks.member = [&](JobMemberRow m, const std::string& problem) {
    if (problem.empty()) FUZZ_CHECK(m.position >= -1);
    return count(members, problem);
  };
  callbacks.worker = [&](WorkerRow, const std::string& problem) { return count(workers, problem); };
  callbacks.short_job = [&](const std::string&, int64_t total, int64_t found) {
    FUZZ_CHECK(total != found);
    ++short_jobs;
    return absl::OkStatus();
  };
  FUZZ_CHECK(sqlite::Scan(db, callbacks).ok());
  FUZZ_CHECK(short_jobs <= jobs.sound);
  FUZZ_CHECK(sqlite::HighestTaskId(db).ok());
  return 0;
}
