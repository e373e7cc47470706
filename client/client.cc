#include "client/client.h"

#include <algorithm>
#include <deque>
#include <map>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/partition.h"
#include "common/util.h"

namespace taskmaster {

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(ClientOptions options) {
  if (options.master.address.empty()) {
    return absl::InvalidArgumentError("no master address: pass --master or set TASKMASTER_ADDR");
  }
  std::vector<Endpoint> endpoints;
  for (const std::string& address : SplitList(options.master.address)) {
    ChannelOptions one = options.master;
    one.address = address;
    absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(one);
    if (!channel.ok()) return channel.status();
    endpoints.push_back(
        {address, v1::TaskQueue::NewStub(*channel), grpc::health::v1::Health::NewStub(*channel)});
  }
  return std::unique_ptr<Client>(new Client(std::move(options), std::move(endpoints)));
}

Client::Client(ClientOptions options, std::vector<Endpoint> endpoints)
    : options_(std::move(options)),
      endpoints_(std::move(endpoints)),
      masters_(options_.master.address) {}

const Client::Endpoint& Client::Current() const {
  const std::string address = masters_.current();
  for (const Endpoint& e : endpoints_) {
    if (e.address == address) return e;
  }
  return endpoints_.front();
}

bool Client::FailOver(const Endpoint& endpoint, const grpc::Status& status,
                      const grpc::ClientContext& context,
                      std::chrono::steady_clock::time_point deadline) const {
  if (endpoints_.size() < 2 || status.error_code() != grpc::StatusCode::UNAVAILABLE) return false;
  // Nothing was applied: a master answered that it does not serve, or none was reached (gRPC's
  // words when no connection could be made). A call cut off midway may have been applied.
  const bool not_applied = context.GetServerTrailingMetadata().contains(kAnsweredByMaster) ||
                           status.error_message().starts_with("failed to connect");
  if (!not_applied || std::chrono::steady_clock::now() >= deadline) return false;
  if (masters_.Failed(endpoint.address, ServingMaster(context))) {
    // Every master failed this round: one is taking over. A little later, then again.
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return true;
}

void Client::Prepare(grpc::ClientContext* context) const {
  AddBearerToken(*context, options_.token);
  context->set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
}

absl::Status Client::Explain(const grpc::Status& status, const grpc::ClientContext& context,
                             const std::string& addr) const {
  switch (status.error_code()) {
    case grpc::StatusCode::OK:
      return absl::OkStatus();
    case grpc::StatusCode::UNAVAILABLE:
      // The master's own answer (its disk is full, say) is passed on as it is.
      if (context.GetServerTrailingMetadata().contains(kAnsweredByMaster)) {
        return absl::UnavailableError(
            absl::StrCat("the master at ", addr, " says: ", status.error_message()));
      }
      return absl::UnavailableError(
          absl::StrCat("cannot reach the master at ", addr, ": ", status.error_message()));
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return absl::DeadlineExceededError(
          absl::StrCat("the master at ", addr, " did not answer in time"));
    case grpc::StatusCode::UNAUTHENTICATED:
      return absl::UnauthenticatedError(absl::StrCat("the master refused the token (",
                                                     status.error_message(),
                                                     "): check --token-file or TASKMASTER_TOKEN"));
    default:
      return FromGrpcStatus(status);
  }
}

namespace {

// One unary call of the stub: the method, its request, and the response it fills.
template <typename Response, typename Request>
using StubMethod = grpc::Status (v1::TaskQueue::Stub::*)(grpc::ClientContext*, const Request&,
                                                         Response*);

}  // namespace

template <typename Response, typename Request>
absl::StatusOr<Response> Client::Call(StubMethod<Response, Request> method,
                                      const Request& request) const {
  const auto deadline = std::chrono::steady_clock::now() + options_.failover_timeout;
  while (true) {
    const Endpoint& endpoint = Current();
    grpc::ClientContext context;
    Prepare(&context);
    Response response;
    const grpc::Status s = (endpoint.stub.get()->*method)(&context, request, &response);
    if (s.ok()) {
      masters_.Served(endpoint.address);
      return response;
    }
    if (!FailOver(endpoint, s, context, deadline)) return Explain(s, context, endpoint.address);
  }
}

namespace {

// Text fields of a protobuf message must be UTF-8: the master could not even parse the request
// otherwise, and would answer with an error that names nothing. Payloads are bytes: anything goes.
absl::Status CheckText(const v1::SubmitRequest& request) {
  for (int i = 0; i < request.tasks_size(); ++i) {
    const v1::TaskSpec& t = request.tasks(i);
    std::vector<std::pair<const char*, const std::string*>> fields = {
        {"kind", &t.kind()}, {"queue", &t.queue()}, {"idempotency key", &t.idempotency_key()}};
    for (const auto& [key, value] : t.labels()) {
      fields.push_back({"label", &key});
      fields.push_back({"label value", &value});
    }
    for (const auto& [what, text] : fields) {
      if (!IsValidUtf8(*text)) {
        return absl::InvalidArgumentError(
            absl::StrCat("task ", i, ": the ", what, " '", Quote(*text), "' is not valid UTF-8"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<v1::SubmitResponse> Client::Submit(const v1::SubmitRequest& request) const {
  if (absl::Status s = CheckText(request); !s.ok()) return s;
  return Call(&v1::TaskQueue::Stub::Submit, request);
}

absl::StatusOr<v1::TaskInfo> Client::GetTask(uint64_t id) const {
  v1::GetTaskRequest request;
  request.set_id(id);
  return Call(&v1::TaskQueue::Stub::GetTask, request);
}

absl::StatusOr<v1::JobInfo> Client::GetJob(const std::string& job_id) const {
  v1::GetJobRequest request;
  request.set_job_id(job_id);
  return Call(&v1::TaskQueue::Stub::GetJob, request);
}

absl::StatusOr<int64_t> Client::CancelTask(uint64_t id) const {
  v1::CancelRequest request;
  request.set_task_id(id);
  auto response = Call(&v1::TaskQueue::Stub::Cancel, request);
  if (!response.ok()) return response.status();
  return response->cancelled();
}

absl::StatusOr<int64_t> Client::CancelJob(const std::string& job_id) const {
  v1::CancelRequest request;
  request.set_job_id(job_id);
  auto response = Call(&v1::TaskQueue::Stub::Cancel, request);
  if (!response.ok()) return response.status();
  return response->cancelled();
}

namespace {

// The answers of masters serving different partitions, merged as a master merges its own
// partitions' (BrokerSet): a queue's counts summed, a worker (with a stream to each) shown once.
void MergeWorkers(const google::protobuf::RepeatedPtrField<v1::WorkerInfo>& from,
                  google::protobuf::RepeatedPtrField<v1::WorkerInfo>* into) {
  std::map<std::string, v1::WorkerInfo*> by_id;
  for (v1::WorkerInfo& w : *into) by_id[w.worker_id()] = &w;
  for (const v1::WorkerInfo& w : from) {
    auto it = by_id.find(w.worker_id());
    if (it == by_id.end()) {
      *into->Add() = w;
      continue;
    }
    v1::WorkerInfo& m = *it->second;
    m.set_running(m.running() + w.running());
    m.set_stuck(m.stuck() + w.stuck());  // each stream counts its own partition's
    m.set_connected(m.connected() || w.connected());
    m.set_draining(m.draining() || w.draining());
    m.set_connected_ms(std::min(m.connected_ms(), w.connected_ms()));
    m.set_heartbeat_age_ms(std::min(m.heartbeat_age_ms(), w.heartbeat_age_ms()));
    m.set_silent(m.silent() && w.silent());
  }
  std::sort(into->begin(), into->end(), [](const v1::WorkerInfo& a, const v1::WorkerInfo& b) {
    return a.worker_id() < b.worker_id();
  });
}

void MergeStats(const v1::StatsResponse& from, v1::StatsResponse* into) {
  std::map<std::string, v1::QueueStats*> by_name;
  for (v1::QueueStats& q : *into->mutable_queues()) by_name[q.queue()] = &q;
  for (const v1::QueueStats& q : from.queues()) {
    auto it = by_name.find(q.queue());
    if (it == by_name.end()) {
      *into->add_queues() = q;
      continue;
    }
    v1::QueueStats& m = *it->second;
    m.set_pending(m.pending() + q.pending());
    m.set_leased(m.leased() + q.leased());
    m.set_succeeded(m.succeeded() + q.succeeded());
    m.set_failed(m.failed() + q.failed());
    m.set_dead(m.dead() + q.dead());
    m.set_cancelled(m.cancelled() + q.cancelled());
    m.set_delayed(m.delayed() + q.delayed());
    m.set_oldest_ready_age_ms(std::max(m.oldest_ready_age_ms(), q.oldest_ready_age_ms()));
    m.set_submitted(m.submitted() + q.submitted());
    m.set_retried(m.retried() + q.retried());
    m.set_redelivered(m.redelivered() + q.redelivered());
  }
  std::sort(into->mutable_queues()->begin(), into->mutable_queues()->end(),
            [](const v1::QueueStats& a, const v1::QueueStats& b) { return a.queue() < b.queue(); });
  MergeWorkers(from.workers(), into->mutable_workers());
  into->set_duplicate_results(into->duplicate_results() + from.duplicate_results());
}

void MergeWorkerLists(const v1::WorkersResponse& from, v1::WorkersResponse* into) {
  MergeWorkers(from.workers(), into->mutable_workers());
}

}  // namespace

template <typename Response, typename Request>
absl::StatusOr<Response> Client::CallEveryPartition(StubMethod<Response, Request> method,
                                                    const Request& request,
                                                    void (*merge)(const Response&,
                                                                  Response*)) const {
  absl::StatusOr<Response> first = Call(method, request);
  if (!first.ok() || first->partition_count() <= 1) return first;
  Response merged = *std::move(first);
  // What masters say is bounded before it steers the walk: each master asked once, no more
  // masters than partitions, partitions in range.
  const auto count = static_cast<size_t>(
      std::min<int32_t>(merged.partition_count(), static_cast<int32_t>(kMaxPartitions)));
  const auto valid = [&](int32_t p) { return p >= 0 && static_cast<size_t>(p) < count; };
  std::set<int32_t> counted;
  for (int32_t p : merged.partitions()) {
    if (valid(p)) counted.insert(p);
  }
  std::deque<std::string> to_ask(merged.other_masters().begin(), merged.other_masters().end());
  std::set<std::string> asked = {masters_.current()};
  std::vector<std::string> unreachable;
  while (!to_ask.empty() && counted.size() < count && asked.size() <= count) {
    const std::string address = std::move(to_ask.front());
    to_ask.pop_front();
    if (!asked.insert(address).second) continue;
    absl::StatusOr<Response> answer = CallAt(address, method, request);
    if (!answer.ok()) {
      unreachable.push_back(address);
      continue;
    }
    for (const std::string& next : answer->other_masters()) {
      if (to_ask.size() < count) to_ask.push_back(next);
    }
    // A partition being handed over may be counted by both masters for a moment: an answer
    // that repeats one counted already is left out rather than counted twice.
    if (std::any_of(answer->partitions().begin(), answer->partitions().end(),
                    [&](int32_t p) { return !valid(p) || counted.contains(p); })) {
      continue;
    }
    merge(*answer, &merged);
    counted.insert(answer->partitions().begin(), answer->partitions().end());
  }
  merged.clear_partitions();
  for (int32_t p : counted) merged.add_partitions(p);
  merged.clear_other_masters();
  for (std::string& address : unreachable) merged.add_other_masters(std::move(address));
  return merged;
}

template <typename Response, typename Request>
absl::StatusOr<Response> Client::CallAt(const std::string& address,
                                        StubMethod<Response, Request> method,
                                        const Request& request) const {
  std::unique_ptr<v1::TaskQueue::Stub> own;
  v1::TaskQueue::Stub* stub = nullptr;
  for (const Endpoint& e : endpoints_) {
    if (e.address == address) stub = e.stub.get();
  }
  if (stub == nullptr) {  // a master the others named, not in the list this client was given
    ChannelOptions one = options_.master;
    one.address = address;
    absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(one);
    if (!channel.ok()) return channel.status();
    own = v1::TaskQueue::NewStub(*channel);
    stub = own.get();
  }
  grpc::ClientContext context;
  Prepare(&context);
  Response response;
  const grpc::Status s = (stub->*method)(&context, request, &response);
  if (!s.ok()) return Explain(s, context, address);
  return response;
}

absl::StatusOr<v1::StatsResponse> Client::Stats() const {
  return CallEveryPartition(&v1::TaskQueue::Stub::Stats, v1::StatsRequest{}, &MergeStats);
}

absl::StatusOr<v1::WorkersResponse> Client::Workers() const {
  return CallEveryPartition(&v1::TaskQueue::Stub::Workers, v1::WorkersRequest{}, &MergeWorkerLists);
}

absl::StatusOr<bool> Client::Serving() const {
  // Given several masters: whether one of them serves.
  absl::Status error;
  for (const Endpoint& endpoint : endpoints_) {
    grpc::ClientContext context;
    Prepare(&context);
    grpc::health::v1::HealthCheckResponse response;
    const grpc::Status status =
        endpoint.health->Check(&context, grpc::health::v1::HealthCheckRequest{}, &response);
    if (!status.ok()) {
      error = Explain(status, context, endpoint.address);
    } else if (response.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
      return true;
    }
  }
  if (!error.ok() && endpoints_.size() == 1) return error;
  return false;
}

absl::Status Client::WatchJob(const std::string& job_id,
                              const std::function<void(const v1::JobEvent&)>& on_event) const {
  return Follow(job_id, 0, on_event, /*lost_master=*/false);
}

absl::StatusOr<std::string> Client::SubmitAndWatch(
    const v1::SubmitRequest& request,
    const std::function<void(const v1::JobEvent&)>& on_event) const {
  if (absl::Status s = CheckText(request); !s.ok()) return s;
  const auto deadline = std::chrono::steady_clock::now() + options_.failover_timeout;
  std::string job_id;
  int64_t seen = 0;
  grpc::Status status;
  while (true) {
    const Endpoint& endpoint = Current();
    grpc::ClientContext context;
    AddBearerToken(context, options_.token);
    auto reader = endpoint.stub->SubmitAndWatch(&context, request);
    v1::JobEvent event;
    while (reader->Read(&event)) {
      job_id = event.progress().job_id();
      seen += event.results_size();
      on_event(event);
      if (JobFullyRead(event.progress().done(), event.progress().total(), event.progress().open(),
                       seen)) {
        reader->Finish().IgnoreError();
        masters_.Served(endpoint.address);
        return job_id;
      }
    }
    status = reader->Finish();
    if (!job_id.empty()) break;
    // Before the first event the job may or may not exist: resubmit with idempotency keys
    // (unless no master that serves was reached).
    if (!FailOver(endpoint, status, context, deadline)) {
      return Explain(status, context, endpoint.address);
    }
  }
  absl::Status followed = Follow(job_id, seen, on_event, /*lost_master=*/!status.ok());
  if (!followed.ok()) return followed;
  return job_id;
}

absl::Status Client::Follow(const std::string& job_id, int64_t seen,
                            const std::function<void(const v1::JobEvent&)>& on_event,
                            bool lost_master) const {
  Backoff backoff(std::chrono::milliseconds(100), std::chrono::milliseconds(2'000));
  // Since when the master has been lost: a stream's first event comes at once, so a job that is
  // merely quiet (long tasks, no results for a while) never counts as lost.
  // (max(): not lost. Not an optional: GCC 12 takes its value for uninitialized.)
  auto lost_since = std::chrono::steady_clock::time_point::max();
  while (true) {
    grpc::ClientContext context;
    AddBearerToken(context, options_.token);
    v1::WatchJobRequest request;
    request.set_job_id(job_id);
    request.set_after(seen);
    // After losing the master, a fresh channel reconnects at our pace, not gRPC's.
    const Endpoint& endpoint = Current();
    std::unique_ptr<v1::TaskQueue::Stub> fresh;
    if (lost_master) {
      ChannelOptions one = options_.master;
      one.address = endpoint.address;
      absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(one);
      if (!channel.ok()) return channel.status();
      fresh = v1::TaskQueue::NewStub(*channel);
    }
    auto reader = (fresh ? fresh : endpoint.stub)->WatchJob(&context, request);
    v1::JobEvent event;
    bool complete = false;
    while (reader->Read(&event)) {
      lost_since = std::chrono::steady_clock::time_point::max();
      backoff.Reset();
      seen += event.results_size();
      on_event(event);
      complete = JobFullyRead(event.progress().done(), event.progress().total(),
                              event.progress().open(), seen);
    }
    const grpc::Status status = reader->Finish();
    if (complete) return absl::OkStatus();
    if (status.error_code() == grpc::StatusCode::NOT_FOUND && lost_master) {
      return absl::NotFoundError(
          absl::StrCat("the master came back without job ", job_id,
                       " (a master on the memory store forgets everything when it restarts)"));
    }
    const bool retryable = status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                           status.error_code() == grpc::StatusCode::CANCELLED ||
                           status.ok();  // ended early by a master shutting down
    if (!retryable) return Explain(status, context, endpoint.address);
    const auto now = std::chrono::steady_clock::now();
    if (lost_since == std::chrono::steady_clock::time_point::max()) lost_since = now;
    if (now - lost_since > options_.reconnect_timeout) {
      return absl::UnavailableError(absl::StrCat("lost the master at ", options_.master.address,
                                                 " for over ", options_.reconnect_timeout.count(),
                                                 " ms while following ", job_id));
    }
    lost_master = true;
    // Given several masters, the next one (or the one a standby named) is tried at once.
    if (masters_.Failed(endpoint.address, ServingMaster(context))) {
      std::this_thread::sleep_for(backoff.Next());
    }
  }
}

}  // namespace taskmaster
