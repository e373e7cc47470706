// The SQLite store under the broker when its records were damaged or lost behind its back: the
// start is refused, and --repair moves what it cannot trust aside.
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "master/core/broker.h"
#include "master/store/sqlite_store.h"
#include "tests/fakes.h"
#include "tests/harness.h"
#include "tests/store_fixture.h"

namespace taskmaster {
namespace {

using testing::kClient;
using testing::ReadFile;
using testing::Spec;
using testing::StoreTest;
using testing::TempDir;
using testing::WriteFile;

// Two jobs of marked payloads, on disk: {A0, A1, A2} and {B0, B1}.
std::vector<SubmitOutcome> SubmitMarked(
    const std::function<SubmitOutcome(std::vector<TaskSpec>)>& submit) {
  return {submit({Spec("square", "PAYLOAD-A0"), Spec("square", "PAYLOAD-A1"),
                  Spec("square", "PAYLOAD-A2")}),
          submit({Spec("square", "PAYLOAD-B0"), Spec("square", "PAYLOAD-B1")})};
}

TEST_F(StoreTest, AFlippedByteStopsTheStartAndRepairMovesTheRecordAside) {
  auto jobs = SubmitMarked([this](auto specs) { return Submit(std::move(specs)); });
  Durable();
  const TaskId damaged = jobs[0].task_ids[1];
  const bool refused = ExpectRefused(
      [&] {
        // Closing checkpointed the log: the payload is in the database file itself.
        std::string bytes = ReadFile(dir_.File("taskmaster.db"));
        const size_t at = bytes.find("PAYLOAD-A1");
        ASSERT_NE(at, std::string::npos);
        bytes[at + 8] ^= 0x04;  // 'A' becomes 'E'
        WriteFile(dir_.File("taskmaster.db"), bytes);
      },
      absl::StrCat("task ", damaged, ": checksum mismatch"));

  auto report = RepairSqliteStore({dir_.path()});
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_NE(report->find("moved 1 records (0 jobs, 1 tasks, 0 job members, 0 workers)"),
            std::string::npos)
      << *report;
  EXPECT_NE(report->find("1 jobs missing tasks"), std::string::npos) << *report;
  const auto [rejected, moved] = Rejected();
  EXPECT_NE(rejected.find(absl::StrCat("\"id\":", damaged)), std::string::npos) << rejected;

  Open();
  std::cout << "FIGURES flipped byte in the database: acknowledged=5 refused_to_start=" << refused
            << " recorded_after_repair=" << PendingTasks() << " moved_aside=" << moved << std::endl;
  EXPECT_TRUE(absl::IsNotFound(broker_->GetTask(kClient, damaged).status()));
  EXPECT_EQ(broker_->GetJob(kClient, jobs[0].job_id)->total, 2);
  EXPECT_EQ(Task(jobs[0].task_ids[2]).payload, "PAYLOAD-A2");
  EXPECT_EQ(broker_->GetJob(kClient, jobs[1].job_id)->total, 2);
  Restart();  // and it stays sound
}

TEST_F(StoreTest, RecordsChangedOrRemovedBehindItsBackStopTheStart) {
  auto jobs = SubmitMarked([this](auto specs) { return Submit(std::move(specs)); });
  Durable();
  Close();
  const std::string clean = ReadFile(dir_.File("taskmaster.db"));
  const TaskId a0 = jobs[0].task_ids[0], a1 = jobs[0].task_ids[1];
  const std::string change_kind = absl::StrCat("UPDATE tasks SET kind='rm-rf' WHERE id=", a1);
  const std::string drop_task = absl::StrCat("DELETE FROM tasks WHERE id=", a0);
  const std::string drop_job = absl::StrCat("DELETE FROM jobs WHERE job_id='", jobs[1].job_id, "'");
  int refused = 0;
  for (const auto& [damage, expected] : std::vector<std::pair<std::string, std::string>>{
           {change_kind, absl::StrCat("task ", a1, ": checksum mismatch in what was submitted")},
           {absl::StrCat("UPDATE tasks SET state=3 WHERE id=", a1),
            absl::StrCat("task ", a1, ": checksum mismatch in its status")},
           {drop_task, absl::StrCat("job ", jobs[0].job_id, ": it has 2 of its 3 tasks")},
           {drop_job, absl::StrCat("its job ", jobs[1].job_id, " is not stored")}}) {
    refused += ExpectRefused(
        // `damage` by reference: clang 14 cannot capture a structured binding.
        [&, &damage = damage] {
          WriteFile(dir_.File("taskmaster.db"), clean);
          Sql(damage);
        },
        expected);
  }
  WriteFile(dir_.File("taskmaster.db"), clean);
  Sql(change_kind + ";" + drop_task + ";" + drop_job);
  auto report = RepairSqliteStore({dir_.path()});
  ASSERT_TRUE(report.ok()) << report.status();
  // Job A keeps one task of three; job B's two tasks lost their job.
  EXPECT_NE(report->find("moved 3 records (0 jobs, 3 tasks"), std::string::npos) << *report;
  Open();
  std::cout << "FIGURES records changed or removed behind its back: acknowledged=5 "
               "refused_to_start="
            << refused << "_of_4 recorded_after_repair=" << PendingTasks()
            << " moved_aside=" << Rejected().second << " removed_by_hand=1" << std::endl;
  EXPECT_EQ(broker_->GetJob(kClient, jobs[0].job_id)->total, 1);
  EXPECT_TRUE(absl::IsNotFound(broker_->GetJob(kClient, jobs[1].job_id).status()));
  EXPECT_TRUE(absl::IsNotFound(broker_->GetTask(kClient, a1).status()));
}

TEST_F(StoreTest, AStoreThatLostCommittedWritesIsRefused) {
  // A copy of the database file without its write-ahead log, as a deleted or truncated WAL
  // leaves it: the commits since the last checkpoint are gone.
  Submit({Spec("square", "1")});
  Durable();
  Close();
  Open();  // the first job is checkpointed into the file now
  Submit({Spec("square", "2"), Spec("square", "3")});
  Durable();
  TempDir copy;
  std::filesystem::copy_file(dir_.File("taskmaster.db"), copy.File("taskmaster.db"));
  std::filesystem::copy_file(dir_.File("COMMITS"), copy.File("COMMITS"));
  auto lost = OpenSqliteStore({copy.path()});
  ASSERT_FALSE(lost.ok());
  EXPECT_TRUE(absl::IsDataLoss(lost.status())) << lost.status();
  EXPECT_NE(std::string(lost.status().message()).find("write-ahead log"), std::string::npos)
      << lost.status();
  auto report = RepairSqliteStore({copy.path()});
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_NE(report->find("had lost its last"), std::string::npos) << *report;
  auto repaired = OpenSqliteStore({copy.path()});
  EXPECT_TRUE(repaired.ok()) << repaired.status();

  // A database deleted outright, its mark left behind.
  TempDir gone;
  std::filesystem::copy_file(dir_.File("COMMITS"), gone.File("COMMITS"));
  auto empty = OpenSqliteStore({gone.path()});
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(std::string(empty.status().message()).find("was deleted"), std::string::npos)
      << empty.status();
}

}  // namespace
}  // namespace taskmaster
