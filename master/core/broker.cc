// Broker's public calls, each forwarded to Broker::Impl, and the locked Section every operation
// runs in.
#include "master/core/broker.h"

#include <utility>

#include "common/partition.h"
#include "master/core/broker_impl.h"

namespace taskmaster {

Broker::Impl::Impl(BrokerOptions options, const Clock* clock, Store* store,
                   std::shared_ptr<spdlog::logger> log)
    : options_(options),
      clock_(clock),
      store_(store),
      log_(std::move(log)),
      epoch_(store->Epoch()),
      persistent_(store->persistent()),
      last_tick_ms_(clock->NowMs()) {
  absl::MutexLock lock(&mu_);
  next_id_ = FirstTaskIdOf(options_.partition);
}

Broker::Impl::Section::Section(Impl& b) : b_(b) {
  b.mu_.Lock();
  b.now_ms_ = b.clock_->NowMs();
}

Broker::Impl::Section::~Section() {
  b_.mu_.AssertHeld();
  b_.Collect(fx);
  b_.mu_.Unlock();
  for (auto& [level, line] : fx.logs) b_.log_->log(level, line);
  // Tasks first, to keep workers busy; then the clients waiting for results; acknowledgements
  // and echoes last, as nobody waits on them: each send or notification is a write on its own
  // stream, and a round trip waits for the ones before its own.
  for (auto& [channel, message] : fx.sends) {
    if (!message.tasks.empty()) channel->Send(std::move(message));
  }
  if (fx.finished_through > 0 && b_.persistent_) {
    b_.RevealWhenDurable(fx.finished_through, std::move(fx.reveal_jobs));
  }
  for (auto& watcher : fx.notify) watcher->OnJobChanged();
  for (auto& [channel, message] : fx.sends) {
    if (message.tasks.empty()) channel->Send(std::move(message));
  }
}

void Broker::Impl::CloseStore() {
  {
    absl::MutexLock lock(&mu_);
    closing_ = true;
  }
  store_->Close();
}

Broker::Broker(BrokerOptions options, const Clock* clock, Store* store,
               std::shared_ptr<spdlog::logger> log)
    : impl_(std::make_unique<Impl>(options, clock, store, std::move(log))) {}

// The store's callbacks into the broker all run before it is gone.
Broker::~Broker() { impl_->CloseStore(); }

std::string Broker::epoch() const { return impl_->epoch(); }

absl::Status Broker::Recover() { return impl_->Recover(); }

void Broker::WhenDurable(std::function<void(absl::Status)> done) {
  impl_->store()->Flush(std::move(done));
}

void Broker::Submit(const Caller& caller, std::vector<TaskSpec> specs,
                    std::function<void(absl::StatusOr<SubmitOutcome>)> done) {
  impl_->Submit(caller, SubmitTarget{}, std::move(specs), std::move(done));
}

void Broker::Submit(const Caller& caller, const SubmitTarget& target, std::vector<TaskSpec> specs,
                    std::function<void(absl::StatusOr<SubmitOutcome>)> done) {
  impl_->Submit(caller, target, std::move(specs), std::move(done));
}

absl::StatusOr<TaskView> Broker::GetTask(const Caller& caller, TaskId id) const {
  return impl_->GetTask(caller, id);
}

absl::StatusOr<JobView> Broker::GetJob(const Caller& caller, const std::string& job_id) const {
  return impl_->GetJob(caller, job_id);
}

absl::StatusOr<int64_t> Broker::CancelTask(const Caller& caller, TaskId id) {
  return impl_->CancelTask(caller, id);
}

absl::StatusOr<int64_t> Broker::CancelJob(const Caller& caller, const std::string& job_id) {
  return impl_->CancelJob(caller, job_id);
}

absl::StatusOr<JobEvents> Broker::ReadJob(const Caller& caller, const std::string& job_id,
                                          int64_t after, size_t max, size_t max_bytes) const {
  return impl_->ReadJob(caller, job_id, after, max, max_bytes);
}

absl::Status Broker::Watch(const Caller& caller, const std::string& job_id,
                           std::shared_ptr<JobWatcher> watcher) {
  return impl_->Watch(caller, job_id, std::move(watcher));
}

void Broker::Unwatch(const std::string& job_id, const JobWatcher* watcher) {
  impl_->Unwatch(job_id, watcher);
}

void Broker::SetTenantLimits(std::map<std::string, TenantLimits> limits) {
  impl_->SetTenantLimits(std::move(limits));
}

std::vector<QueueStatsView> Broker::QueueStats() const { return impl_->QueueStats(); }

std::vector<WorkerView> Broker::Workers() const { return impl_->Workers(); }

int64_t Broker::DuplicateResults() const { return impl_->DuplicateResults(); }

BrokerMetrics Broker::Metrics() const { return impl_->Metrics(); }

absl::StatusOr<Broker::WorkerHandle> Broker::Attach(WorkerHello hello,
                                                    std::shared_ptr<WorkerChannel> channel) {
  return impl_->Attach(std::move(hello), std::move(channel));
}

void Broker::AddCredits(const WorkerHandle& worker, int32_t credits, int64_t task_us) {
  impl_->AddCredits(worker, credits, task_us);
}

void Broker::Report(const WorkerHandle& worker, std::vector<TaskReport> reports, int32_t credits,
                    int64_t task_us) {
  impl_->Report(worker, std::move(reports), credits, task_us);
}

void Broker::Progress(const WorkerHandle& worker, std::vector<TaskProgress> reports) {
  impl_->Progress(worker, std::move(reports));
}

bool Broker::Heartbeat(const WorkerHandle& worker, int32_t stuck) {
  return impl_->Heartbeat(worker, stuck);
}

void Broker::Drain(const WorkerHandle& worker) { impl_->Drain(worker); }

void Broker::Detach(const WorkerHandle& worker, bool bye) { impl_->Detach(worker, bye); }

void Broker::Tick() { impl_->Tick(); }

void Broker::Shutdown() { impl_->Shutdown(); }

bool Broker::stopping() const { return impl_->stopping(); }

}  // namespace taskmaster
