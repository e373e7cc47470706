// The stream that follows a job (see job_stream.h).
#include "master/rpc/job_stream.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/util.h"
#include "master/rpc/task_queue_service.h"
#include "master/rpc/translate.h"

namespace taskmaster {
namespace {

// Results per JobEvent: bounds the size of one write while a big job catches up.
constexpr size_t kMaxResultsPerEvent = 1000;

}  // namespace

void JobStream::Await(TaskQueueService* service, Call call, grpc::ServerCompletionQueue* cq) {
  if (!service->calls_.Begin()) return;
  new JobStream(service, call, cq);
}

JobStream::JobStream(TaskQueueService* service, Call call, grpc::ServerCompletionQueue* cq)
    : service_(service),
      call_(call),
      cq_(cq),
      link_(std::make_shared<Link>(this)),
      writer_(&context_) {
  // Delivered only if a call arrives (counted then, in OnCall).
  context_.AsyncNotifyWhenDone(&done_tag_);
  {
    absl::MutexLock lock(&mu_);
    ops_ = 1;
  }
  if (call == Call::kSubmitAndWatch) {
    service->RequestSubmitAndWatch(&context_, &submit_request_, &writer_, cq, cq, &call_tag_);
  } else {
    service->RequestWatchJob(&context_, &watch_request_, &writer_, cq, cq, &call_tag_);
  }
}

void JobStream::OnCall(bool ok) {
  if (ok) {
    {
      absl::MutexLock lock(&mu_);
      ++ops_;  // the done tag
    }
    Await(service_, call_, cq_);
    Begin();
  }  // else the server is shutting down: no call came
  Completed();
}

void JobStream::Begin() {
  const char* name = call_ == Call::kSubmitAndWatch ? "SubmitAndWatch" : "WatchJob";
  Authorized who;
  if (grpc::Status s = service_->auth_->Check(&context_, Role::kSubmit, name, &who); !s.ok()) {
    Fail(s);
    return;
  }
  if (!service_->watches_.Acquire(who.token)) {
    Fail(grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("this token has ", service_->watches_.per_token(),
                     " job streams open, its limit (--max-watches-per-token); close some first")));
    return;
  }
  holds_quota_ = true;
  caller_ = who.caller();
  token_ = std::move(who.token);
  if (call_ == Call::kWatchJob) {
    if (!Route(service_->brokers_->ForJob(watch_request_.job_id()))) return;
    Follow(watch_request_.job_id(), watch_request_.after(), nullptr);
    return;
  }
  // Appending to an open job and following it from here would skip what it already finished.
  if (!submit_request_.job_id().empty()) {
    Fail(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                      "SubmitAndWatch opens a new job; add batches with Submit and follow the "
                      "job with WatchJob"));
    return;
  }
  std::vector<TaskSpec> specs = TakeSpecs(&submit_request_);
  if (!Route(service_->brokers_->ForSubmit(caller_, SubmitTarget{}, specs))) return;
  Submit(std::move(specs));
}

bool JobStream::Route(absl::StatusOr<std::shared_ptr<Broker>> broker) {
  if (!broker.ok()) {
    Fail(ToGrpcStatus(broker.status(), &context_));
    return false;
  }
  broker_ = std::move(*broker);
  return true;
}

void JobStream::Submit(std::vector<TaskSpec> specs) {
  {
    absl::MutexLock lock(&mu_);
    submitting_ = true;
    ++ops_;  // the callback, which may come after the call is over
  }
  FirstEventHold* hold = service_->hold_first_event_ ? &service_->first_events_ : nullptr;
  broker_->Submit(caller_, SubmitTarget{}, std::move(specs),
                  [this, hold](absl::StatusOr<SubmitOutcome> outcome) {
                    if (outcome.ok()) {
                      Follow(outcome->job_id, 0, hold);
                    } else {
                      Fail(ToGrpcStatus(outcome.status()));
                    }
                    Completed();
                  });
}

void JobStream::Follow(std::string job_id, int64_t after, FirstEventHold* hold) {
  std::optional<grpc::Status> finish;
  bool cancelled;
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
    // Written already (results came within the tick): nothing to read again.
    if (!hold_first_) return;
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
  } else {
    Pump();
  }
  Completed();
}

void JobStream::OnFinishDone(bool) { Completed(); }

void JobStream::OnDone(bool) {
  if (context_.IsCancelled()) {
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      // A write in flight finishes the stream when it completes (Pump sees cancelled_); a submit
      // in flight, when its callback comes.
      if (!writing_ && !submitting_) finish = FinishOnce(grpc::Status::CANCELLED);
      cancelled_ = true;
    }
    End(std::move(finish));
  }
  Completed();
}

void JobStream::Completed() {
  {
    absl::MutexLock lock(&mu_);
    if (--ops_ > 0) return;
  }
  // No broker notification starts after this; one in progress may have started a write
  // meanwhile, whose completion comes back here.
  link_->ref.Detach();
  std::string job_id;
  {
    absl::MutexLock lock(&mu_);
    if (ops_ > 0) return;
    job_id = job_id_;
  }
  if (!job_id.empty()) broker_->Unwatch(job_id, link_.get());
  if (holds_quota_) service_->watches_.Release(token_);
  TaskQueueService* service = service_;
  delete this;
  service->calls_.End();
}

void JobStream::End(std::optional<grpc::Status> status) {
  if (!status) return;
  {
    absl::MutexLock lock(&mu_);
    ++ops_;
  }
  writer_.Finish(*status, &finish_tag_);
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
  grpc::Status last_status = grpc::Status::OK;
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
    const bool stopping = broker_->stopping();
    absl::StatusOr<JobEvents> events =
        broker_->ReadJob(caller_, job_id, cursor, kMaxResultsPerEvent, kBatchBytes);
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
    if (!stopping && events->results.empty() &&
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
    if (stopping && !last) {
      // The master is going: the stream ends with what there is, and with the job's id, which a
      // held first event has not told yet, so the client follows the job on the next master.
      last = true;
      last_status = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                 "the master is shutting down; follow the job again");
    }
    if (last) finished_ = true;
    wrote_any_ = true;
    hold_first_ = false;
    wrote_open_ = events->progress.open;
    writing_ = true;
    write = &event_;
    ++ops_;
    pumping_ = false;
    break;
  }
  if (write && last) {
    writer_.WriteAndFinish(*write, grpc::WriteOptions(), last_status, &finish_tag_);
  } else if (write) {
    writer_.Write(*write, &write_tag_);
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

}  // namespace taskmaster
