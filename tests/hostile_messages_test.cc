// Hostile messages: every field of every request at its extremes, and hellos claiming the most
// tasks a worker may hold (hostile_common.h).
#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "tests/hostile_common.h"

namespace taskmaster::testing::hostile {
namespace {

// Field values no honest client or worker sends, over the API by hand (the C++ client refuses
// some before sending): each gets its status, and nothing changes for anyone else.
TEST_F(Hostile, HostileFieldValues) {
  Start(Security::kMutualTls);
  if (HasFatalFailure()) return;
  BeginAttack();
  auto channel = RawChannel(Legit());
  auto hostile = cluster_->NewClient();
  const auto invalid = absl::StatusCode::kInvalidArgument;
  // A request with a text field that is not UTF-8 cannot be parsed: gRPC answers before the
  // master sees it, with INTERNAL ("Unable to parse request", what its completion-queue API says
  // to a request it cannot read).
  const auto unparsable = absl::StatusCode::kInternal;
  constexpr int64_t kCenturyMs = int64_t{100} * 365 * 24 * 3600 * 1000;
  const auto submit = [&](const std::string& what, const v1::SubmitRequest& request,
                          absl::StatusCode want) {
    Expect(what, Unary(&v1::TaskQueue::Stub::Submit, channel, request, Bearer(kSubmitToken)), want);
  };
  using Mutation = std::function<void(v1::TaskSpec&)>;
  const std::vector<std::tuple<std::string, Mutation, absl::StatusCode>> specs = {
      {"a kind that is not UTF-8", [](v1::TaskSpec& t) { t.set_kind("sq\xC3\x28"); }, unparsable},
      {"a label value that is not UTF-8",
       [](v1::TaskSpec& t) { (*t.mutable_labels())["zone"] = "\xFF"; }, unparsable},
      {"65 labels",
       [](v1::TaskSpec& t) {
         for (int i = 0; i < 65; ++i) (*t.mutable_labels())[absl::StrCat("k", i)] = "v";
       },
       invalid},
      {"a label value of 257 bytes",
       [](v1::TaskSpec& t) { (*t.mutable_labels())["zone"] = std::string(257, 'v'); }, invalid},
      {"a label key of 65 bytes",
       [](v1::TaskSpec& t) { (*t.mutable_labels())[std::string(65, 'k')] = "v"; }, invalid},
      {"a payload over --max-payload-bytes",
       [](v1::TaskSpec& t) { t.set_payload(std::string(kMaxPayloadBytes + 1, '7')); }, invalid},
      {"a kind of 65 characters", [](v1::TaskSpec& t) { t.set_kind(std::string(65, 'k')); },
       invalid},
      {"an empty kind", [](v1::TaskSpec& t) { t.clear_kind(); }, invalid},
      {"a queue with a slash", [](v1::TaskSpec& t) { t.set_queue("../etc"); }, invalid},
      {"an idempotency key of 257 bytes",
       [](v1::TaskSpec& t) { t.set_idempotency_key(std::string(257, 'i')); }, invalid},
      {"a delay of -1", [](v1::TaskSpec& t) { t.set_delay_ms(-1); }, invalid},
      {"a delay of INT64_MIN",
       [](v1::TaskSpec& t) { t.set_delay_ms(std::numeric_limits<int64_t>::min()); }, invalid},
      {"a delay of INT64_MAX",
       [](v1::TaskSpec& t) { t.set_delay_ms(std::numeric_limits<int64_t>::max()); }, invalid},
      {"a delay over 100 years", [&](v1::TaskSpec& t) { t.set_delay_ms(kCenturyMs + 1); }, invalid},
      {"a timeout of -1", [](v1::TaskSpec& t) { t.set_timeout_ms(-1); }, invalid},
      {"a timeout of INT64_MAX",
       [](v1::TaskSpec& t) { t.set_timeout_ms(std::numeric_limits<int64_t>::max()); }, invalid},
      {"a timeout of INT64_MIN",
       [](v1::TaskSpec& t) { t.set_timeout_ms(std::numeric_limits<int64_t>::min()); }, invalid},
      {"-1 attempts", [](v1::TaskSpec& t) { t.set_max_attempts(-1); }, invalid},
      {"101 attempts", [](v1::TaskSpec& t) { t.set_max_attempts(101); }, invalid},
      {"INT32_MAX attempts",
       [](v1::TaskSpec& t) { t.set_max_attempts(std::numeric_limits<int32_t>::max()); }, invalid},
      {"INT32_MIN attempts",
       [](v1::TaskSpec& t) { t.set_max_attempts(std::numeric_limits<int32_t>::min()); }, invalid},
  };
  for (const auto& [what, mutate, want] : specs) {
    v1::SubmitRequest request = Tasks("square", {"3"});
    mutate(*request.mutable_tasks(0));
    submit(what, request, want);
  }
  submit("an empty batch", v1::SubmitRequest(), invalid);
  submit("a batch over --max-batch", Tasks("square", std::vector<std::string>(kMaxBatch + 1, "1")),
         invalid);
  submit("a message over --max-message-bytes",
         Tasks("echo", std::vector<std::string>(17, std::string(kMaxPayloadBytes, 'm'))),
         absl::StatusCode::kResourceExhausted);

  // Extremes the API allows run like any task: the highest and lowest priorities, a timeout of
  // 100 years. A delay of 100 years keeps its task waiting.
  v1::SubmitRequest extremes = Tasks("square", {"11", "12", "13", "14"});
  extremes.mutable_tasks(0)->set_priority(std::numeric_limits<int32_t>::max());
  extremes.mutable_tasks(1)->set_priority(std::numeric_limits<int32_t>::min());
  extremes.mutable_tasks(2)->set_timeout_ms(kCenturyMs);
  extremes.mutable_tasks(3)->set_delay_ms(kCenturyMs);
  auto accepted = hostile->Submit(extremes);
  ASSERT_TRUE(accepted.ok()) << accepted.status();
  tally_.Add("OK");
  std::map<uint64_t, std::string> outputs;
  EXPECT_TRUE(WaitFor(
      [&] {
        for (int i = 0; i < 3; ++i) {
          auto task = hostile->GetTask(accepted->task_ids(i));
          if (!task.ok() || task->finished_ms() == 0) return false;
          outputs[task->id()] = task->output() + task->error();
        }
        return true;
      },
      seconds(30)));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(outputs[accepted->task_ids(i)], Square(11 + i));
  auto waiting = hostile->GetTask(accepted->task_ids(3));
  ASSERT_TRUE(waiting.ok()) << waiting.status();
  EXPECT_EQ(waiting->state(), v1::DELAYED);

  // Hellos no worker sends.
  auto workers = hostile->Workers();
  ASSERT_TRUE(workers.ok() && workers->workers_size() >= 1);
  const std::string honest_id = workers->workers(0).worker_id();
  using HelloMutation = std::function<void(v1::Hello&)>;
  const std::vector<std::tuple<std::string, HelloMutation, absl::StatusCode>> hellos = {
      {"an empty worker id", [](v1::Hello& h) { h.clear_worker_id(); }, invalid},
      {"a worker id of 256 bytes", [](v1::Hello& h) { h.set_worker_id(std::string(256, 'w')); },
       invalid},
      {"a name of 256 bytes", [](v1::Hello& h) { h.set_name(std::string(256, 'n')); }, invalid},
      {"a host of 256 bytes", [](v1::Hello& h) { h.set_host(std::string(256, 'h')); }, invalid},
      // Unparsable: the stream ends before the master could read a hello.
      {"a name that is not UTF-8", [](v1::Hello& h) { h.set_name("evil\xC3\x28"); }, invalid},
      {"0 slots", [](v1::Hello& h) { h.set_slots(0); }, invalid},
      {"-1 slots", [](v1::Hello& h) { h.set_slots(-1); }, invalid},
      {"INT32_MAX slots", [](v1::Hello& h) { h.set_slots(std::numeric_limits<int32_t>::max()); },
       invalid},
      {"no kind", [](v1::Hello& h) { h.clear_kinds(); }, invalid},
      {"1,001 kinds",
       [](v1::Hello& h) {
         for (int i = 0; i < 1001; ++i) h.add_kinds(absl::StrCat("k", i));
       },
       invalid},
      {"a malformed kind", [](v1::Hello& h) { h.add_kinds("rm -rf"); }, invalid},
      {"65 labels",
       [](v1::Hello& h) {
         for (int i = 0; i < 65; ++i) (*h.mutable_labels())[absl::StrCat("k", i)] = "v";
       },
       invalid},
      {"an honest worker's id without its secret",
       [&](v1::Hello& h) { h.set_worker_id(honest_id); }, absl::StatusCode::kPermissionDenied},
  };
  for (const auto& [what, mutate, want] : hellos) {
    v1::WorkerMessage m = Hello("hostile-hello", {"square"}, 1, 1);
    mutate(*m.mutable_hello());
    Expect(what, Refusal(channel, m), want);
  }
  v1::WorkerMessage credits_only;
  credits_only.set_credits(1);
  Expect("a first message without a hello", Refusal(channel, credits_only), invalid);

  // Credits near INT32_MAX, twice: capped, not wrapped, so its own tasks still reach it.
  RawWorker greedy(channel, Bearer(kWorkToken), seconds(60));
  ASSERT_TRUE(
      greedy.Write(Hello("hostile-greedy", {"hostile"}, 1, std::numeric_limits<int32_t>::max())));
  v1::MasterMessage in;
  ASSERT_TRUE(greedy.Read(&in) && in.has_welcome());
  v1::WorkerMessage more;
  more.set_credits(std::numeric_limits<int32_t>::max());
  ASSERT_TRUE(greedy.Write(more));
  auto own = hostile->Submit(Tasks("hostile", std::vector<std::string>(10, "x")));
  ASSERT_TRUE(own.ok()) << own.status();
  v1::WorkerMessage done;
  while (done.results_size() < 10 && greedy.Read(&in)) {
    for (const v1::Task& t : in.tasks()) {
      v1::TaskResult* r = done.add_results();
      r->set_task_id(t.task_id());
      r->set_attempt(t.attempt());
      r->set_outcome(v1::TaskResult::SUCCEEDED);
    }
  }
  ASSERT_EQ(done.results_size(), 10) << "credits of INT32_MAX twice left the worker without tasks";
  ASSERT_TRUE(greedy.Write(done));

  // Results for tasks it does not hold (the honest client's among them): acknowledged, counted as
  // duplicates, and dropped: no honest result changes (TearDown checks every one).
  const std::set<uint64_t> its_own(own->task_ids().begin(), own->task_ids().end());
  const uint64_t last = honest_->last_task_id();
  auto before = hostile->Stats();
  ASSERT_TRUE(before.ok());
  v1::WorkerMessage forged;
  for (uint64_t id = last > 400 ? last - 400 : 1; id <= last; ++id) {
    if (its_own.contains(id)) continue;
    for (int attempt = 1; attempt <= 2; ++attempt) {
      v1::TaskResult* r = forged.add_results();
      r->set_task_id(id);
      r->set_attempt(attempt);
      r->set_outcome(v1::TaskResult::SUCCEEDED);
      r->set_output("forged");
    }
  }
  ASSERT_TRUE(greedy.Write(forged));
  int acked = 0;
  const int expected_acks = done.results_size() + forged.results_size();
  while (acked < expected_acks && greedy.Read(&in)) acked += in.acked_size();
  EXPECT_EQ(acked, expected_acks);
  auto after = hostile->Stats();
  ASSERT_TRUE(after.ok());
  EXPECT_GE(after->duplicate_results() - before->duplicate_results(), forged.results_size());
  Note("forged_results", forged.results_size());
  Note("duplicates_counted", after->duplicate_results() - before->duplicate_results());
  Expect("the greedy worker, closed", greedy.Cancel(), absl::StatusCode::kCancelled);

  EXPECT_TRUE(HonestProgressed()) << "the honest client stalled under the attack";
  EndAttack(absl::StrCat(specs.size() + 3, " hostile submits, ", hellos.size() + 1,
                         " hostile hellos, 4 extreme tasks, credits INT32_MAX x2, ",
                         forged.results_size(), " forged results"));
}

// The master's epoch, from the welcome of a worker stream opened for it.
absl::StatusOr<std::string> Epoch(const std::shared_ptr<grpc::Channel>& channel) {
  RawWorker probe(channel, Bearer(kWorkToken));
  v1::MasterMessage welcome;
  if (!probe.Write(Hello("hostile-probe", {"square"}, 1, 0)) || !probe.Read(&welcome)) {
    return probe.End();
  }
  probe.Cancel().IgnoreError();
  return welcome.welcome().master_epoch();
}

// A hello claiming to hold tasks 1..n at attempt 1 (the honest client's among them), of the
// master's `epoch`, so that the master looks up every claim.
v1::WorkerMessage Claiming(const std::string& worker_id, const std::string& epoch, uint64_t n) {
  v1::WorkerMessage m = Hello(worker_id, {"square"}, 1, 0);
  m.mutable_hello()->set_master_epoch(epoch);
  for (uint64_t id = 1; id <= n; ++id) {
    v1::TaskRef* ref = m.mutable_hello()->add_held();
    ref->set_task_id(id);
    ref->set_attempt(1);
  }
  return m;
}

constexpr uint64_t kMaxHeld = 100'000;  // the most a hello may claim (docs/api.md)

// A hello claiming 100,000 tasks, the most a worker may hold, none of which its stream holds:
// accepted, and every claim revoked in the welcome, the honest client's tasks staying where they
// are; one claim more is refused.
TEST_F(Hostile, AHelloHoldingTheMostTasks) {
  Start(Security::kMutualTls);
  if (HasFatalFailure()) return;
  auto channel = RawChannel(Legit());
  absl::StatusOr<std::string> epoch = Epoch(channel);
  ASSERT_TRUE(epoch.ok()) << epoch.status();
  const v1::WorkerMessage most = Claiming("hostile-claimer", *epoch, kMaxHeld);
  BeginAttack();
  Expect("a hello holding 100,001 tasks",
         Refusal(channel, Claiming("hostile-too-many", *epoch, kMaxHeld + 1)),
         absl::StatusCode::kInvalidArgument);
  RawWorker claimer(channel, Bearer(kWorkToken), seconds(60));
  v1::MasterMessage welcome;
  ASSERT_TRUE(claimer.Write(most) && claimer.Read(&welcome) && welcome.has_welcome());
  EXPECT_EQ(welcome.welcome().revoked_size(), static_cast<int>(kMaxHeld));
  SampleMemory();
  Expect("a hello holding 100,000 tasks, closed", claimer.Cancel(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(HonestProgressed()) << "the honest client stalled under the attack";
  EndAttack(absl::StrCat("a hello holding 100,001 tasks and one holding 100,000 (",
                         most.ByteSizeLong(), " bytes)"));
}

// The same hellos, several at once, as any holder of a work token may send them. When a worker
// could claim a million tasks, four at once passed the memory bound and held the honest client up
// for over a second.
TEST_F(Hostile, HellosHoldingTheMostTasksAtOnce) {
  constexpr int kHellos = 8;
  Start(Security::kMutualTls);
  if (HasFatalFailure()) return;
  auto channel = RawChannel(Legit());
  absl::StatusOr<std::string> epoch = Epoch(channel);
  ASSERT_TRUE(epoch.ok()) << epoch.status();
  std::vector<v1::WorkerMessage> hellos;
  for (int i = 0; i < kHellos; ++i) {
    hellos.push_back(Claiming(absl::StrCat("hostile-claimer-", i), *epoch, kMaxHeld));
  }
  BeginAttack();
  std::vector<std::thread> threads;
  for (const v1::WorkerMessage& hello : hellos) {
    threads.emplace_back([&] {
      RawWorker claimer(channel, Bearer(kWorkToken), seconds(60));
      v1::MasterMessage welcome;
      EXPECT_TRUE(claimer.Write(hello) && claimer.Read(&welcome) && welcome.has_welcome());
      EXPECT_EQ(welcome.welcome().revoked_size(), static_cast<int>(kMaxHeld));
      Expect("a hello holding 100,000 tasks, closed", claimer.Cancel(),
             absl::StatusCode::kCancelled);
    });
  }
  for (std::thread& t : threads) t.join();
  SampleMemory();
  EXPECT_TRUE(HonestProgressed()) << "the honest client stalled under the attack";
  EndAttack(absl::StrCat(kHellos, " hellos at once, each holding 100,000 tasks (",
                         hellos.front().ByteSizeLong(), " bytes)"));
}

}  // namespace
}  // namespace taskmaster::testing::hostile
