// Broker unit tests against a store whose writes complete only when the test says so: nothing is
// visible or acknowledged before it is on disk, and a closing broker answers what was pending.
#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "common/logging.h"
#include "master/core/broker.h"
#include "tests/fakes.h"

namespace taskmaster {
namespace {

using testing::CountingWatcher;
using testing::FakeChannel;
using testing::kClient;
using testing::Spec;

// A persistent store whose writes complete only when the test says so.
class HeldStore final : public Store {
 public:
  std::string Epoch() const override { return "held"; }
  bool persistent() const override { return true; }
  absl::Status Load(RecoveryVisitor*) override { return absl::OkStatus(); }
  absl::Status Writable() const override { return absl::OkStatus(); }
  void Submit(SubmitRows rows, std::function<void(absl::Status)> done) override {
    submitted_tasks += rows.tasks.size();
    Flush(std::move(done));
  }
  void UpdateTask(TaskId, TaskStatusRow) override {}
  void DeleteTask(TaskId) override {}
  void DeleteJob(const std::string&) override {}
  void PutWorker(const WorkerRow&) override {}
  void DeleteWorker(const std::string&) override {}
  void Flush(std::function<void(absl::Status)> done) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!open_) {
        waiting_.push_back(std::move(done));
        return;
      }
    }
    done(absl::OkStatus());
  }
  // From now on every flush completes at once.
  void Open() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = true;
    }
    Release();
  }
  // Completes every write waiting so far, with `status`.
  void Release(absl::Status status = absl::OkStatus()) {
    std::vector<std::function<void(absl::Status)>> done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      done.swap(waiting_);
    }
    for (auto& d : done) d(status);
  }
  // Answers what it holds with an error, as a store closing with a disk that does not write, and
  // then whatever those callbacks ask for. Afterwards it calls nobody.
  void Close() override {
    for (int round = 0; round < 100; ++round) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (waiting_.empty()) break;
      }
      Release(absl::UnavailableError("closing"));
    }
    std::lock_guard<std::mutex> lock(mu_);
    closed = true;
  }

  size_t submitted_tasks = 0;
  bool closed = false;

 private:
  std::mutex mu_;
  std::vector<std::function<void(absl::Status)>> waiting_;
  bool open_ = false;
};

// A submit the store answers with `answer` once it is made: its outcome.
absl::StatusOr<SubmitOutcome> SubmitAnswered(Broker& broker, HeldStore& store,
                                             const SubmitTarget& target,
                                             std::vector<TaskSpec> specs,
                                             absl::Status answer = absl::OkStatus()) {
  absl::StatusOr<SubmitOutcome> outcome = absl::UnknownError("not answered");
  broker.Submit(kClient, target, std::move(specs),
                [&](absl::StatusOr<SubmitOutcome> r) { outcome = std::move(r); });
  store.Release(std::move(answer));
  return outcome;
}

// A worker "w" running echo, with `credits`: its channel, which records what the broker sends
// it, and its handle.
std::pair<std::shared_ptr<FakeChannel>, Broker::WorkerHandle> AttachEchoWorker(Broker& broker,
                                                                               int32_t credits) {
  WorkerHello hello;
  hello.worker_id = "w";
  hello.kinds = {"echo"};
  auto channel = std::make_shared<FakeChannel>();
  Broker::WorkerHandle handle = *broker.Attach(hello, channel);
  broker.AddCredits(handle, credits);
  return {channel, handle};
}

// The broker closes its store as it goes: a submit the store still holds is answered then (the
// client is told it was not stored), and no store callback runs after the broker is gone.
TEST(BrokerDurability, ASubmitStillBeingWrittenIsAnsweredWhenTheBrokerGoes) {
  HeldStore store;
  FakeClock clock;
  absl::StatusOr<SubmitOutcome> submitted = absl::UnknownError("not yet");
  {
    Broker broker(BrokerOptions{}, &clock, &store, GetLogger("held-test"));
    broker.Submit(kClient, {Spec("echo", "x")},
                  [&](absl::StatusOr<SubmitOutcome> r) { submitted = r; });
    EXPECT_EQ(submitted.status().code(), absl::StatusCode::kUnknown) << "still being written";
  }
  EXPECT_TRUE(store.closed);
  EXPECT_EQ(submitted.status().code(), absl::StatusCode::kUnavailable)
      << submitted.status().ToString();
}

TEST(BrokerDurability, ResultsShowOnlyOnceOnDiskAndWorkersAreAckedThen) {
  HeldStore store;
  FakeClock clock;
  Broker broker(BrokerOptions{}, &clock, &store, GetLogger("held-test"));
  absl::StatusOr<SubmitOutcome> submitted = absl::UnknownError("not yet");
  broker.Submit(kClient, {Spec("echo", "x")},
                [&](absl::StatusOr<SubmitOutcome> r) { submitted = r; });
  EXPECT_FALSE(submitted.ok()) << "not acknowledged before it is durable";
  store.Release();
  ASSERT_TRUE(submitted.ok());

  auto [channel, handle] = AttachEchoWorker(broker, 1);
  auto tasks = channel->Take();
  ASSERT_EQ(tasks.size(), 1u);
  auto watcher = std::make_shared<CountingWatcher>();
  ASSERT_TRUE(broker.Watch(kClient, submitted->job_id, watcher).ok());
  broker.Report(handle, {{tasks[0].id, tasks[0].attempt, Outcome::kSucceeded, "x", ""}});

  EXPECT_TRUE(broker.ReadJob(kClient, submitted->job_id, 0, 10, 1 << 20)->results.empty());
  EXPECT_FALSE(broker.GetTask(kClient, tasks[0].id)->settled);
  EXPECT_EQ(watcher->calls, 0);
  EXPECT_TRUE(channel->acked.empty());
  store.Release();
  EXPECT_EQ(broker.ReadJob(kClient, submitted->job_id, 0, 10, 1 << 20)->results.size(), 1u);
  EXPECT_TRUE(broker.GetTask(kClient, tasks[0].id)->settled);
  EXPECT_EQ(watcher->calls, 1);
  EXPECT_EQ(channel->acked.size(), 1u);
  store.Open();
}

TEST(BrokerDurability, SubmitIsInvisibleUntilStoredAndLeavesNoTraceWhenRefused) {
  HeldStore store;
  FakeClock clock;
  Broker broker(BrokerOptions{}, &clock, &store, GetLogger("held-test"));
  auto channel = AttachEchoWorker(broker, 10).first;

  absl::StatusOr<SubmitOutcome> refused = absl::UnknownError("not yet");
  TaskSpec keyed = Spec("echo", "k");
  keyed.idempotency_key = "k1";
  broker.Submit(kClient, {Spec("echo", "a"), Spec("echo", "b"), keyed},
                [&](absl::StatusOr<SubmitOutcome> r) { refused = r; });
  EXPECT_EQ(store.submitted_tasks, 3u);
  EXPECT_TRUE(channel->Take().empty()) << "nothing runs before it is on disk";
  EXPECT_TRUE(absl::IsNotFound(broker.GetTask(kClient, 1).status()));
  // The same key while the first submit is being stored: retry later, not a second task.
  absl::StatusOr<SubmitOutcome> racing = absl::UnknownError("not yet");
  broker.Submit(kClient, {keyed}, [&](absl::StatusOr<SubmitOutcome> r) { racing = r; });
  EXPECT_EQ(racing.status().code(), absl::StatusCode::kAborted) << racing.status();

  store.Release(absl::ResourceExhaustedError("disk full"));
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(absl::IsUnavailable(refused.status())) << refused.status();
  EXPECT_NE(refused.status().message().find("none of its tasks were kept"), std::string::npos);
  EXPECT_TRUE(channel->Take().empty());
  for (TaskId id : {1, 2, 3}) EXPECT_TRUE(absl::IsNotFound(broker.GetTask(kClient, id).status()));
  for (const QueueStatsView& q : broker.QueueStats()) EXPECT_EQ(q.pending, 0) << q.queue;

  // The key is free again, and a stored submit runs.
  absl::StatusOr<SubmitOutcome> stored = absl::UnknownError("not yet");
  broker.Submit(kClient, {keyed, Spec("echo", "c")},
                [&](absl::StatusOr<SubmitOutcome> r) { stored = r; });
  store.Release();
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_EQ(channel->Take().size(), 2u);
  EXPECT_TRUE(broker.GetJob(kClient, stored->job_id).ok());
  store.Open();
}

// A batch added to an open job is a submit of its own: unseen until stored, and gone without a
// trace when the store refuses it, leaving the job as it was, still taking that batch.
TEST(BrokerDurability, ABatchJoinsItsJobOnlyOnceStored) {
  HeldStore store;
  FakeClock clock;
  Broker broker(BrokerOptions{}, &clock, &store, GetLogger("held-test"));
  auto channel = AttachEchoWorker(broker, 10).first;
  absl::StatusOr<SubmitOutcome> opened =
      SubmitAnswered(broker, store, SubmitTarget{"", 0, true}, {Spec("echo", "a")});
  ASSERT_TRUE(opened.ok()) << opened.status();
  const std::string job = opened->job_id;
  EXPECT_EQ(channel->Take().size(), 1u);

  absl::StatusOr<SubmitOutcome> refused = absl::UnknownError("not yet");
  broker.Submit(kClient, SubmitTarget{job, 1, true}, {Spec("echo", "b"), Spec("echo", "c")},
                [&](absl::StatusOr<SubmitOutcome> r) { refused = r; });
  EXPECT_TRUE(channel->Take().empty()) << "nothing runs before it is on disk";
  EXPECT_EQ(broker.GetJob(kClient, job)->total, 1);
  EXPECT_TRUE(absl::IsNotFound(broker.GetTask(kClient, 2).status()));
  // One batch at a time: the next waits for this one to be stored.
  absl::StatusOr<SubmitOutcome> racing = absl::UnknownError("not yet");
  broker.Submit(kClient, SubmitTarget{job, 1, true}, {Spec("echo", "b")},
                [&](absl::StatusOr<SubmitOutcome> r) { racing = r; });
  EXPECT_EQ(racing.status().code(), absl::StatusCode::kAborted) << racing.status();
  store.Release(absl::ResourceExhaustedError("disk full"));
  EXPECT_TRUE(absl::IsUnavailable(refused.status())) << refused.status();
  EXPECT_TRUE(channel->Take().empty());
  EXPECT_TRUE(absl::IsNotFound(broker.GetTask(kClient, 2).status()));
  auto view = broker.GetJob(kClient, job);
  EXPECT_EQ(view->total, 1);
  EXPECT_TRUE(view->open);
  for (const QueueStatsView& q : broker.QueueStats()) EXPECT_EQ(q.pending, 0) << q.queue;

  absl::StatusOr<SubmitOutcome> stored = absl::UnknownError("not yet");
  auto watcher = std::make_shared<CountingWatcher>();
  ASSERT_TRUE(broker.Watch(kClient, job, watcher).ok());
  broker.Submit(kClient, SubmitTarget{job, 1, false}, {Spec("echo", "b")},
                [&](absl::StatusOr<SubmitOutcome> r) { stored = r; });
  EXPECT_TRUE(broker.GetJob(kClient, job)->open) << "closed only once stored";
  store.Release();
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_GE(watcher->calls, 1) << "its followers learn that it is closed";
  EXPECT_EQ(channel->Take().size(), 1u);
  view = broker.GetJob(kClient, job);
  EXPECT_EQ(view->total, 2);
  EXPECT_FALSE(view->open);
  store.Open();
}

// The master's own close of an idle job is stored like a client's: its followers hear of it,
// and a close the store refused is tried again later rather than forgotten.
TEST(BrokerDurability, AnIdleJobIsClosedDurablyAndAgainAfterAFailedWrite) {
  HeldStore store;
  FakeClock clock;
  BrokerOptions options;
  options.open_job_timeout_ms = 1'000;
  options.max_open_jobs = 1;
  Broker broker(options, &clock, &store, GetLogger("held-test"));
  absl::StatusOr<SubmitOutcome> opened =
      SubmitAnswered(broker, store, SubmitTarget{"", 0, true}, {Spec("echo", "a")});
  ASSERT_TRUE(opened.ok()) << opened.status();
  const std::string job = opened->job_id;
  auto watcher = std::make_shared<CountingWatcher>();
  ASSERT_TRUE(broker.Watch(kClient, job, watcher).ok());
  testing::PassTime(clock, broker, 1'100);
  store.Release(absl::ResourceExhaustedError("disk full"));  // the close is not stored
  EXPECT_TRUE(broker.GetJob(kClient, job)->open);
  testing::PassTime(clock, broker, 1'100);
  store.Release();
  EXPECT_FALSE(broker.GetJob(kClient, job)->open) << "closed on the second try";
  EXPECT_GE(watcher->calls, 1);
  absl::StatusOr<SubmitOutcome> next =
      SubmitAnswered(broker, store, SubmitTarget{"", 0, true}, {Spec("echo", "b")});
  EXPECT_TRUE(next.ok()) << "its open-job slot is free: " << next.status();
  store.Open();
}

}  // namespace
}  // namespace taskmaster
