// The queue and writer every durable store shares (QueuedStore), over a store whose commits the
// test scripts: what reaches a commit, and what a submit's client hears when a commit fails.
#include <gtest/gtest.h>

#include <future>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "master/store/queued_store.h"
#include "tests/harness.h"

namespace taskmaster::testing {
namespace {

// Keeps the statuses its commits wrote; fails every commit with `failure` while it is set.
class ScriptedStore final : public QueuedStore {
 public:
  ScriptedStore(bool writes_leases, CommitFailure on_failure)
      : QueuedStore(GetLogger("queue-test"), /*retry_interval_ms=*/10, writes_leases),
        on_failure_(on_failure) {
    StartWriter();
  }
  ~ScriptedStore() override { Close(); }

  std::string Epoch() const override { return "test"; }
  bool persistent() const override { return true; }

  void Fail(absl::Status failure) {
    absl::MutexLock lock(&mu_);
    failure_ = std::move(failure);
  }
  int attempts() const {
    absl::MutexLock lock(&mu_);
    return attempts_;
  }
  std::map<TaskId, TaskStatusRow> written() const {
    absl::MutexLock lock(&mu_);
    return written_;
  }

 private:
  absl::Status LoadRecords(RecoveryVisitor*) override { return absl::OkStatus(); }
  absl::Status Commit(const std::vector<StoreChange>& batch) override {
    absl::MutexLock lock(&mu_);
    ++attempts_;
    if (!failure_.ok()) return failure_;
    for (const StoreChange& op : batch) {
      if (op.kind == StoreChange::Kind::kUpdateTask) written_[op.task_id] = op.status;
    }
    return absl::OkStatus();
  }
  CommitFailure AfterCommit(const absl::Status&) override { return on_failure_; }

  const CommitFailure on_failure_;
  mutable absl::Mutex mu_;
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
  int attempts_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<TaskId, TaskStatusRow> written_ ABSL_GUARDED_BY(mu_);
};

absl::Status Flushed(Store& store) {
  std::promise<absl::Status> done;
  store.Flush([&](absl::Status s) { done.set_value(s); });
  return done.get_future().get();
}

TaskStatusRow Status(TaskState state, int32_t attempts, std::string error = "") {
  TaskStatusRow row;
  row.state = state;
  row.attempts = attempts;
  row.error = std::move(error);
  return row;
}

// A store that keeps no leases: a lease queued after a failure must not replace it, or the
// failure (acknowledged to its worker once the commit is durable) is never written, and after a
// takeover the task has one attempt too few.
TEST(QueuedStore, ALeaseNeverReplacesTheStatusBeforeIt) {
  ScriptedStore store(/*writes_leases=*/false, CommitFailure::kRetryAll);
  store.Fail(absl::UnavailableError("held back"));  // the two land in one batch
  store.UpdateTask(7, Status(TaskState::kPending, 1, "boom 1"));
  store.UpdateTask(7, Status(TaskState::kLeased, 2));
  store.UpdateTask(8, Status(TaskState::kLeased, 1));
  store.Fail(absl::OkStatus());
  ASSERT_TRUE(Flushed(store).ok());
  const auto written = store.written();
  ASSERT_TRUE(written.contains(7));
  EXPECT_EQ(written.at(7).state, TaskState::kPending);
  EXPECT_EQ(written.at(7).attempts, 1);
  EXPECT_EQ(written.at(7).error, "boom 1");
  EXPECT_FALSE(written.contains(8));
}

// A store that keeps leases writes the latest status, lease included.
TEST(QueuedStore, AStoreThatKeepsLeasesWritesTheLatest) {
  ScriptedStore store(/*writes_leases=*/true, CommitFailure::kRefuseSubmits);
  store.UpdateTask(7, Status(TaskState::kPending, 1, "boom 1"));
  store.UpdateTask(7, Status(TaskState::kLeased, 2));
  ASSERT_TRUE(Flushed(store).ok());
  EXPECT_EQ(store.written().at(7).state, TaskState::kLeased);
}

// A submit whose commit failed in a way that may have written it (a lost answer), given up on
// when the store closes: its client hears UNKNOWN, which no client retries as if nothing had
// been kept; one never tried hears that nothing was.
TEST(QueuedStore, ASubmitThatMayBeWrittenIsNeverSaidToBeLost) {
  auto store = std::make_unique<ScriptedStore>(/*writes_leases=*/false, CommitFailure::kRetryAll);
  store->Fail(absl::UnavailableError("the connection broke during COMMIT"));
  std::promise<absl::Status> tried;
  SubmitRows rows;
  rows.job.job_id = "job-1";
  store->Submit(std::move(rows), [&](absl::Status s) { tried.set_value(s); });
  ASSERT_TRUE(WaitFor([&] { return store->attempts() >= 2; }, std::chrono::seconds(10)));
  store->Close();
  const absl::Status status = tried.get_future().get();
  EXPECT_TRUE(absl::IsUnknown(status)) << status;
  EXPECT_NE(status.message().find("idempotency keys"), std::string::npos) << status;

  // With kRefuseSubmits nothing of a failed commit was written: the client may submit again.
  ScriptedStore refusing(/*writes_leases=*/true, CommitFailure::kRefuseSubmits);
  refusing.Fail(absl::ResourceExhaustedError("disk full"));
  std::promise<absl::Status> refused;
  refusing.Submit(SubmitRows{}, [&](absl::Status s) { refused.set_value(s); });
  const absl::Status refused_status = refused.get_future().get();
  EXPECT_TRUE(absl::IsResourceExhausted(refused_status)) << refused_status;
}

}  // namespace
}  // namespace taskmaster::testing
