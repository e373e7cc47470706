// Recovery's reading of the SQLite store (see LoadRecords in sqlite_files.h).
#include "absl/strings/str_cat.h"
#include "master/store/sqlite_files.h"
#include "master/store/sqlite_records.h"

namespace taskmaster::sqlite {

// Hands over only what checks out: a damaged record stops the start with a message naming it,
// rather than a silently shorter queue or a payload nobody submitted.
absl::Status LoadRecords(const DataDir& dir, RecoveryVisitor* visitor) {
  auto damaged = [&dir](const std::string& record, const std::string& problem) {
    return absl::DataLossError(
        absl::StrCat(dir.db_path(), " is damaged: ", record, ": ", problem,
                     ". The master did not start; `taskmaster --repair --data-dir ", dir.dir(),
                     "` keeps every valid record and moves the rest aside (see docs/storage.md)"));
  };
  ScanCallbacks callbacks;
  callbacks.job = [&](JobRow job, const std::string& problem) {
    if (!problem.empty()) return damaged(absl::StrCat("job ", job.job_id), problem);
    visitor->OnJob(std::move(job));
    return absl::OkStatus();
  };
  callbacks.task = [&](TaskRow task, const std::string& problem) {
    if (!problem.empty()) return damaged(absl::StrCat("task ", task.id), problem);
    visitor->OnTask(std::move(task));
    return absl::OkStatus();
  };
  callbacks.member = [&](JobMemberRow member, const std::string& problem) {
    if (!problem.empty()) {
      return damaged(absl::StrCat("job ", member.job_id, "'s member task ", member.task_id),
                     problem);
    }
    visitor->OnJobMember(std::move(member));
    return absl::OkStatus();
  };
  callbacks.worker = [&](WorkerRow worker, const std::string& problem) {
    if (!problem.empty()) return damaged(absl::StrCat("worker ", worker.worker_id), problem);
    visitor->OnWorker(std::move(worker));
    return absl::OkStatus();
  };
  callbacks.short_job = [&](const std::string& job_id, int64_t total, int64_t found) {
    return damaged(absl::StrCat("job ", job_id),
                   absl::StrCat("it has ", found, " of its ", total, " tasks"));
  };
  if (absl::Status s = Scan(dir.db(), callbacks); !s.ok()) {
    if (absl::IsDataLoss(s)) return s;
    return absl::DataLossError(absl::StrCat(dir.db_path(), " cannot be read (", s.message(),
                                            "). The master did not start; restore the data "
                                            "directory from a backup"));
  }
  absl::StatusOr<TaskId> highest = HighestTaskId(dir.db());
  if (!highest.ok()) return highest.status();
  visitor->OnHighestTaskId(*highest);
  return absl::OkStatus();
}

}  // namespace taskmaster::sqlite
