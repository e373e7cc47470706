// The stream to the master: connecting, the hello and welcome, reading, the sender, reconnecting
// with backoff, and the watchdog. Protobuf is converted to and from the slots' plain structs here.
#include "worker/session.h"

#include <optional>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/limits.h"
#include "common/util.h"

namespace taskmaster::worker {
namespace {

int64_t SteadyMs(Time t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

Welcome FromProto(const v1::Welcome& w) {
  Welcome welcome;
  welcome.master_epoch = w.master_epoch();
  welcome.heartbeat_interval_ms = w.heartbeat_interval_ms();
  welcome.lease_timeout_ms = w.lease_timeout_ms();
  welcome.echoes_heartbeats = w.echoes_heartbeats();
  welcome.worker_secret = w.worker_secret();
  for (const v1::TaskRef& ref : w.revoked()) {
    welcome.revoked.push_back({ref.task_id(), ref.attempt()});
  }
  return welcome;
}

// Takes the tasks' payloads out of `in`.
FromMaster FromProto(v1::MasterMessage& in) {
  FromMaster m;
  m.tasks.reserve(in.tasks_size());
  for (v1::Task& t : *in.mutable_tasks()) {
    m.tasks.push_back({.task_id = t.task_id(),
                       .attempt = t.attempt(),
                       .kind = std::move(*t.mutable_kind()),
                       .payload = std::move(*t.mutable_payload()),
                       .timeout_ms = t.timeout_ms()});
  }
  m.cancel.assign(in.cancel().begin(), in.cancel().end());
  for (const v1::TaskRef& ref : in.acked()) m.acked.push_back({ref.task_id(), ref.attempt()});
  // On the worker's own clock: it is the heartbeat_at of an earlier heartbeat.
  if (in.heartbeat_echo() > 0) {
    m.heartbeat_echo = Time(std::chrono::milliseconds(in.heartbeat_echo()));
  }
  return m;
}

v1::TaskResult::Outcome ToProto(Outcome outcome) {
  switch (outcome) {
    case Outcome::kSucceeded:
      return v1::TaskResult::SUCCEEDED;
    case Outcome::kFailed:
      return v1::TaskResult::FAILED;
    case Outcome::kCancelled:
      return v1::TaskResult::CANCELLED;
    case Outcome::kReturned:
      return v1::TaskResult::RETURNED;
  }
  return v1::TaskResult::OUTCOME_UNSPECIFIED;
}

v1::WorkerMessage ToProto(ToMaster out) {
  v1::WorkerMessage m;
  for (Result& r : out.results) {
    v1::TaskResult* result = m.add_results();
    result->set_task_id(r.task_id);
    result->set_attempt(r.attempt);
    result->set_outcome(ToProto(r.outcome));
    result->set_output(std::move(r.output));
    result->set_error(std::move(r.error));
    result->set_permanent(r.permanent);
  }
  for (ProgressReport& p : out.progress) {
    v1::TaskProgress* progress = m.add_progress();
    progress->set_task_id(p.task_id);
    progress->set_attempt(p.attempt);
    progress->set_done(p.done);
    progress->set_total(p.total);
    progress->set_message(ValidUtf8(p.message, kMaxProgressMessageBytes));
  }
  m.set_credits(out.credits);
  m.set_task_us(out.task_us);
  if (out.heartbeat_at) {
    m.set_stuck(out.stuck);
    m.set_heartbeat(true);
    m.set_heartbeat_at(SteadyMs(*out.heartbeat_at));
  }
  m.set_draining(out.draining);
  m.set_bye(out.bye);
  return m;
}

}  // namespace

void Session::Start() {
  thread_ = std::thread([this] { Loop(); });
  watchdog_ = std::thread([this] { WatchdogLoop(); });
}

void Session::Cancel() { CancelSession(0); }

void Session::Join() {
  if (thread_.joinable()) thread_.join();
  if (watchdog_.joinable()) watchdog_.join();
}

void Session::CancelSession(uint64_t number) {
  std::shared_ptr<grpc::ClientContext> live;
  {
    absl::MutexLock lock(&mu_);
    if (number == 0 || number == number_) live = live_;
  }
  // Outside the lock: the call's own locks are taken in there.
  if (live) live->TryCancel();
}

void Session::Loop() {
  Backoff backoff(options_.reconnect_min, options_.reconnect_max);
  bool warned = false;
  while (true) {
    grpc::Status status;
    std::string serving_at;
    const std::string address = masters_.current();
    const bool welcomed = Run(address, &status, &serving_at);
    if (welcomed) {
      masters_.Served(address);
      backoff.Reset();
      warned = false;
    }
    if (slots_->Leaving()) return;
    // Given several masters, the next is tried at once; a round of them all failing backs off.
    const bool round_failed = masters_.Failed(address, serving_at);
    const std::chrono::milliseconds wait =
        round_failed ? slots_->ReconnectDelay(backoff.Next()) : std::chrono::milliseconds(0);
    log_->debug("stream to {} ended ({}: {}); next attempt {} in {} ms", address,
                static_cast<int>(status.error_code()), status.error_message(), masters_.current(),
                wait.count());
    if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED ||
        status.error_code() == grpc::StatusCode::PERMISSION_DENIED ||
        status.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
      log_->error("master {} refused this worker: {}; retrying in {} ms", address,
                  status.error_message(), wait.count());
    } else if (!warned && round_failed) {
      log_->warn("lost the master {} ({}); reconnecting with backoff", options_.master.address,
                 status.error_message());
      warned = true;
    }
    if (slots_->AwaitLeaving(wait)) return;
  }
}

v1::WorkerMessage Session::MakeHello(const HelloState& state) const {
  v1::WorkerMessage message;
  v1::Hello* hello = message.mutable_hello();
  hello->set_worker_id(identity_.worker_id);
  hello->set_name(ValidUtf8(identity_.name));
  hello->set_host(ValidUtf8(identity_.host));
  for (const std::string& kind : identity_.kinds) hello->add_kinds(kind);
  for (const std::string& queue : options_.queues) hello->add_queues(queue);
  for (const auto& [key, value] : options_.labels) {
    (*hello->mutable_labels())[key] = ValidUtf8(value);
  }
  hello->set_slots(identity_.slots);
  for (const TaskRef& held : state.held) {
    v1::TaskRef* ref = hello->add_held();
    ref->set_task_id(held.task_id);
    ref->set_attempt(held.attempt);
  }
  hello->set_master_epoch(state.master_epoch);
  hello->set_worker_secret(state.worker_secret);
  hello->set_partition(identity_.partition);
  return message;
}

bool Session::Run(const std::string& address, grpc::Status* status, std::string* serving_at) {
  auto context_owner = std::make_shared<grpc::ClientContext>();
  grpc::ClientContext& context = *context_owner;
  AddBearerToken(context, options_.token);
  uint64_t number;
  {
    // Live before the slots hear of the session: a cut or a Cancel that follows finds it.
    absl::MutexLock lock(&mu_);
    number = ++number_;
    live_ = context_owner;
  }
  std::optional<HelloState> state = slots_->BeginSession(number);
  if (!state) {  // leaving
    absl::MutexLock lock(&mu_);
    live_ = nullptr;
    return false;
  }
  ChannelOptions channel_options = options_.master;
  channel_options.address = address;
  if (state->lease.count() > 0) {
    channel_options.keepalive_ms = WorkerKeepaliveMs(state->lease.count());
  }
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(channel_options);
  if (!channel.ok()) {  // checked in Start: the files went away since
    *status = grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                           std::string(channel.status().message()));
    Ended(false, *status);
    return false;
  }
  auto stub = v1::WorkerService::NewStub(*channel);
  auto stream = stub->Connect(&context);
  {
    absl::MutexLock lock(&mu_);
    stream_ = stream.get();
  }
  v1::MasterMessage in;
  const bool answered = stream->Write(MakeHello(*state)) && stream->Read(&in);
  if (!answered || !in.has_welcome()) {
    if (answered) context.TryCancel();  // not a master we understand
    {
      absl::MutexLock lock(&mu_);
      stream_ = nullptr;
    }
    *status = stream->Finish();
    *serving_at = ServingMaster(context);
    Ended(false, *status);
    return false;
  }
  if (std::optional<std::string> lost_state = slots_->Welcomed(FromProto(in.welcome()))) {
    log_->warn("{}", *lost_state);
  }
  if (identity_.on_partitions) identity_.on_partitions(std::max(1, in.welcome().partitions()));
  log_->info("connected to master {} (epoch {}{})", address, in.welcome().master_epoch(),
             in.welcome().partitions() > 1 ? absl::StrCat(", partition ", identity_.partition)
                                           : std::string());
  connected_.store(true, std::memory_order_relaxed);
  connections_.fetch_add(1, std::memory_order_relaxed);
  std::thread sender([this, s = stream.get()] { SendLoop(s); });
  bool master_stopping = false;
  do {
    slots_->Received(FromProto(in));
    if (in.shutting_down()) {
      master_stopping = true;
      break;
    }
  } while (stream->Read(&in));
  slots_->CloseSession();
  context.TryCancel();  // unblocks the writers if they wait on flow control
  sender.join();
  slots_->AwaitNotSending();
  {
    absl::MutexLock lock(&mu_);
    stream_ = nullptr;
  }
  *status = stream->Finish();
  if (master_stopping) *status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "master stopping");
  Ended(master_stopping, *status);
  return true;
}

void Session::Ended(bool master_stopping, const grpc::Status& status) {
  connected_.store(false, std::memory_order_relaxed);
  const std::vector<std::string> given_up =
      slots_->SessionEnded(master_stopping, status.error_message());
  {
    absl::MutexLock lock(&mu_);
    live_ = nullptr;
  }
  for (const std::string& line : given_up) log_->error("{}", line);
}

void Session::SendLoop(Stream* stream) {
  while (std::optional<ToMaster> out = slots_->NextToSend()) {
    const bool more = out->empty() || Write(stream, std::move(*out));
    slots_->Sent();
    if (!more) return;
  }
}

bool Session::Write(Stream* stream, ToMaster out) {
  const bool bye = out.bye;
  if (!stream->Write(ToProto(std::move(out)))) return false;
  if (!bye) return true;
  stream->WritesDone();
  return false;
}

void Session::WriteNow(ToMaster out) {
  Stream* stream;
  {
    absl::MutexLock lock(&mu_);
    stream = stream_;
  }
  // A failed write is the reader's to see: the stream ends, and the results go again on the next.
  if (stream && !out.empty()) Write(stream, std::move(out));
  slots_->Sent();
}

void Session::WatchdogLoop() {
  while (true) {
    std::this_thread::sleep_for(kWatchdogPeriod);
    const std::optional<WatchReport> report = slots_->Watch();
    if (!report) return;
    if (report->cut_session != 0) {
      log_->warn("master {}: {}; reconnecting on a fresh connection", masters_.current(),
                 report->why);
      CancelSession(report->cut_session);
    }
    for (const TaskRef& ref : report->stuck) {
      log_->warn(
          "task {} attempt {}: the handler is past its deadline and did not stop; "
          "reported timed out, its thread stays busy until it returns",
          ref.task_id, ref.attempt);
    }
    if (report->stopped + report->dropped > 0) {
      log_->warn(
          "no heartbeat answered by the master for {} ms: stopped {} running and dropped {} "
          "queued tasks before their leases lapse there (the master hands them to others)",
          report->lease.count(), report->stopped, report->dropped);
    }
  }
}

}  // namespace taskmaster::worker
