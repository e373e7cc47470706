// fuzz_worker_stream: what a worker's stream reaches. A Broker holds a batch of tasks of three
// kinds on two queues (one with labels, one delayed, one with an idempotency key); the input then
// plays two worker streams against it, one WorkerMessage at a time, applied as the service applies
// them (a hello to attach, then ApplyWorkerMessage: results, credits, heartbeats, drain; the end
// of a stream detaches it, for good after a bye). Between messages the clock moves (leases expire,
// workers miss their grace, backoffs end, results pass retention), more tasks arrive, tasks are
// cancelled, or the master shuts down.
//
// Input: the first byte picks the store (bit 0: the memory store, or one that persists at once,
// which takes a durable master's paths); then frames of a control byte, an argument byte and a
// WorkerMessage (see Frames). Control bit 0 picks the stream; bits 1-3 how far the clock moves;
// bit 4 ends the stream after the message; bit 5 submits the batch again first; bit 6 cancels
// task <argument> first; bit 7 shuts the master down first. A hello's master_epoch or
// worker_secret of "current" stands for the master's epoch or the secret of the worker's last
// welcome, which an input cannot know.
//
// Asserts: the first message to a stream is its welcome and no other is; a stream gets only tasks
// its hello said it runs, never more than the credits it gave, and none once the master shuts
// down; a finished task stays finished with the outcome it had, and one that succeeded holds the
// output a worker reported for it; a job's progress counts its results, and following it gives
// each of them; counters never go negative; workers hold at least the tasks leased; attempts stay
// within bounds; a worker's texts that a TaskInfo carries (error, worker name) are UTF-8.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/util.h"
#include "master/core/broker.h"
#include "master/rpc/translate.h"
#include "master/store/memory_store.h"
#include "tests/fuzz/fuzz_common.h"

namespace taskmaster::fuzz {
namespace {

// The client whose tasks the workers run.
const Caller kOwner{"owner"};

BrokerOptions Options() {
  BrokerOptions o;
  // Short times, so that a few clock steps expire leases, graces, backoffs and results.
  o.lease_timeout_ms = 3'000;
  o.heartbeat_interval_ms = 1'000;
  o.reconnect_grace_ms = 2'000;
  o.recovery_hold_ms = 1'000;
  o.pause_threshold_ms = 1'000;
  o.default_timeout_ms = 10'000;
  o.retry_backoff_ms = 100;
  o.retry_backoff_max_ms = 1'000;
  o.result_retention_ms = 20'000;
  o.max_payload_bytes = 1'024;
  o.max_queue_length = 64;
  return o;
}

// Clock steps: up to the pause threshold the master ticked all along; beyond it, it was paused.
constexpr int64_t kSteps[8] = {0, 100, 500, 1'000, 1'000, 1'000, 2'500, 30'000};

constexpr char kCurrent[] = "current";

std::vector<TaskSpec> Batch() {
  auto spec = [](std::string queue, std::string kind, std::string payload) {
    TaskSpec s;
    s.queue = std::move(queue);
    s.kind = std::move(kind);
    s.payload = std::move(payload);
    return s;
  };
  std::vector<TaskSpec> batch = {spec("", "square", "1"), spec("", "square", "2"),
                                 spec("", "echo", "3"),   spec("q2", "echo", "4"),
                                 spec("q2", "fail", "5"), spec("", "square", "6"),
                                 spec("", "echo", "7"),   spec("", "square", "8")};
  batch[1].priority = 5;
  batch[2].max_attempts = 1;
  batch[4].max_attempts = 2;
  batch[5].labels = {{"gpu", "1"}};
  batch[6].delay_ms = 1'500;
  batch[7].idempotency_key = "key";
  return batch;
}

// One worker stream as the broker sees it, recording what the broker sends it.
class Stream final : public WorkerChannel {
 public:
  explicit Stream(WorkerHello hello) : hello_(std::move(hello)) {
    if (hello_.queues.empty()) hello_.queues = {"default"};
  }

  void Send(WorkerOutbound m) override {
    std::lock_guard<std::mutex> lock(mu_);
    // The welcome opens the stream, alone of its kind.
    FUZZ_CHECK(m.welcome.has_value() == (messages_ == 0));
    ++messages_;
    if (m.welcome) secret_ = m.welcome->secret;
    for (const LeasedTask& t : m.tasks) {
      FUZZ_CHECK(!shut_down_);
      FUZZ_CHECK(Contains(hello_.kinds, t.kind) && Contains(hello_.queues, t.queue));
      ++received_;
      FUZZ_CHECK(received_ <= granted_);
    }
  }

  void Grant(int32_t credits) {
    std::lock_guard<std::mutex> lock(mu_);
    if (credits > 0) granted_ += credits;
  }
  void ShutDown() {
    std::lock_guard<std::mutex> lock(mu_);
    shut_down_ = true;
  }
  std::string secret() {
    std::lock_guard<std::mutex> lock(mu_);
    return secret_;
  }

  Broker::WorkerHandle handle;
  bool bye = false;

 private:
  static bool Contains(const std::vector<std::string>& v, const std::string& s) {
    return std::find(v.begin(), v.end(), s) != v.end();
  }

  WorkerHello hello_;
  std::mutex mu_;
  int64_t messages_ = 0;
  int64_t granted_ = 0;
  int64_t received_ = 0;
  bool shut_down_ = false;
  std::string secret_;
};

class Harness {
 public:
  explicit Harness(bool durable)
      : store_(durable ? std::unique_ptr<Store>(std::make_unique<InstantDurableStore>())
                       : NewMemoryStore()),
        broker_(Options(), &clock_, store_.get(), QuietLogger()) {
    SubmitBatch();
  }

  ~Harness() {
    for (auto& stream : streams_) {
      if (stream) broker_.Detach(stream->handle, /*bye=*/true);
    }
  }

  void Step(uint8_t control, uint8_t argument, std::string_view bytes) {
    if (control & 0x80) {
      broker_.Shutdown();
      for (auto& stream : streams_) {
        if (stream) stream->ShutDown();
      }
      shut_down_ = true;
    }
    if (control & 0x40) broker_.CancelTask(kOwner, argument).IgnoreError();
    if (control & 0x20) SubmitBatch();
    clock_.Advance(kSteps[(control >> 1) & 7]);
    broker_.Tick();

    std::shared_ptr<Stream>& stream = streams_[control & 1];
    v1::WorkerMessage m;
    if (m.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
      if (!stream) stream = Open(m);
      if (stream) Apply(*stream, m);
    }
    if (stream && (control & 0x10)) {
      broker_.Detach(stream->handle, stream->bye);
      stream.reset();
    }
    Check();
  }

 private:
  void SubmitBatch() {
    broker_.Submit(kOwner, Batch(), [this](absl::StatusOr<SubmitOutcome> outcome) {
      if (!outcome.ok()) return;  // a full queue
      ids_.insert(outcome->task_ids.begin(), outcome->task_ids.end());
    });
  }

  // A new stream: its first message must carry a hello the broker accepts, or it ends at once.
  std::shared_ptr<Stream> Open(v1::WorkerMessage& m) {
    if (!m.has_hello()) return nullptr;
    v1::Hello* hello = m.mutable_hello();
    if (hello->master_epoch() == kCurrent) hello->set_master_epoch(broker_.epoch());
    if (hello->worker_secret() == kCurrent) hello->set_worker_secret(secrets_[hello->worker_id()]);
    WorkerHello translated = FromProto(*hello);
    const std::string worker_id = translated.worker_id;
    auto stream = std::make_shared<Stream>(translated);
    if (shut_down_) stream->ShutDown();
    absl::StatusOr<Broker::WorkerHandle> handle = broker_.Attach(std::move(translated), stream);
    if (!handle.ok()) return nullptr;
    stream->handle = *handle;
    secrets_[worker_id] = stream->secret();
    return stream;
  }

  void Apply(Stream& stream, v1::WorkerMessage& m) {
    if (!m.draining()) stream.Grant(m.credits());
    std::map<TaskId, std::set<std::string>> outputs;
    for (const v1::TaskResult& r : m.results()) {
      if (r.outcome() == v1::TaskResult::SUCCEEDED) outputs[r.task_id()].insert(r.output());
    }
    ApplyWorkerMessage(broker_, stream.handle, m);
    if (m.bye()) stream.bye = true;
    for (const auto& [id, candidates] : outputs) {
      absl::StatusOr<TaskView> view = broker_.GetTask(kOwner, id);
      if (!view.ok() || view->state != TaskState::kSucceeded || finished_.contains(id)) continue;
      FUZZ_CHECK(candidates.contains(view->output));
    }
  }

  void Check() {
    int64_t leased = 0;
    for (const QueueStatsView& q : broker_.QueueStats()) {
      FUZZ_CHECK(q.pending >= 0 && q.leased >= 0 && q.succeeded >= 0 && q.failed >= 0 &&
                 q.dead >= 0 && q.cancelled >= 0);
      leased += q.leased;
    }
    int64_t running = 0;
    for (const WorkerView& w : broker_.Workers()) {
      FUZZ_CHECK(w.running >= 0);
      running += w.running;
    }
    // A cancelled task keeps its worker's slot until the worker reports it stopped.
    FUZZ_CHECK(running >= leased);
    std::set<std::string> jobs;
    for (const TaskId id : ids_) {
      absl::StatusOr<TaskView> view = broker_.GetTask(kOwner, id);
      if (!view.ok()) {
        FUZZ_CHECK(absl::IsNotFound(view.status()));  // past retention
        continue;
      }
      jobs.insert(view->job_id);
      FUZZ_CHECK(view->attempts >= 0 && view->attempts <= view->max_attempts);
      // Of a TaskInfo's texts, only these two come from workers; the others are this harness's.
      FUZZ_CHECK(IsValidUtf8(view->error) && IsValidUtf8(view->worker));
      auto [it, first] = finished_.emplace(id, view->state);
      if (!first) {
        FUZZ_CHECK(it->second == view->state);
      } else if (!IsFinished(view->state)) {
        finished_.erase(it);
      }
    }
    // Both stores have every result on disk at once: a job's progress counts them all, and
    // following it from the start gives each of them.
    for (const std::string& job_id : jobs) {
      absl::StatusOr<JobView> job = broker_.GetJob(kOwner, job_id);
      FUZZ_CHECK(job.ok());
      FUZZ_CHECK(job->done >= 0 && job->done <= job->total);
      FUZZ_CHECK(job->succeeded + job->dead + job->cancelled == job->done);
      absl::StatusOr<JobEvents> events = broker_.ReadJob(kOwner, job_id, 0, 1'000, 1 << 30);
      FUZZ_CHECK(events.ok());
      FUZZ_CHECK(static_cast<int64_t>(events->results.size()) == job->done);
      for (const TaskView& v : events->results) FUZZ_CHECK(IsFinished(v.state) || v.kind.empty());
    }
  }

  FakeClock clock_;
  std::unique_ptr<Store> store_;
  Broker broker_;
  std::set<TaskId> ids_;
  std::map<TaskId, TaskState> finished_;  // each task's one result
  std::map<std::string, std::string> secrets_;
  std::shared_ptr<Stream> streams_[2];
  bool shut_down_ = false;
};

}  // namespace
}  // namespace taskmaster::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  taskmaster::fuzz::SilenceProtobufLogs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  taskmaster::fuzz::Frames frames(data, size);
  taskmaster::fuzz::Harness harness(/*durable=*/frames.Byte() & 1);
  while (!frames.empty()) {
    const uint8_t control = frames.Byte();
    const uint8_t argument = frames.Byte();
    harness.Step(control, argument, frames.Next());
  }
  return 0;
}
