// The writing side of one worker stream as plain state: what the broker sends is queued, coalesced
// into messages of at most kBatchBytes of tasks, written one at a time, and the stream's Finish is
// deferred while a write is in flight. Each call returns the step the stream then takes, after
// releasing its lock, so no gRPC call is made under it.
#pragma once

#include <chrono>
#include <cstddef>
#include <deque>
#include <functional>
#include <optional>

#include "grpcpp/grpcpp.h"
#include "master/core/task.h"
#include "taskmaster/v1/taskmaster.pb.h"

namespace taskmaster {

// What the stream does next. `write` stays valid until the write completes (WriteDone).
struct StreamStep {
  const v1::MasterMessage* write = nullptr;  // StartWrite it
  std::optional<grpc::Status> finish;        // Finish the call with it
  bool cut_off = false;  // the worker does not read: cancel the call (its write never completes)
};

// Not thread-safe: the stream calls it under its own mutex.
class WorkerOutbox {
 public:
  using Clock = std::function<std::chrono::steady_clock::time_point()>;
  // `max_buffered_bytes`: tasks that may wait for a worker that does not read before it is cut;
  // `stall`: how long a write may wait for the worker to read before it is cut, whatever waits.
  explicit WorkerOutbox(size_t max_buffered_bytes,
                        std::chrono::steady_clock::duration stall = std::chrono::hours(24),
                        Clock now = std::chrono::steady_clock::now)
      : max_buffered_bytes_(max_buffered_bytes), stall_(stall), now_(std::move(now)) {}

  // Queues `message`; writes it now if no write is in flight. Past the buffer limit, or behind a
  // write stalled for `stall`, the stream is cut off and finished with RESOURCE_EXHAUSTED.
  // Ignored once the stream is ending.
  StreamStep Add(WorkerOutbound message);
  // The write in flight completed (`ok`: it went out). Writes the next message, or the Finish
  // deferred for the write, which is owed whether the write went through or not.
  StreamStep WriteDone(bool ok);
  // Finishes the stream once no write is in flight. Only the first status counts.
  StreamStep Finish(grpc::Status status);

  size_t buffered_bytes() const { return buffered_bytes_; }
  bool ending() const { return finished_ || finish_pending_.has_value(); }

 private:
  StreamStep WriteNext();

  struct Pending {
    v1::MasterMessage message;
    size_t bytes = 0;  // of its tasks, roughly (see kItemOverheadBytes)
  };
  const size_t max_buffered_bytes_;
  const std::chrono::steady_clock::duration stall_;
  const Clock now_;
  std::chrono::steady_clock::time_point write_started_;  // of the write in flight
  std::deque<Pending> queue_;
  size_t buffered_bytes_ = 0;  // of the tasks queued and being written
  size_t writing_bytes_ = 0;   // of the tasks being written
  v1::MasterMessage writing_;  // read by gRPC until WriteDone
  bool writing_now_ = false;
  bool finished_ = false;
  std::optional<grpc::Status> finish_pending_;
};

}  // namespace taskmaster
