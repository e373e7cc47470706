// taskmaster --repair: keeps every record of a SQLite store that checks out, moves the rest into
// a file beside it, and makes the store consistent again. docs/storage.md has the procedure.
#include <fcntl.h>
#include <unistd.h>

#include <ctime>
#include <filesystem>
#include <fstream>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "master/store/sqlite_files.h"
#include "master/store/sqlite_records.h"
#include "master/store/sqlite_store.h"
#include "nlohmann/json.hpp"

namespace taskmaster {
namespace {

using nlohmann::json;
using sqlite::BindText;
using sqlite::Statement;

// A record to move aside, as a line of the rejected file, and how to delete it.
struct Rejected {
  std::string table;
  std::string job_id;  // jobs, job_members; the worker's id for workers
  TaskId task_id = 0;  // tasks, job_members
  json line;
};

json TaskJson(const TaskRow& t) {
  return {{"id", t.id},
          {"job_id", t.job_id},
          {"queue", t.queue},
          {"kind", t.kind},
          {"labels", t.labels},
          {"payload_base64", absl::Base64Escape(t.payload)},
          {"priority", t.priority},
          {"max_attempts", t.max_attempts},
          {"timeout_ms", t.timeout_ms},
          {"created_ms", t.created_ms},
          {"idempotency_key", t.idempotency_key},
          {"state", TaskStateName(t.status.state)},
          {"attempts", t.status.attempts},
          {"output_base64", absl::Base64Escape(t.status.output)},
          {"error", t.status.error}};
}

std::string Stamp() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y%m%dT%H%M%SZ", &tm);
  return buf;
}

// Writes the rejected records to a new file and makes it and its name durable.
absl::Status WriteDurably(const std::string& dir, const std::string& path,
                          const std::vector<Rejected>& records) {
  if (std::filesystem::exists(path)) {
    return absl::AlreadyExistsError(absl::StrCat(path, " exists; run --repair again"));
  }
  {
    std::ofstream out(path, std::ios::trunc);
    for (const Rejected& r : records) {
      out << r.line.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    }
    if (!out.flush()) return absl::UnavailableError(absl::StrCat("cannot write ", path));
  }
  for (const std::string& p : {path, dir}) {
    const int fd = open(p.c_str(), O_RDONLY | O_CLOEXEC);
    const bool synced = fd >= 0 && fsync(fd) == 0;
    if (fd >= 0) close(fd);
    if (!synced) return absl::UnavailableError(absl::StrCat("cannot sync ", p));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> RepairSqliteStore(const SqliteStoreOptions& options) {
  absl::StatusOr<std::unique_ptr<sqlite::DataDir>> opened =
      sqlite::DataDir::Open(options, /*repairing=*/true);
  if (!opened.ok()) return opened.status();
  sqlite::DataDir& dir = **opened;
  sqlite3* db = dir.db();

  std::vector<Rejected> rejected;
  int64_t kept[3] = {0, 0, 0};                              // jobs, tasks, members
  std::vector<std::pair<std::string, int64_t>> short_jobs;  // job, tasks it still has
  sqlite::ScanCallbacks scan;
  scan.job = [&](JobRow job, const std::string& problem) {
    if (problem.empty()) {
      ++kept[0];
    } else {
      rejected.push_back({"jobs",
                          job.job_id,
                          0,
                          {{"table", "jobs"},
                           {"problem", problem},
                           {"job_id", job.job_id},
                           {"total", job.total},
                           {"created_ms", job.created_ms},
                           {"tenant", job.tenant}}});
    }
    return absl::OkStatus();
  };
  scan.task = [&](TaskRow task, const std::string& problem) {
    if (problem.empty()) {
      ++kept[1];
    } else {
      json line = TaskJson(task);
      line["table"] = "tasks";
      line["problem"] = problem;
      rejected.push_back({"tasks", "", task.id, std::move(line)});
    }
    return absl::OkStatus();
  };
  scan.member = [&](JobMemberRow m, const std::string& problem) {
    if (problem.empty()) {
      ++kept[2];
    } else {
      rejected.push_back({"job_members",
                          m.job_id,
                          m.task_id,
                          {{"table", "job_members"},
                           {"problem", problem},
                           {"job_id", m.job_id},
                           {"task_id", m.task_id},
                           {"position", m.position}}});
    }
    return absl::OkStatus();
  };
  scan.worker = [&](WorkerRow worker, const std::string& problem) {
    if (!problem.empty()) {
      rejected.push_back(
          {"workers",
           worker.worker_id,
           0,
           {{"table", "workers"}, {"problem", problem}, {"worker_id", worker.worker_id}}});
    }
    return absl::OkStatus();
  };
  scan.short_job = [&](const std::string& job_id, int64_t total, int64_t found) {
    short_jobs.push_back({job_id, found});
    if (found == 0) {
      --kept[0];
      rejected.push_back({"jobs",
                          job_id,
                          0,
                          {{"table", "jobs"},
                           {"problem", absl::StrCat("none of its ", total, " tasks is left")},
                           {"job_id", job_id},
                           {"total", total}}});
    }
    return absl::OkStatus();
  };
  if (absl::Status s = sqlite::Scan(db, scan); !s.ok()) {
    return absl::DataLossError(absl::StrCat(
        dir.db_path(), " cannot be read (", s.message(),
        "); --repair keeps records it can read, and this table cannot be read at all: restore "
        "the data directory from a backup"));
  }

  std::string report = absl::StrCat("repair of ", dir.dir(), ": ");
  if (dir.lost_commits() > 0) {
    absl::StrAppend(&report, "the database had lost its last ", dir.lost_commits(),
                    " commits (its write-ahead log was deleted, cut short or damaged); what they "
                    "held is gone. ");
  }
  std::string moved_to;
  if (!rejected.empty() || !short_jobs.empty()) {
    moved_to = absl::StrCat(dir.dir(), "/rejected-", Stamp(), ".jsonl");
    for (const auto& [job_id, found] : short_jobs) {
      if (found == 0) continue;
      rejected.push_back({"",
                          job_id,
                          0,
                          {{"table", "jobs"},
                           {"problem", "tasks missing: total lowered to the tasks it has"},
                           {"job_id", job_id},
                           {"new_total", found}}});
    }
    if (absl::Status s = WriteDurably(dir.dir(), moved_to, rejected); !s.ok()) return s;
    if (absl::Status s = sqlite::Exec(db, "BEGIN IMMEDIATE"); !s.ok()) return s;
    Statement del_task, del_job, del_members, del_member, del_worker, lower, count;
    for (auto [stmt, sql] : std::vector<std::pair<Statement*, const char*>>{
             {&del_task, "DELETE FROM tasks WHERE id=?"},
             {&del_job, "DELETE FROM jobs WHERE job_id=?"},
             {&del_members, "DELETE FROM job_members WHERE job_id=?"},
             {&del_member, "DELETE FROM job_members WHERE job_id=? AND task_id=?"},
             {&del_worker, "DELETE FROM workers WHERE worker_id=?"},
             {&lower, "UPDATE jobs SET total=?, crc=? WHERE job_id=?"},
             {&count, "UPDATE meta SET value=? WHERE key='commits'"}}) {
      if (absl::Status s = stmt->Prepare(db, sql); !s.ok()) return s;
    }
    absl::Status status;
    for (const Rejected& r : rejected) {
      if (!status.ok()) break;
      if (r.table == "tasks") {
        sqlite3_bind_int64(del_task.get(), 1, static_cast<int64_t>(r.task_id));
        status = del_task.Run();
      } else if (r.table == "jobs") {
        BindText(del_job.get(), 1, r.job_id);
        status = del_job.Run();
        BindText(del_members.get(), 1, r.job_id);
        if (status.ok()) status = del_members.Run();
      } else if (r.table == "workers") {
        BindText(del_worker.get(), 1, r.job_id);
        status = del_worker.Run();
      } else if (r.table == "job_members") {
        BindText(del_member.get(), 1, r.job_id);
        sqlite3_bind_int64(del_member.get(), 2, static_cast<int64_t>(r.task_id));
        status = del_member.Run();
      }
    }
    for (const auto& [job_id, found] : short_jobs) {
      if (!status.ok() || found == 0) continue;
      // The job's creation time, tenant and batches are kept: only its total and checksum change.
      Statement created;
      status =
          created.Prepare(db, "SELECT created_ms, tenant, open, batches FROM jobs WHERE job_id=?");
      if (!status.ok()) break;
      BindText(created.get(), 1, job_id);
      if (sqlite3_step(created.get()) != SQLITE_ROW) continue;
      const JobRow job{job_id,
                       found,
                       sqlite3_column_int64(created.get(), 0),
                       sqlite::Text(created.get(), 1),
                       sqlite3_column_int64(created.get(), 2) != 0,
                       sqlite3_column_int64(created.get(), 3)};
      sqlite3_bind_int64(lower.get(), 1, found);
      sqlite3_bind_int64(lower.get(), 2, sqlite::JobChecksum(job));
      BindText(lower.get(), 3, job_id);
      status = lower.Run();
    }
    const int64_t commits = dir.commits() + 1;
    if (status.ok()) {
      sqlite3_bind_text(count.get(), 1, std::to_string(commits).c_str(), -1, SQLITE_TRANSIENT);
      status = count.Run();
    }
    if (status.ok()) status = sqlite::Exec(db, "COMMIT");
    if (!status.ok()) {
      sqlite::Exec(db, "ROLLBACK").IgnoreError();
      return absl::UnavailableError(absl::StrCat("repair could not write ", dir.db_path(), ": ",
                                                 status.message(), "; nothing was changed"));
    }
    dir.RecordCommits(commits);
    int64_t moved[4] = {0, 0, 0, 0};
    for (const Rejected& r : rejected) {
      moved[0] += r.table == "jobs";
      moved[1] += r.table == "tasks";
      moved[2] += r.table == "job_members";
      moved[3] += r.table == "workers";
    }
    absl::StrAppend(&report, "moved ", moved[0] + moved[1] + moved[2] + moved[3], " records (",
                    moved[0], " jobs, ", moved[1], " tasks, ", moved[2], " job members, ", moved[3],
                    " workers) to ", moved_to, "; ");
    const int64_t lowered = static_cast<int64_t>(std::count_if(
        short_jobs.begin(), short_jobs.end(), [](const auto& j) { return j.second > 0; }));
    if (lowered > 0) {
      absl::StrAppend(&report, lowered, " jobs missing tasks now count only the tasks they have; ");
    }
  } else {
    dir.RecordCommits(dir.commits());
    absl::StrAppend(&report, "every record checks out; ");
  }
  sqlite::Exec(db, "PRAGMA wal_checkpoint(TRUNCATE)").IgnoreError();
  absl::StrAppend(&report, "kept ", kept[0], " jobs, ", kept[1], " tasks and ", kept[2],
                  " job members. The master starts on it again.");
  return report;
}

}  // namespace taskmaster
