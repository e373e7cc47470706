#include "master/service.h"

#include <deque>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/grpc_util.h"
#include "master/translate.h"

namespace taskmaster {
namespace {

// Results per JobEvent: bounds the size of one write while a big job catches up.
constexpr size_t kMaxResultsPerEvent = 1000;

v1::TaskState ToProto(TaskState s) {
  switch (s) {
    case TaskState::kPending:
      return v1::PENDING;
    case TaskState::kDelayed:
      return v1::DELAYED;
    case TaskState::kLeased:
      return v1::LEASED;
    case TaskState::kSucceeded:
      return v1::SUCCEEDED;
    case TaskState::kDead:
      return v1::DEAD;
    case TaskState::kCancelled:
      return v1::CANCELLED;
  }
  return v1::TASK_STATE_UNSPECIFIED;
}

void ToProto(TaskView& v, v1::TaskInfo* p) {
  p->set_id(v.id);
  p->set_job_id(std::move(v.job_id));
  p->set_queue(std::move(v.queue));
  p->set_kind(std::move(v.kind));
  // A task past retention has no kind and no state worth reporting.
  p->set_state(p->kind().empty() ? v1::TASK_STATE_UNSPECIFIED : ToProto(v.state));
  p->set_attempts(v.attempts);
  p->set_max_attempts(v.max_attempts);
  p->set_priority(v.priority);
  p->set_payload(std::move(v.payload));
  p->set_output(std::move(v.output));
  p->set_error(std::move(v.error));
  p->set_worker(std::move(v.worker));
  p->set_waiting_for(std::move(v.waiting_for));
  p->set_created_ms(v.created_ms);
  p->set_finished_ms(v.finished_ms);
  p->set_not_before_ms(v.not_before_ms);
}

void ToProto(const JobView& v, v1::JobInfo* p) {
  p->set_job_id(v.job_id);
  p->set_total(v.total);
  p->set_done(v.done);
  p->set_succeeded(v.succeeded);
  p->set_dead(v.dead);
  p->set_cancelled(v.cancelled);
  p->set_created_ms(v.created_ms);
}

void ToProto(const WorkerView& v, v1::WorkerInfo* p) {
  p->set_worker_id(v.worker_id);
  p->set_name(v.name);
  p->set_host(v.host);
  for (const auto& k : v.kinds) p->add_kinds(k);
  for (const auto& q : v.queues) p->add_queues(q);
  p->mutable_labels()->insert(v.labels.begin(), v.labels.end());
  p->set_slots(v.slots);
  p->set_running(v.running);
  p->set_connected(v.connected);
  p->set_draining(v.draining);
  p->set_connected_ms(v.connected_ms);
}

void AddRefs(const std::vector<TaskRef>& refs,
             google::protobuf::RepeatedPtrField<v1::TaskRef>* out) {
  for (const TaskRef& r : refs) {
    v1::TaskRef* p = out->Add();
    p->set_task_id(r.id);
    p->set_attempt(r.attempt);
  }
}

// Finishes a unary call with a broker status.
grpc::ServerUnaryReactor* Reply(grpc::CallbackServerContext* context, const grpc::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

// Follows one job: writes what is new whenever the broker says the job changed, one write in
// flight at a time, and finishes once every result has been written.
class JobStream final : public grpc::ServerWriteReactor<v1::JobEvent> {
 public:
  // `submitting`: Follow or Fail comes later, from a submit's callback; until then the stream
  // stays alive even if the client goes away. The stream holds one of `who`'s `quota` until done.
  JobStream(Broker* broker, Authorized who, StreamQuota* quota, bool submitting)
      : broker_(broker),
        caller_(who.caller()),
        token_(std::move(who.token)),
        quota_(quota),
        link_(std::make_shared<Link>(this)),
        submitting_(submitting) {}

  // Starts following `job_id` after its first `after` results.
  void Follow(std::string job_id, int64_t after) {
    {
      absl::MutexLock lock(&mu_);
      submitting_ = false;
      if (cancelled_) {
        FinishLocked(grpc::Status::CANCELLED);
        return;
      }
      job_id_ = std::move(job_id);
      cursor_ = after;
    }
    if (absl::Status status = broker_->Watch(caller_, job_id_, link_); !status.ok()) {
      Fail(ToGrpcStatus(status));
      return;
    }
    Pump();
  }

  void Fail(const grpc::Status& status) {
    absl::MutexLock lock(&mu_);
    submitting_ = false;
    FinishLocked(status);
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        FinishLocked(grpc::Status(grpc::StatusCode::UNAVAILABLE, "write failed"));
        return;
      }
      if (last_written_) {
        FinishLocked(grpc::Status::OK);
        return;
      }
    }
    Pump();
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    if (!writing_ && !submitting_) FinishLocked(grpc::Status::CANCELLED);
    cancelled_ = true;
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&link_->mu);
      link_->stream = nullptr;
    }
    std::string job_id;
    {
      absl::MutexLock lock(&mu_);
      job_id = job_id_;
    }
    if (!job_id.empty()) broker_->Unwatch(job_id, link_.get());
    quota_->Release(token_);
    delete this;
  }

 private:
  // The broker's handle on this stream; it outlives the stream, which detaches in OnDone.
  struct Link final : JobWatcher {
    explicit Link(JobStream* s) : stream(s) {}
    void OnJobChanged() override {
      absl::MutexLock lock(&mu);
      if (stream) stream->Pump();
    }
    absl::Mutex mu;
    JobStream* stream ABSL_GUARDED_BY(mu);
  };

  void Pump() {
    absl::MutexLock lock(&mu_);
    if (writing_ || finished_) return;
    if (cancelled_) {
      FinishLocked(grpc::Status::CANCELLED);
      return;
    }
    if (broker_->stopping()) {
      FinishLocked(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                "the master is shutting down; follow the job again"));
      return;
    }
    absl::StatusOr<JobEvents> events =
        broker_->ReadJob(caller_, job_id_, cursor_, kMaxResultsPerEvent, kBatchBytes);
    if (!events.ok()) {
      FinishLocked(ToGrpcStatus(events.status()));
      return;
    }
    if (events->results.empty() && wrote_any_) return;  // nothing new yet
    event_.Clear();
    for (TaskView& v : events->results) ToProto(v, event_.add_results());
    cursor_ += static_cast<int64_t>(events->results.size());
    ToProto(events->progress, event_.mutable_progress());
    last_written_ =
        events->progress.done == events->progress.total && cursor_ >= events->progress.done;
    wrote_any_ = true;
    writing_ = true;
    StartWrite(&event_);
  }

  void FinishLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  Broker* const broker_;
  const Caller caller_;
  const std::string token_;
  StreamQuota* const quota_;
  absl::Mutex mu_;
  std::string job_id_ ABSL_GUARDED_BY(mu_);  // set once by Follow
  int64_t cursor_ ABSL_GUARDED_BY(mu_) = 0;
  v1::JobEvent event_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool wrote_any_ ABSL_GUARDED_BY(mu_) = false;
  bool last_written_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  const std::shared_ptr<Link> link_;
  bool submitting_ ABSL_GUARDED_BY(mu_);
};

// One worker's stream. Reads are handled one at a time; what the broker sends is queued and
// written one message at a time, coalescing whatever piled up during a write.
class WorkerStream final : public grpc::ServerBidiReactor<v1::WorkerMessage, v1::MasterMessage> {
 public:
  WorkerStream(Broker* broker, std::shared_ptr<spdlog::logger> log, const grpc::Status& auth,
               grpc::CallbackServerContext* context, size_t max_buffered_bytes)
      : broker_(broker),
        log_(std::move(log)),
        context_(context),
        peer_(context->peer()),
        max_buffered_bytes_(max_buffered_bytes),
        channel_(std::make_shared<Channel>(this)) {
    if (!auth.ok()) {
      log_->warn("refused a worker stream from {}: {}", peer_, auth.error_message());
      absl::MutexLock lock(&mu_);
      FinishLocked(auth);
      return;
    }
    StartRead(&in_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // The worker closed its side, the connection broke, or a message could not be parsed:
      // gRPC does not say which. A stream that ends before its hello was read is refused.
      if (attached_) broker_->Detach(handle_, bye_);
      absl::MutexLock lock(&mu_);
      FinishLocked(attached_ ? grpc::Status::OK
                             : grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                            "the stream ended before a hello could be read (a "
                                            "hello with a text field that is not UTF-8 cannot "
                                            "be parsed)"));
      return;
    }
    if (!attached_) {
      if (!in_.has_hello()) {
        absl::MutexLock lock(&mu_);
        FinishLocked(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                  "the first message of a worker stream must carry a hello"));
        return;
      }
      absl::StatusOr<Broker::WorkerHandle> handle =
          broker_->Attach(FromProto(*in_.mutable_hello()), channel_);
      if (!handle.ok()) {
        log_->warn("refused a worker stream from {}: {}", peer_, handle.status().ToString());
        absl::MutexLock lock(&mu_);
        FinishLocked(ToGrpcStatus(handle.status()));
        return;
      }
      handle_ = *handle;
      attached_ = true;
    }
    Handle(in_);
    StartRead(&in_);
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    buffered_bytes_ -= writing_bytes_;
    writing_bytes_ = 0;
    // A Finish deferred for this write is owed whether the write went through or not.
    if (finish_pending_) {
      FinishLocked(*finish_pending_);
      return;
    }
    if (!ok) return;  // the read side sees the broken stream and finishes
    WriteNextLocked();
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&channel_->mu);
      channel_->stream = nullptr;
    }
    delete this;
  }

 private:
  // The broker's handle on this stream; it outlives the stream, which detaches in OnDone.
  struct Channel final : WorkerChannel {
    explicit Channel(WorkerStream* s) : stream(s) {}
    void Send(WorkerOutbound message) override {
      absl::MutexLock lock(&mu);
      if (stream) stream->Enqueue(std::move(message));
    }
    absl::Mutex mu;
    WorkerStream* stream ABSL_GUARDED_BY(mu);
  };

  void Handle(v1::WorkerMessage& m) {
    if (const int64_t echo_at = ApplyWorkerMessage(*broker_, handle_, m); echo_at > 0) {
      WorkerOutbound echo;
      echo.heartbeat_echo = echo_at;
      Enqueue(std::move(echo));
    }
    if (m.bye()) bye_ = true;
  }

  void Enqueue(WorkerOutbound message) {
    absl::MutexLock lock(&mu_);
    if (finished_ || finish_pending_) return;  // nothing more for a stream that is ending
    if (outbox_.empty()) outbox_.emplace_back();
    v1::MasterMessage* out = &outbox_.back().message;
    if (message.welcome) {
      v1::Welcome* w = out->mutable_welcome();
      w->set_master_epoch(message.welcome->master_epoch);
      w->set_heartbeat_interval_ms(message.welcome->heartbeat_interval_ms);
      w->set_lease_timeout_ms(message.welcome->lease_timeout_ms);
      w->set_echoes_heartbeats(true);  // see Handle
      w->set_worker_secret(message.welcome->secret);
      AddRefs(message.welcome->revoked, w->mutable_revoked());
    }
    for (LeasedTask& t : message.tasks) {
      if (outbox_.back().bytes >= kBatchBytes) {
        outbox_.emplace_back();
        out = &outbox_.back().message;
      }
      outbox_.back().bytes += t.payload.size() + 32;
      buffered_bytes_ += t.payload.size() + 32;
      v1::Task* p = out->add_tasks();
      p->set_task_id(t.id);
      p->set_attempt(t.attempt);
      p->set_kind(std::move(t.kind));
      p->set_payload(std::move(t.payload));
      p->set_timeout_ms(t.timeout_ms);
      p->set_queue(std::move(t.queue));
    }
    for (TaskId id : message.cancel) out->add_cancel(id);
    AddRefs(message.acked, out->mutable_acked());
    if (message.shutting_down) out->set_shutting_down(true);
    out->set_heartbeat_echo(std::max(out->heartbeat_echo(), message.heartbeat_echo));
    if (buffered_bytes_ > max_buffered_bytes_) {
      // A worker that does not read its stream holds tasks it does not run; cut it off rather
      // than buffer for it without bound. Its leases lapse as for any lost worker.
      log_->warn("cut off worker stream from {}: {} bytes wait for it to read", peer_,
                 buffered_bytes_);
      FinishLocked(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                absl::StrCat("the worker does not read its stream: ",
                                             buffered_bytes_, " bytes wait for it")));
      // The write it never takes ends with the call; the Finish deferred for it follows then.
      context_->TryCancel();
      return;
    }
    WriteNextLocked();
  }

  void WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_ || outbox_.empty()) return;
    writing_msg_ = std::move(outbox_.front().message);
    writing_bytes_ = outbox_.front().bytes;
    outbox_.pop_front();
    writing_ = true;
    StartWrite(&writing_msg_);
  }

  // Finish waits for a write in flight, so that one is never abandoned half way.
  void FinishLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    if (writing_) {
      finish_pending_ = status;
      return;
    }
    finished_ = true;
    Finish(status);
  }

  Broker* const broker_;
  const std::shared_ptr<spdlog::logger> log_;
  grpc::CallbackServerContext* const context_;  // the call's, valid until OnDone
  const std::string peer_;
  const size_t max_buffered_bytes_;
  const std::shared_ptr<Channel> channel_;

  // Used only by the reactions on the read side, which gRPC runs one at a time.
  v1::WorkerMessage in_;
  Broker::WorkerHandle handle_;
  bool attached_ = false;
  bool bye_ = false;

  absl::Mutex mu_;
  struct Pending {
    v1::MasterMessage message;
    size_t bytes = 0;  // of its tasks, roughly
  };
  std::deque<Pending> outbox_ ABSL_GUARDED_BY(mu_);
  size_t buffered_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // of the tasks in outbox_ and being written
  size_t writing_bytes_ ABSL_GUARDED_BY(mu_) = 0;   // of the tasks being written
  v1::MasterMessage writing_msg_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> finish_pending_ ABSL_GUARDED_BY(mu_);
};

// A stream that only finishes, with the status of a refused call.
grpc::ServerWriteReactor<v1::JobEvent>* Refuse(const grpc::Status& status) {
  struct Refused final : grpc::ServerWriteReactor<v1::JobEvent> {
    explicit Refused(const grpc::Status& s) { Finish(s); }
    void OnDone() override { delete this; }
  };
  return new Refused(status);
}

}  // namespace

Authorizer::Authorizer(std::optional<TokenSet> tokens) : open_(!tokens) {
  if (tokens) tokens_ = std::make_shared<const TokenSet>(std::move(*tokens));
}

void Authorizer::Replace(TokenSet tokens) {
  auto replacement = std::make_shared<const TokenSet>(std::move(tokens));
  absl::MutexLock lock(&mu_);
  tokens_ = std::move(replacement);
}

grpc::Status Authorizer::Check(grpc::CallbackServerContext* context, Role need, const char* call,
                               Authorized* who) const {
  context->AddTrailingMetadata(kAnsweredByMaster, "1");
  if (open_) {
    if (who) *who = Authorized{};
    return grpc::Status::OK;
  }
  const auto& metadata = context->client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing 'authorization: Bearer <token>' metadata");
  }
  std::optional<std::string_view> token =
      BearerToken(std::string_view(it->second.data(), it->second.size()));
  std::shared_ptr<const TokenSet> tokens;
  {
    absl::MutexLock lock(&mu_);
    tokens = tokens_;
  }
  std::optional<Identity> identity = token ? tokens->Lookup(*token) : std::nullopt;
  if (!identity) return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "unknown token");
  if (!RoleAllows(identity->role, need)) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        absl::StrCat("a '", RoleName(identity->role), "' token may not call ", call,
                                     " (it needs a '", RoleName(need), "' or 'admin' token)"));
  }
  if (who) *who = Authorized{std::move(*identity), std::string(*token)};
  return grpc::Status::OK;
}

bool StreamQuota::Acquire(const std::string& token) {
  absl::MutexLock lock(&mu_);
  size_t& open = open_[token];
  if (open >= per_token_) return false;
  ++open;
  return true;
}

void StreamQuota::Release(const std::string& token) {
  absl::MutexLock lock(&mu_);
  auto it = open_.find(token);
  if (it != open_.end() && --it->second == 0) open_.erase(it);
}

grpc::ServerUnaryReactor* TaskQueueService::Submit(grpc::CallbackServerContext* context,
                                                   const v1::SubmitRequest* request,
                                                   v1::SubmitResponse* response) {
  Authorized who;
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, "Submit", &who); !s.ok()) {
    return Reply(context, s);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  broker_->Submit(
      who.caller(), TakeSpecs(request), [reactor, response](absl::StatusOr<SubmitOutcome> outcome) {
        if (!outcome.ok()) {
          reactor->Finish(ToGrpcStatus(outcome.status()));
          return;
        }
        response->set_job_id(std::move(outcome->job_id));
        response->mutable_task_ids()->Add(outcome->task_ids.begin(), outcome->task_ids.end());
        for (auto& w : outcome->warnings) response->add_warnings(std::move(w));
        reactor->Finish(grpc::Status::OK);
      });
  return reactor;
}

grpc::ServerUnaryReactor* TaskQueueService::GetTask(grpc::CallbackServerContext* context,
                                                    const v1::GetTaskRequest* request,
                                                    v1::TaskInfo* response) {
  Authorized who;
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, "GetTask", &who); !s.ok()) {
    return Reply(context, s);
  }
  absl::StatusOr<TaskView> view = broker_->GetTask(who.caller(), request->id());
  if (!view.ok() || view->settled) {
    if (view.ok()) ToProto(*view, response);
    return Reply(context, ToGrpcStatus(view.status()));
  }
  // Its result is being written: answer once it is on disk, so it cannot be taken back.
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  broker_->WhenDurable(
      [this, reactor, request, response, caller = who.caller()](absl::Status status) {
        absl::StatusOr<TaskView> again = broker_->GetTask(caller, request->id());
        if (status.ok() && again.ok()) ToProto(*again, response);
        reactor->Finish(!status.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                                    "the task's result is not stored yet; retry")
                                     : ToGrpcStatus(again.status()));
      });
  return reactor;
}

grpc::ServerUnaryReactor* TaskQueueService::GetJob(grpc::CallbackServerContext* context,
                                                   const v1::GetJobRequest* request,
                                                   v1::JobInfo* response) {
  Authorized who;
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, "GetJob", &who); !s.ok()) {
    return Reply(context, s);
  }
  absl::StatusOr<JobView> view = broker_->GetJob(who.caller(), request->job_id());
  if (view.ok()) ToProto(*view, response);
  return Reply(context, ToGrpcStatus(view.status()));
}

grpc::ServerWriteReactor<v1::JobEvent>* TaskQueueService::RefuseWatch(
    grpc::CallbackServerContext* context, const char* call, Authorized* who) {
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, call, who); !s.ok()) return Refuse(s);
  if (!watches_.Acquire(who->token)) {
    return Refuse(grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("this token has ", watches_.per_token(),
                     " job streams open, its limit (--max-watches-per-token); close some first")));
  }
  return nullptr;
}

grpc::ServerWriteReactor<v1::JobEvent>* TaskQueueService::WatchJob(
    grpc::CallbackServerContext* context, const v1::WatchJobRequest* request) {
  Authorized who;
  if (auto* refused = RefuseWatch(context, "WatchJob", &who)) return refused;
  auto* stream = new JobStream(broker_, std::move(who), &watches_, /*submitting=*/false);
  stream->Follow(request->job_id(), request->after());
  return stream;
}

grpc::ServerWriteReactor<v1::JobEvent>* TaskQueueService::SubmitAndWatch(
    grpc::CallbackServerContext* context, const v1::SubmitRequest* request) {
  Authorized who;
  if (auto* refused = RefuseWatch(context, "SubmitAndWatch", &who)) return refused;
  const Caller caller = who.caller();
  auto* stream = new JobStream(broker_, std::move(who), &watches_, /*submitting=*/true);
  broker_->Submit(caller, TakeSpecs(request), [stream](absl::StatusOr<SubmitOutcome> outcome) {
    if (outcome.ok()) {
      stream->Follow(outcome->job_id, 0);
    } else {
      stream->Fail(ToGrpcStatus(outcome.status()));
    }
  });
  return stream;
}

grpc::ServerUnaryReactor* TaskQueueService::Cancel(grpc::CallbackServerContext* context,
                                                   const v1::CancelRequest* request,
                                                   v1::CancelResponse* response) {
  Authorized who;
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, "Cancel", &who); !s.ok()) {
    return Reply(context, s);
  }
  absl::StatusOr<int64_t> cancelled =
      request->has_task_id()  ? broker_->CancelTask(who.caller(), request->task_id())
      : request->has_job_id() ? broker_->CancelJob(who.caller(), request->job_id())
                              : absl::InvalidArgumentError("cancel needs a task id or a job id");
  if (!cancelled.ok()) return Reply(context, ToGrpcStatus(cancelled.status()));
  response->set_cancelled(*cancelled);
  // A cancel is acknowledged once it is durable, so a restart cannot forget it.
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  broker_->WhenDurable([reactor](absl::Status status) {
    reactor->Finish(status.ok() ? grpc::Status::OK
                                : grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                               absl::StrCat("the cancel could not be stored: ",
                                                            std::string(status.message()))));
  });
  return reactor;
}

grpc::ServerUnaryReactor* TaskQueueService::Stats(grpc::CallbackServerContext* context,
                                                  const v1::StatsRequest* request,
                                                  v1::StatsResponse* response) {
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, "Stats"); !s.ok()) {
    return Reply(context, s);
  }
  for (const QueueStatsView& q : broker_->QueueStats()) {
    v1::QueueStats* p = response->add_queues();
    p->set_queue(q.queue);
    p->set_pending(q.pending);
    p->set_leased(q.leased);
    p->set_succeeded(q.succeeded);
    p->set_failed(q.failed);
    p->set_dead(q.dead);
    p->set_cancelled(q.cancelled);
  }
  for (const WorkerView& w : broker_->Workers()) ToProto(w, response->add_workers());
  response->set_duplicate_results(broker_->DuplicateResults());
  return Reply(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* TaskQueueService::Workers(grpc::CallbackServerContext* context,
                                                    const v1::WorkersRequest* request,
                                                    v1::WorkersResponse* response) {
  if (grpc::Status s = auth_->Check(context, Role::kSubmit, "Workers"); !s.ok()) {
    return Reply(context, s);
  }
  for (const WorkerView& w : broker_->Workers()) ToProto(w, response->add_workers());
  return Reply(context, grpc::Status::OK);
}

grpc::ServerBidiReactor<v1::WorkerMessage, v1::MasterMessage>* WorkerServiceImpl::Connect(
    grpc::CallbackServerContext* context) {
  return new WorkerStream(broker_, log_, auth_->Check(context, Role::kWork, "Connect"), context,
                          max_buffered_bytes_);
}

}  // namespace taskmaster
