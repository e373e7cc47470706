// The stream that follows a job (see job_stream.h).
#include "master/rpc/job_stream.h"

#include <utility>

#include "common/grpc_util.h"
#include "common/util.h"
#include "master/rpc/translate.h"

namespace taskmaster {
namespace {

// Results per JobEvent: bounds the size of one write while a big job catches up.
constexpr size_t kMaxResultsPerEvent = 1000;

}  // namespace

JobStream::JobStream(Broker* broker, Authorized who, StreamQuota* quota, bool submitting)
    : broker_(broker),
      caller_(who.caller()),
      token_(std::move(who.token)),
      quota_(quota),
      link_(std::make_shared<Link>(this)),
      submitting_(submitting) {}

void JobStream::Follow(std::string job_id, int64_t after, FirstEventHold* hold) {
  bool cancelled;
  std::optional<grpc::Status> finish;
  {
    absl::MutexLock lock(&mu_);
    submitting_ = false;
    cancelled = cancelled_;
    if (cancelled) {
      finish = FinishOnce(grpc::Status::CANCELLED);
    } else {
      job_id_ = job_id;
      cursor_ = after;
      hold_first_ = hold != nullptr;
    }
  }
  if (cancelled) {
    End(std::move(finish));
    return;
  }
  if (absl::Status status = broker_->Watch(caller_, job_id, link_); !status.ok()) {
    Fail(ToGrpcStatus(status));
    return;
  }
  if (hold) hold->Add(link_);
  Pump();
}

void JobStream::FirstEventDue() {
  {
    absl::MutexLock lock(&mu_);
    hold_first_ = false;
  }
  Pump();
}

void JobStream::Fail(const grpc::Status& status) {
  std::optional<grpc::Status> finish;
  {
    absl::MutexLock lock(&mu_);
    submitting_ = false;
    finish = FinishOnce(status);
  }
  End(std::move(finish));
}

void JobStream::OnWriteDone(bool ok) {
  std::optional<grpc::Status> finish;
  {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) finish = FinishOnce(grpc::Status(grpc::StatusCode::UNAVAILABLE, "write failed"));
  }
  if (finish) {
    End(std::move(finish));
    return;
  }
  Pump();
}

void JobStream::OnCancel() {
  std::optional<grpc::Status> finish;
  {
    absl::MutexLock lock(&mu_);
    if (!writing_ && !submitting_) finish = FinishOnce(grpc::Status::CANCELLED);
    cancelled_ = true;
  }
  End(std::move(finish));
}

void JobStream::OnDone() {
  link_->ref.Detach();
  std::string job_id;
  {
    absl::MutexLock lock(&mu_);
    job_id = job_id_;
  }
  if (!job_id.empty()) broker_->Unwatch(job_id, link_.get());
  quota_->Release(token_);
  delete this;
}

void JobStream::Pump() {
  {
    absl::MutexLock lock(&mu_);
    if (pumping_) {
      repump_ = true;  // the pump in progress reads again
      return;
    }
    pumping_ = true;
  }
  const v1::JobEvent* write = nullptr;
  bool last = false;
  std::optional<grpc::Status> finish;
  // Bounded: each round reads what a change brought; changes stop when the job's tasks are done.
  while (true) {
    std::string job_id;
    int64_t cursor;
    {
      absl::MutexLock lock(&mu_);
      repump_ = false;
      if (writing_ || finished_ || cancelled_) {
        // A cancel while writing finishes once the write is done (OnWriteDone pumps again).
        if (!writing_ && cancelled_) finish = FinishOnce(grpc::Status::CANCELLED);
        pumping_ = false;
        break;
      }
      job_id = job_id_;
      cursor = cursor_;
    }
    absl::StatusOr<JobEvents> events =
        broker_->stopping()
            ? absl::UnavailableError("the master is shutting down; follow the job again")
            : broker_->ReadJob(caller_, job_id, cursor, kMaxResultsPerEvent, kBatchBytes);
    absl::MutexLock lock(&mu_);
    if (!events.ok()) {
      finish = FinishOnce(ToGrpcStatus(events.status()));
      pumping_ = false;
      break;
    }
    if (finished_) {
      pumping_ = false;
      break;
    }
    if (events->results.empty() &&
        (wrote_any_ ? events->progress.open == wrote_open_ : hold_first_)) {
      // nothing new yet
      if (repump_) continue;
      pumping_ = false;
      break;
    }
    event_.Clear();
    for (TaskView& v : events->results) ToProto(v, event_.add_results());
    cursor_ += static_cast<int64_t>(events->results.size());
    ToProto(events->progress, event_.mutable_progress());
    // The last event carries the status with it: the client has its answer with that one
    // message, instead of waiting for the status to follow the write's completion.
    last =
        JobFullyRead(events->progress.done, events->progress.total, events->progress.open, cursor_);
    if (last) finished_ = true;
    wrote_any_ = true;
    wrote_open_ = events->progress.open;
    writing_ = true;
    write = &event_;
    pumping_ = false;
    break;
  }
  if (write && last) {
    StartWriteAndFinish(write, grpc::WriteOptions(), grpc::Status::OK);
  } else if (write) {
    StartWrite(write);
  }
  End(std::move(finish));
}

std::optional<grpc::Status> JobStream::FinishOnce(grpc::Status status) {
  if (finished_) return std::nullopt;
  finished_ = true;
  return status;
}

void FirstEventHold::Add(std::weak_ptr<JobStream::Link> link) {
  absl::MutexLock lock(&mu_);
  held_.push_back(std::move(link));
}

void FirstEventHold::ReleaseAll() {
  std::vector<std::weak_ptr<JobStream::Link>> held;
  {
    absl::MutexLock lock(&mu_);
    held.swap(held_);
  }
  // Outside mu_: a stream's pump calls the broker and gRPC. A stream that is done is skipped.
  for (const std::weak_ptr<JobStream::Link>& weak : held) {
    if (std::shared_ptr<JobStream::Link> link = weak.lock()) {
      link->ref.Call([](JobStream& stream) { stream.FirstEventDue(); });
    }
  }
}

grpc::ServerWriteReactor<v1::JobEvent>* RefusedJobStream(const grpc::Status& status) {
  struct Refused final : grpc::ServerWriteReactor<v1::JobEvent> {
    explicit Refused(const grpc::Status& s) { Finish(s); }
    void OnDone() override { delete this; }
  };
  return new Refused(status);
}

}  // namespace taskmaster
