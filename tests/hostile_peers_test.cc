// Hostile peers: a worker and watchers that never read what the master sends them, and bad
// tokens and wrong roles at rate (hostile_common.h).
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/hostile_common.h"

namespace taskmaster::testing::hostile {
namespace {

// A worker that asks for a thousand tasks and never reads its stream: the master sends it little
// (a quarter of --max-worker-buffer-bytes), cuts it off once a write has waited for it half a
// lease (it sees its stream end), and every task it was given, the honest client's included,
// runs on the honest workers, each with its right result.
TEST_F(Hostile, AWorkerThatNeverReads) {
  Start(Security::kMutualTls);
  if (HasFatalFailure()) return;
  BeginAttack();
  RawWorker attacker(RawChannel(Legit()), Bearer(kWorkToken), seconds(90));
  // It says its tasks take a microsecond, so that the master fills it before anyone else.
  v1::WorkerMessage hello = Hello("never-reads", {"square", "echo"}, 1000, 1000);
  hello.set_task_us(1);
  ASSERT_TRUE(attacker.Write(hello));
  auto hostile = cluster_->NewClient();
  // 24 MiB of echo tasks, three times the buffer it may hold.
  std::map<uint64_t, std::string> expected;
  std::vector<std::string> jobs;
  for (int b = 0; b < 8; ++b) {
    const std::string payload(512 << 10, static_cast<char>('a' + b));
    auto job = hostile->Submit(Tasks("echo", std::vector<std::string>(6, payload)));
    ASSERT_TRUE(job.ok()) << job.status();
    jobs.push_back(job->job_id());
    for (uint64_t id : job->task_ids()) expected[id] = payload;
  }
  EXPECT_TRUE(WaitFor(
      [&] {
        auto workers = hostile->Workers();
        if (!workers.ok()) return false;
        for (const v1::WorkerInfo& w : workers->workers()) {
          if (w.worker_id() == "never-reads") return !w.connected();
        }
        return false;
      },
      seconds(30)))
      << "the master kept buffering for a worker that does not read";
  EXPECT_NE(cluster_->master().Log().find("cut off worker stream"), std::string::npos);
  SampleMemory();
  // A stream the master cancelled under unread messages ends CANCELLED on this side (its status
  // could never be delivered), once the attacker reads what was left.
  Expect("the worker that never reads", attacker.End(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(HonestProgressed()) << "the honest client stalled under the attack";
  size_t right = 0;
  for (const std::string& job : jobs) {
    absl::Status s = hostile->WatchJob(job, [&](const v1::JobEvent& e) {
      for (const v1::TaskInfo& t : e.results()) {
        EXPECT_EQ(t.state(), v1::SUCCEEDED) << t.error();
        EXPECT_NE(t.worker(), "never-reads");
        right += t.output() == expected.at(t.id()) ? 1 : 0;
      }
    });
    EXPECT_TRUE(s.ok()) << s;
  }
  EXPECT_EQ(right, expected.size());
  Note("its_tasks_right_elsewhere", static_cast<int64_t>(right));
  EndAttack(absl::StrCat("a worker with 1000 credits that claims 1 us tasks and never reads; ",
                         expected.size(), " echo tasks of 512 KiB; buffer limit ",
                         kMaxWorkerBufferBytes));
}

// Watchers of a finished 10,000-task job (~6 MB of results) that take its first event and never
// read again, over small receive windows: the master writes one event at a time per stream, so
// what waits for each is bounded by an event (at most 1,000 results or 1 MiB), not by the job. A
// watcher that reads again late still gets every result once.
TEST_F(Hostile, WatchersThatNeverRead) {
  Start(Security::kMutualTls);
  if (HasFatalFailure()) return;
  auto hostile = cluster_->NewClient();
  std::vector<std::string> payloads;
  for (int i = 0; i < kBigJobTasks; ++i) {
    payloads.push_back(std::string(kBigJobOutputBytes, static_cast<char>('a' + i % 26)));
  }
  auto big = hostile->Submit(Tasks("echo", payloads));
  ASSERT_TRUE(big.ok()) << big.status();
  ASSERT_TRUE(WaitFor(
      [&] {
        auto job = hostile->GetJob(big->job_id());
        return job.ok() && job->done() == job->total();
      },
      seconds(60)));
  BeginAttack();
  grpc::ChannelArguments small_window;
  small_window.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 10);
  small_window.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<RawWatch>> watchers;
  int64_t late_reader_results = 0;  // what the first watcher reads
  for (int i = 0; i < kSilentWatchers; ++i) {
    if (i % 4 == 0) channels.push_back(RawChannel(Legit(), small_window));
    watchers.push_back(std::make_unique<RawWatch>(channels.back(), big->job_id(), seconds(90)));
    // The stream is open on the master once its first event arrives; its next write waits.
    v1::JobEvent first;
    ASSERT_TRUE(watchers.back()->Read(&first));
    if (i == 0) late_reader_results = first.results_size();
  }
  SampleMemory();
  EXPECT_TRUE(HonestKeepsUp()) << "the honest client stalled behind watchers that do not read";
  SampleMemory();
  v1::JobEvent event;
  while (watchers.front()->Read(&event)) late_reader_results += event.results_size();
  Expect("a watcher that reads again late", watchers.front()->Finish(), absl::StatusCode::kOk);
  EXPECT_EQ(late_reader_results, kBigJobTasks);
  for (size_t i = 1; i < watchers.size(); ++i) {
    Expect("a watcher that never reads, closed", watchers[i]->Cancel(),
           absl::StatusCode::kCancelled);
  }
  EndAttack(absl::StrCat(kSilentWatchers, " watchers that stop reading after one event, 16 KiB ",
                         "windows, on a job of ", kBigJobTasks, " results of ", kBigJobOutputBytes,
                         " bytes"));
}

// Calls with unknown, missing, malformed and oversized tokens are UNAUTHENTICATED; tokens of the
// wrong role are PERMISSION_DENIED, on unary calls and streams alike; thousands of them from
// four threads leave the honest client unaffected.
TEST_F(Hostile, BadTokensAndWrongRolesAtRate) {
  Start(Security::kTls);
  if (HasFatalFailure()) return;
  BeginAttack();
  constexpr int kThreads = 4;
  auto channel = RawChannel(Legit());
  v1::SubmitRequest submit = Tasks("square", {"1"});
  v1::GetJobRequest get_job;
  get_job.set_job_id("job-0000000000000000");
  const auto unauthenticated = absl::StatusCode::kUnauthenticated;
  const auto denied = absl::StatusCode::kPermissionDenied;
  std::mt19937 rng(3);
  // Each round: 7 calls from each of kThreads threads at once.
  Repeat(2000, [&] {
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      const std::string guess = absl::StrCat(rng(), rng(), rng(), rng());
      threads.emplace_back([&, guess] {
        Expect("an unknown token",
               Unary(&v1::TaskQueue::Stub::Submit, channel, submit, Bearer(guess)),
               unauthenticated);
        Expect("no token", Unary(&v1::TaskQueue::Stub::GetJob, channel, get_job, ""),
               unauthenticated);
        Expect("another scheme",
               Unary(&v1::TaskQueue::Stub::Stats, channel, v1::StatsRequest(),
                     "Basic " + std::string(kSubmitToken)),
               unauthenticated);
        Expect("a token one character off",
               Unary(&v1::TaskQueue::Stub::Stats, channel, v1::StatsRequest(),
                     Bearer(std::string(kSubmitToken) + "x")),
               unauthenticated);
        Expect("a work token submitting",
               Unary(&v1::TaskQueue::Stub::Submit, channel, submit, Bearer(kWorkToken)), denied);
        RawWatch watch(channel, get_job.job_id(), kCallDeadline, Bearer(kWorkToken));
        v1::JobEvent event;
        EXPECT_FALSE(watch.Read(&event));
        Expect("a work token watching a job", watch.Finish(), denied);
        Expect("a submit token opening a worker stream",
               Refusal(channel, Hello("intruder", {"square"}, 1, 1), Bearer(kSubmitToken)), denied);
      });
    }
    for (std::thread& t : threads) t.join();
  });
  // A token past gRPC's metadata limit: refused by gRPC's transport before any handler.
  const std::string huge(64 << 10, 'k');
  Expect("a 64 KiB token",
         Unary(&v1::TaskQueue::Stub::Stats, channel, v1::StatsRequest(), Bearer(huge)),
         absl::StatusCode::kResourceExhausted);
  EndAttack(absl::StrCat(rounds_, " rounds of 7 calls with bad tokens or roles from each of ",
                         kThreads, " threads, and a 64 KiB token"));
}

}  // namespace
}  // namespace taskmaster::testing::hostile
