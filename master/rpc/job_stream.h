// The stream that follows a job for WatchJob and SubmitAndWatch: it writes what is new whenever
// the broker says the job changed, one write in flight at a time, and finishes once every result
// has been written.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "master/core/broker.h"
#include "master/rpc/auth.h"
#include "master/rpc/reactor_ref.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {

class FirstEventHold;

// No lock of the stream is held while it calls the broker or gRPC: it decides under mu_, then
// acts. Only one thread pumps at a time; a change that arrives meanwhile makes it read again.
class JobStream final : public grpc::ServerWriteReactor<v1::JobEvent> {
 public:
  // The broker's handle on this stream; it outlives the stream.
  struct Link final : JobWatcher {
    explicit Link(JobStream* s) : ref(s) {}
    void OnJobChanged() override {
      ref.Call([](JobStream& stream) { stream.Pump(); });
    }
    ReactorRef<JobStream> ref;
  };

  // `submitting`: Follow or Fail comes later, from a submit's callback; until then the stream
  // stays alive even if the client goes away. The stream holds one of `who`'s `quota` until done.
  JobStream(Broker* broker, Authorized who, StreamQuota* quota, bool submitting);

  // Starts following `job_id` after its first `after` results. With `hold`, the first event
  // waits for results to carry, until `hold` releases it, rather than go out with none.
  void Follow(std::string job_id, int64_t after, FirstEventHold* hold = nullptr);
  void Fail(const grpc::Status& status);

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;
  // The first event has waited long enough for results: it goes out with what there is.
  void FirstEventDue();

 private:
  void Pump();
  // The status to finish with, the first time only.
  std::optional<grpc::Status> FinishOnce(grpc::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void End(std::optional<grpc::Status> status) {
    if (status) Finish(*status);
  }

  Broker* const broker_;
  const Caller caller_;
  const std::string token_;
  StreamQuota* const quota_;
  const std::shared_ptr<Link> link_;
  absl::Mutex mu_;
  std::string job_id_ ABSL_GUARDED_BY(mu_);  // set once by Follow
  int64_t cursor_ ABSL_GUARDED_BY(mu_) = 0;
  // Read by gRPC while writing_, and after the last event's write until OnDone.
  v1::JobEvent event_ ABSL_GUARDED_BY(mu_);
  bool pumping_ ABSL_GUARDED_BY(mu_) = false;
  bool repump_ ABSL_GUARDED_BY(mu_) = false;  // the job changed while pumping_
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool wrote_any_ ABSL_GUARDED_BY(mu_) = false;
  bool hold_first_ ABSL_GUARDED_BY(mu_) = false;  // the first event waits for results
  // Whether the job was open in the last event written: its closing is news even without results.
  bool wrote_open_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool submitting_ ABSL_GUARDED_BY(mu_);
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

// A stream that only finishes, with the status of a refused call.
grpc::ServerWriteReactor<v1::JobEvent>* RefusedJobStream(const grpc::Status& status);

}  // namespace taskmaster
