// The stream that follows a job for WatchJob and SubmitAndWatch: it writes what is new whenever
// the broker says the job changed, one write in flight at a time, and finishes once every result
// has been written. It runs on the master's completion queue (see completion_queue.h).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "master/core/broker_set.h"
#include "master/rpc/auth.h"
#include "master/rpc/completion_queue.h"
#include "master/rpc/reactor_ref.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {

class FirstEventHold;
class TaskQueueService;

// No lock of the stream is held while it calls the broker or gRPC: it decides under mu_, then
// acts. Only one thread pumps at a time; a change that arrives meanwhile makes it read again.
// It deletes itself once every operation it started has completed.
class JobStream {
 public:
  enum class Call { kWatchJob, kSubmitAndWatch };

  // Awaits the next call of `call` on `cq`.
  static void Await(TaskQueueService* service, Call call, grpc::ServerCompletionQueue* cq);

  // The broker's handle on this stream; it outlives the stream.
  struct Link final : JobWatcher {
    explicit Link(JobStream* s) : ref(s) {}
    void OnJobChanged() override {
      ref.Call([](JobStream& stream) { stream.Pump(); });
    }
    ReactorRef<JobStream> ref;
  };

  // The first event has waited long enough for results: it goes out with what there is.
  void FirstEventDue();

 private:
  JobStream(TaskQueueService* service, Call call, grpc::ServerCompletionQueue* cq);

  void OnCall(bool ok);
  void OnWriteDone(bool ok);
  void OnFinishDone(bool ok);
  // The call is over: cancelled by the client, or finished.
  void OnDone(bool ok);

  // The call arrived: authorizes it, then follows or submits.
  void Begin();
  // Sets broker_; false (and the stream failed) when the call belongs to another master.
  bool Route(absl::StatusOr<std::shared_ptr<Broker>> broker);
  void Submit(std::vector<TaskSpec> specs);
  // Starts following `job_id` after its first `after` results. With `hold`, the first event
  // waits for results to carry, until `hold` releases it, rather than go out with none.
  void Follow(std::string job_id, int64_t after, FirstEventHold* hold);
  void Fail(const grpc::Status& status);
  void Pump();
  // The status to finish with, the first time only.
  std::optional<grpc::Status> FinishOnce(grpc::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void End(std::optional<grpc::Status> status);
  // An operation (or the submit's callback) completed; the last one deletes the stream.
  void Completed();

  TaskQueueService* const service_;
  const Call call_;
  grpc::ServerCompletionQueue* const cq_;  // where it and the next call are awaited
  // Of the job's partition: set before the stream watches the job, and kept until it is deleted.
  std::shared_ptr<Broker> broker_;
  const std::shared_ptr<Link> link_;
  grpc::ServerContext context_;
  v1::SubmitRequest submit_request_;   // SubmitAndWatch's
  v1::WatchJobRequest watch_request_;  // WatchJob's
  grpc::ServerAsyncWriter<v1::JobEvent> writer_;
  CqTag<JobStream, &JobStream::OnCall> call_tag_{this};
  CqTag<JobStream, &JobStream::OnWriteDone> write_tag_{this};
  CqTag<JobStream, &JobStream::OnFinishDone> finish_tag_{this};
  CqTag<JobStream, &JobStream::OnDone> done_tag_{this};
  // Set once the call arrived, before anything reads them.
  Caller caller_;
  std::string token_;
  bool holds_quota_ = false;

  absl::Mutex mu_;
  int ops_ ABSL_GUARDED_BY(mu_) = 0;  // started and not completed, the submit's callback included
  std::string job_id_ ABSL_GUARDED_BY(mu_);  // set once by Follow
  int64_t cursor_ ABSL_GUARDED_BY(mu_) = 0;
  // Read by gRPC while writing_, and after the last event's write until the stream is gone.
  v1::JobEvent event_ ABSL_GUARDED_BY(mu_);
  bool pumping_ ABSL_GUARDED_BY(mu_) = false;
  bool repump_ ABSL_GUARDED_BY(mu_) = false;  // the job changed while pumping_
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool wrote_any_ ABSL_GUARDED_BY(mu_) = false;
  bool hold_first_ ABSL_GUARDED_BY(mu_) = false;  // the first event, not written, waits
  // Whether the job was open in the last event written: its closing is news even without results.
  bool wrote_open_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  // A submit's callback is still to come: a cancel meanwhile finishes the stream once it has.
  bool submitting_ ABSL_GUARDED_BY(mu_) = false;
};

// SubmitAndWatch streams whose first event (the acknowledgement that names the job) waits for the
// job's first results: a short task's answer then reaches the client in one message instead of
// two, which on a loaded host is a wakeup of the client less on the way to the result. The
// master's tick releases them, so none waits longer than one tick. Thread-safe.
class FirstEventHold {
 public:
  void Add(std::weak_ptr<JobStream::Link> link);
  // Every stream held now writes its first event (with or without results).
  void ReleaseAll();

 private:
  absl::Mutex mu_;
  std::vector<std::weak_ptr<JobStream::Link>> held_ ABSL_GUARDED_BY(mu_);
};

}  // namespace taskmaster
