// The client API (TaskQueue): submit, status, results, cancel and stats, translated to broker
// calls and back, on the master's completion queue (see completion_queue.h).
#pragma once

#include <cstddef>

#include "master/core/broker_set.h"
#include "master/rpc/auth.h"
#include "master/rpc/completion_queue.h"
#include "master/rpc/job_stream.h"
#include "master/rpc/unary_call.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {

// The client API: translates protobuf to broker calls and back. Thread-safe. Register it on the
// builder, Start it on the server's queue once the server runs, Stop it once the server has shut
// down and before the queue stops.
class TaskQueueService final : public v1::TaskQueue::AsyncService {
 public:
  // `max_watches_per_token`: WatchJob and SubmitAndWatch streams one token may hold open;
  // `hold_first_event`: SubmitAndWatch's first event waits for results until the next Tick.
  TaskQueueService(BrokerSet* brokers, const Authorizer* auth, size_t max_watches_per_token,
                   bool hold_first_event)
      : brokers_(brokers),
        auth_(auth),
        watches_(max_watches_per_token),
        hold_first_event_(hold_first_event) {}

  // Awaits every method's calls on `queue` (once per queue the server has).
  void Start(CompletionQueueThread* queue);
  // The server has shut down: waits for the calls to end. Idempotent.
  void Stop();
  // The master's tick: first events held since the last one go out.
  void Tick() { first_events_.ReleaseAll(); }

 private:
  friend class JobStream;
  template <typename Request, typename Response>
  using Call = UnaryCall<v1::TaskQueue::AsyncService, Request, Response>;

  void AnswerSubmit(Call<v1::SubmitRequest, v1::SubmitResponse>* call);
  void AnswerGetTask(Call<v1::GetTaskRequest, v1::TaskInfo>* call);
  void AnswerGetJob(Call<v1::GetJobRequest, v1::JobInfo>* call);
  void AnswerCancel(Call<v1::CancelRequest, v1::CancelResponse>* call);
  void AnswerStats(Call<v1::StatsRequest, v1::StatsResponse>* call);
  void AnswerWorkers(Call<v1::WorkersRequest, v1::WorkersResponse>* call);

  BrokerSet* const brokers_;
  const Authorizer* const auth_;
  StreamQuota watches_;
  const bool hold_first_event_;
  FirstEventHold first_events_;
  CallTracker calls_{"client calls"};
};

}  // namespace taskmaster
