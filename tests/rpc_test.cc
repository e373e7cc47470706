// Unit tests of the rpc layer's plain parts: the worker stream's outbox decides every write and
// finish, so these run without sockets.
#include <string>

#include "common/grpc_util.h"
#include "gtest/gtest.h"
#include "master/rpc/worker_outbox.h"

namespace taskmaster {
namespace {

WorkerOutbound Tasks(int count, size_t payload_bytes, TaskId first = 1) {
  WorkerOutbound m;
  for (int i = 0; i < count; ++i) {
    m.tasks.push_back({first + static_cast<TaskId>(i), 1, "echo", std::string(payload_bytes, 'x'),
                       1000, "default"});
  }
  return m;
}

TEST(WorkerOutbox, WritesOneAtATimeAndCoalescesWhatWaits) {
  WorkerOutbox box(1 << 30);
  StreamStep first = box.Add(Tasks(1, 10, 1));
  ASSERT_NE(first.write, nullptr);
  EXPECT_EQ(first.write->tasks_size(), 1);
  EXPECT_EQ(box.Add(Tasks(2, 10, 2)).write, nullptr) << "a write is in flight";
  EXPECT_EQ(box.Add(Tasks(3, 10, 4)).write, nullptr);
  StreamStep next = box.WriteDone(true);
  ASSERT_NE(next.write, nullptr);
  EXPECT_EQ(next.write->tasks_size(), 5) << "what waited goes in one message";
  EXPECT_EQ(box.WriteDone(true).write, nullptr) << "nothing left";
  EXPECT_EQ(box.buffered_bytes(), 0u);
}

TEST(WorkerOutbox, CutsMessagesAtTheBatchSize) {
  WorkerOutbox box(1 << 30);
  ASSERT_NE(box.Add(Tasks(1, 10)).write, nullptr);
  const size_t payload = kBatchBytes / 4;
  box.Add(Tasks(12, payload, 100));
  int messages = 0;
  int tasks = 0;
  for (StreamStep s = box.WriteDone(true); s.write && messages < 100; s = box.WriteDone(true)) {
    ++messages;
    tasks += s.write->tasks_size();
  }
  EXPECT_EQ(tasks, 12);
  EXPECT_GE(messages, 3) << "12 quarter-batches cannot fit in fewer than 3 messages";
}

// A Finish asked for while a write is in flight waits for it, and is owed even when that write
// fails: a stream whose write failed must still finish, or the call never ends.
// A worker that keeps its stream alive (heartbeats) but never takes a write is cut off once a
// write has waited for it longer than the stall limit, however little waits behind it.
TEST(WorkerOutbox, CutsOffAStreamWhoseWriteStalls) {
  auto now = std::chrono::steady_clock::time_point{};
  WorkerOutbox box(1 << 30, std::chrono::seconds(10), [&now] { return now; });
  ASSERT_NE(box.Add(Tasks(1, 10)).write, nullptr);
  now += std::chrono::seconds(9);
  EXPECT_FALSE(box.Add(Tasks(2, 10)).cut_off) << "within the limit";
  ASSERT_NE(box.WriteDone(true).write, nullptr) << "it reads: the next write starts";
  now += std::chrono::seconds(9);
  EXPECT_FALSE(box.Add(Tasks(3, 10)).cut_off) << "the limit counts from the write in flight";
  now += std::chrono::seconds(2);
  EXPECT_TRUE(box.Add(Tasks(4, 10)).cut_off);
}

TEST(WorkerOutbox, AFinishDeferredForAWriteFollowsItEvenWhenTheWriteFails) {
  WorkerOutbox box(1 << 30);
  ASSERT_NE(box.Add(Tasks(1, 10)).write, nullptr);
  StreamStep during = box.Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "going"));
  EXPECT_FALSE(during.finish.has_value()) << "no Finish while a write is in flight";
  EXPECT_TRUE(box.ending());
  EXPECT_EQ(box.Add(Tasks(1, 10, 2)).write, nullptr) << "nothing more for a stream that ends";
  StreamStep after = box.WriteDone(false);
  ASSERT_TRUE(after.finish.has_value());
  EXPECT_EQ(after.finish->error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(after.write, nullptr);
  EXPECT_FALSE(box.Finish(grpc::Status::OK).finish.has_value()) << "finished once only";
}

TEST(WorkerOutbox, AFailedWriteWithoutAFinishWritesNoMore) {
  WorkerOutbox box(1 << 30);
  ASSERT_NE(box.Add(Tasks(1, 10)).write, nullptr);
  box.Add(Tasks(1, 10, 2));
  StreamStep after = box.WriteDone(false);
  EXPECT_EQ(after.write, nullptr) << "the read side sees the broken stream and finishes";
  EXPECT_FALSE(after.finish.has_value());
  EXPECT_TRUE(box.Finish(grpc::Status::OK).finish.has_value());
}

TEST(WorkerOutbox, AWorkerThatDoesNotReadIsCutOff) {
  WorkerOutbox box(1000);
  ASSERT_NE(box.Add(Tasks(1, 100)).write, nullptr);
  StreamStep cut = box.Add(Tasks(20, 100, 2));
  EXPECT_TRUE(cut.cut_off);
  EXPECT_FALSE(cut.finish.has_value()) << "the write it never takes is in flight";
  StreamStep ended = box.WriteDone(false);
  ASSERT_TRUE(ended.finish.has_value());
  EXPECT_EQ(ended.finish->error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
}

TEST(WorkerOutbox, AnIdleStreamFinishesAtOnce) {
  WorkerOutbox box(1 << 30);
  StreamStep step = box.Finish(grpc::Status::OK);
  ASSERT_TRUE(step.finish.has_value());
  EXPECT_TRUE(step.finish->ok());
  EXPECT_EQ(box.Add(Tasks(1, 10)).write, nullptr);
}

}  // namespace
}  // namespace taskmaster
