// The client service, the job stream and the worker stream in one process, over gRPC's in-process
// transport (no socket): a fake worker speaks the worker protocol by hand.
#include <atomic>
#include <chrono>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "common/logging.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "master/core/broker.h"
#include "master/rpc/auth.h"
#include "master/rpc/task_queue_service.h"
#include "master/rpc/worker_stream.h"
#include "master/store/memory_store.h"

namespace taskmaster {
namespace {

using std::chrono::seconds;

// A broker on the memory store behind both services, insecure (every caller an admin).
// `hold_first_event`: SubmitAndWatch's first event waits for results or TickQueue.
class InProcessMaster {
 public:
  explicit InProcessMaster(bool hold_first_event = false)
      : store_(NewMemoryStore()),
        broker_(std::make_shared<Broker>(BrokerOptions{}, SystemClock::Get(), store_.get(),
                                         GetLogger("rpc-test"))),
        brokers_(1, nullptr),
        auth_(std::nullopt),
        queue_(&brokers_, &auth_, /*max_watches_per_token=*/100, hold_first_event),
        workers_(&brokers_, &auth_, GetLogger("rpc-test"), /*max_buffered_bytes=*/64 << 20,
                 /*stall=*/std::chrono::seconds(30)) {
    EXPECT_TRUE(broker_->Recover().ok());
    brokers_.Add(0, broker_);
    grpc::ServerBuilder builder;
    builder.RegisterService(&queue_);
    builder.RegisterService(&workers_);
    queue_thread_ = std::make_unique<CompletionQueueThread>(builder.AddCompletionQueue());
    server_ = builder.BuildAndStart();
    queue_thread_->Start();
    queue_.Start(queue_thread_.get());
    workers_.Start(queue_thread_.get());
    channel_ = server_->InProcessChannel(grpc::ChannelArguments());
  }
  ~InProcessMaster() {
    broker_->Shutdown();
    server_->Shutdown(std::chrono::system_clock::now() + seconds(30));
    queue_.Stop();
    workers_.Stop();
    queue_thread_->Stop();
  }

  std::unique_ptr<v1::TaskQueue::Stub> Client() { return v1::TaskQueue::NewStub(channel_); }
  std::unique_ptr<v1::WorkerService::Stub> Workers() {
    return v1::WorkerService::NewStub(channel_);
  }
  Authorizer& auth() { return auth_; }
  void TickQueue() { queue_.Tick(); }
  void StopBroker() { broker_->Shutdown(); }

 private:
  std::unique_ptr<Store> store_;
  std::shared_ptr<Broker> broker_;
  BrokerSet brokers_;
  Authorizer auth_;
  TaskQueueService queue_;
  WorkerServiceImpl workers_;
  std::unique_ptr<CompletionQueueThread> queue_thread_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
};

v1::SubmitRequest EchoBatch(int count) {
  v1::SubmitRequest request;
  for (int i = 0; i < count; ++i) {
    v1::TaskSpec* t = request.add_tasks();
    t->set_kind("echo");
    t->set_payload("p" + std::to_string(i));
  }
  return request;
}

// A worker by hand: says hello, takes `credits`, answers every task with its payload, one result
// per message, so the job changes once per result while its followers read.
void RunEchoWorker(v1::WorkerService::Stub& stub, int tasks) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + seconds(30));
  auto stream = stub.Connect(&context);
  v1::WorkerMessage hello;
  hello.mutable_hello()->set_worker_id("hand-worker");
  hello.mutable_hello()->add_kinds("echo");
  hello.mutable_hello()->set_slots(1);
  hello.set_credits(tasks);
  ASSERT_TRUE(stream->Write(hello));
  int answered = 0;
  v1::MasterMessage in;
  while (answered < tasks && stream->Read(&in)) {
    for (const v1::Task& t : in.tasks()) {
      v1::WorkerMessage result;
      v1::TaskResult* r = result.add_results();
      r->set_task_id(t.task_id());
      r->set_attempt(t.attempt());
      r->set_outcome(v1::TaskResult::SUCCEEDED);
      r->set_output(t.payload());
      ASSERT_TRUE(stream->Write(result));
      ++answered;
    }
  }
  EXPECT_EQ(answered, tasks);
  v1::WorkerMessage bye;
  bye.set_bye(true);
  stream->Write(bye);
  stream->WritesDone();
  // The master acknowledges, then ends the stream once it has read the goodbye.
  while (stream->Read(&in)) {
  }
  EXPECT_TRUE(stream->Finish().ok());
}

// While the master recovers its store it listens, but answers every call UNAVAILABLE, workers'
// streams included: nothing may reach a broker that is not recovered yet.
TEST(RpcGate, EveryCallIsUnavailableWhileRecovering) {
  InProcessMaster master;
  master.auth().SetUnavailable("the master is recovering its store; retry in a moment");
  {
    grpc::ClientContext context;
    v1::StatsResponse stats;
    const grpc::Status s = master.Client()->Stats(&context, v1::StatsRequest(), &stats);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_NE(s.error_message().find("recovering"), std::string::npos) << s.error_message();
  }
  {
    grpc::ClientContext context;
    auto stream = master.Workers()->Connect(&context);
    v1::WorkerMessage hello;
    hello.mutable_hello()->set_worker_id("early");
    stream->Write(hello);
    v1::MasterMessage in;
    EXPECT_FALSE(stream->Read(&in));
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  }
  master.auth().SetUnavailable("");
  grpc::ClientContext context;
  v1::StatsResponse stats;
  EXPECT_TRUE(master.Client()->Stats(&context, v1::StatsRequest(), &stats).ok());
}

// Every result reaches the follower exactly once, although they come in one by one while it
// writes, and the stream ends by itself once the job is done.
TEST(JobStream, FollowsResultsArrivingOneByOneToTheEnd) {
  InProcessMaster master;
  auto client = master.Client();
  constexpr int kTasks = 300;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + seconds(30));
  auto reader = client->SubmitAndWatch(&context, EchoBatch(kTasks));
  auto worker_stub = master.Workers();
  std::thread worker([&] { RunEchoWorker(*worker_stub, kTasks); });
  std::set<uint64_t> seen;
  int results = 0;
  v1::JobEvent event;
  int64_t done = 0;
  while (reader->Read(&event)) {
    for (const v1::TaskInfo& t : event.results()) {
      EXPECT_TRUE(seen.insert(t.id()).second) << "task " << t.id() << " twice";
      EXPECT_EQ(t.state(), v1::SUCCEEDED);
      ++results;
    }
    done = event.progress().done();
  }
  const grpc::Status status = reader->Finish();
  worker.join();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(results, kTasks);
  EXPECT_EQ(done, kTasks);
}

// A held first event waits for the result, so a one-task job is answered in one message: the
// event names the job and carries its result, and the stream ends with it.
TEST(JobStream, AHeldFirstEventCarriesTheResult) {
  InProcessMaster master(/*hold_first_event=*/true);
  auto client = master.Client();
  auto worker_stub = master.Workers();
  std::thread worker([&] { RunEchoWorker(*worker_stub, 1); });
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + seconds(30));
  auto reader = client->SubmitAndWatch(&context, EchoBatch(1));
  std::vector<v1::JobEvent> events;
  for (v1::JobEvent event; reader->Read(&event);) events.push_back(event);
  EXPECT_TRUE(reader->Finish().ok());
  worker.join();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_FALSE(events[0].progress().job_id().empty());
  ASSERT_EQ(events[0].results_size(), 1);
  EXPECT_EQ(events[0].results(0).output(), "p0");
  EXPECT_EQ(events[0].progress().done(), 1);
}

// With no result to wait for (no worker), the master's tick lets the first event go: the client
// learns its job id within a tick, whatever the task takes.
TEST(JobStream, TheTickReleasesAHeldFirstEvent) {
  InProcessMaster master(/*hold_first_event=*/true);
  auto client = master.Client();
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + seconds(30));
  auto reader = client->SubmitAndWatch(&context, EchoBatch(1));
  std::atomic<bool> read{false};
  v1::JobEvent first;
  std::thread follower([&] { read = reader->Read(&first); });
  // Bounded: 200 ticks, 20 ms apart; the first ones may come before the submit is in.
  for (int tick = 0; tick < 200 && !read; ++tick) {
    master.TickQueue();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  context.TryCancel();
  follower.join();
  EXPECT_TRUE(read);
  EXPECT_FALSE(first.progress().job_id().empty());
  EXPECT_EQ(first.results_size(), 0);
  EXPECT_EQ(first.progress().total(), 1);
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

// A master that stops while a first event is held for results still names the job, so that the
// client can follow it on the next master: the stream ends UNAVAILABLE after an event with its id.
TEST(JobStream, AStoppingMasterNamesTheJobOfAHeldFirstEvent) {
  InProcessMaster master(/*hold_first_event=*/true);
  auto client = master.Client();
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + seconds(30));
  auto reader = client->SubmitAndWatch(&context, EchoBatch(1));
  // Bounded: 200 polls, 10 ms apart, until the submit is in (and its first event held).
  for (int poll = 0; poll < 200; ++poll) {
    grpc::ClientContext stats_context;
    v1::StatsResponse stats;
    ASSERT_TRUE(client->Stats(&stats_context, v1::StatsRequest(), &stats).ok());
    if (stats.queues_size() > 0 && stats.queues(0).pending() == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  master.StopBroker();
  v1::JobEvent event;
  ASSERT_TRUE(reader->Read(&event)) << "the stream ended without naming its job";
  EXPECT_FALSE(event.progress().job_id().empty());
  EXPECT_FALSE(reader->Read(&event));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
}

// A job that finished before anyone followed it: one write with everything, then the end.
TEST(JobStream, WatchingAFinishedJobWritesItAllAndEnds) {
  InProcessMaster master;
  auto client = master.Client();
  constexpr int kTasks = 20;
  v1::SubmitResponse submitted;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(client->Submit(&context, EchoBatch(kTasks), &submitted).ok());
  }
  auto worker_stub = master.Workers();
  RunEchoWorker(*worker_stub, kTasks);
  // The worker's last result may still be on its way in: follow until the job says done.
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + seconds(10));
  v1::WatchJobRequest watch;
  watch.set_job_id(submitted.job_id());
  auto reader = client->WatchJob(&context, watch);
  int results = 0;
  v1::JobEvent event;
  while (reader->Read(&event)) results += event.results_size();
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(results, kTasks);
}

// A job id nobody submitted: the stream ends at once with NOT_FOUND.
TEST(JobStream, AnUnknownJobIsNotFound) {
  InProcessMaster master;
  auto client = master.Client();
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + seconds(10));
  v1::WatchJobRequest watch;
  watch.set_job_id("job-nobody");
  auto reader = client->WatchJob(&context, watch);
  v1::JobEvent event;
  EXPECT_FALSE(reader->Read(&event));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
}

// The first message of a worker stream must be a hello; anything else is refused.
TEST(WorkerStream, AStreamWithoutAHelloIsRefused) {
  InProcessMaster master;
  auto stub = master.Workers();
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + seconds(10));
  auto stream = stub->Connect(&context);
  v1::WorkerMessage credits;
  credits.set_credits(5);
  stream->Write(credits);
  v1::MasterMessage in;
  EXPECT_FALSE(stream->Read(&in));
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace taskmaster
