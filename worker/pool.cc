// The pool's threads, and how a handler's return becomes the result the master records.
#include "worker/pool.h"

#include "absl/strings/str_cat.h"
#include "common/util.h"

namespace taskmaster::worker {

Result RunTask(const Registry& registry, const RunOptions& options, const Task& task,
               const std::shared_ptr<const std::atomic<bool>>& cancelled, ProgressSink progress) {
  Result r;
  r.task_id = task.task_id;
  r.attempt = task.attempt;
  r.outcome = Outcome::kFailed;
  const Handler* handler = registry.Find(task.kind);
  if (!handler) {
    r.error = absl::StrCat("worker ", options.worker_name, " does not run kind '", task.kind, "'");
    return r;
  }
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = task.timeout_ms > 0 ? start + std::chrono::milliseconds(task.timeout_ms)
                                            : std::chrono::steady_clock::time_point::max();
  TaskContext context(task.task_id, task.attempt, task.payload, deadline, cancelled,
                      std::move(progress));
  absl::StatusOr<std::string> output;
  try {
    output = (*handler)(context);
  } catch (const std::exception& e) {
    output = absl::InternalError(absl::StrCat("handler threw: ", e.what()));
  }
  if (cancelled->load()) {
    r.outcome = Outcome::kCancelled;
    r.error = "cancelled while running";
  } else if (std::chrono::steady_clock::now() >= deadline) {
    r.error = absl::StrCat("timed out after ", task.timeout_ms, " ms");
  } else if (output.ok() && output->size() > options.max_output) {
    // It could never reach the master: a result the stream cannot carry would be refused, and
    // resent, forever.
    r.error = absl::StrCat("output of ", output->size(), " bytes is over the ", options.max_output,
                           " a result may carry (--max-message-bytes)");
    r.permanent = true;
  } else if (output.ok()) {
    r.outcome = Outcome::kSucceeded;
    r.output = std::move(*output);
  } else {
    // A text field: the master cannot even parse a message whose text is not UTF-8, so an error
    // carrying outside bytes would stop this worker's stream for good.
    const absl::string_view message = output.status().message();
    r.error = ValidUtf8(std::string_view(message.data(), message.size()), kMaxErrorBytes);
    r.permanent = absl::IsInvalidArgument(output.status());
  }
  return r;
}

void Pool::Start(int threads) {
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Loop(); });
}

void Pool::Join() {
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

void Feed::Add(Source source) {
  absl::MutexLock lock(&mu_);
  sources_.push_back(std::move(source));
  ++signals_;
}

void Feed::Notify() {
  absl::MutexLock lock(&mu_);
  ++signals_;
}

std::optional<Feed::Next> Feed::Wait() {
  // Far longer than a task takes to queue; only a guard, as every queueing notifies.
  constexpr absl::Duration kLookAgain = absl::Milliseconds(100);
  while (true) {
    std::vector<const Source*> sources;
    uint64_t seen;
    size_t start;
    {
      absl::MutexLock lock(&mu_);
      seen = signals_;
      start = next_++;
      for (const Source& s : sources_) sources.push_back(&s);
    }
    bool stopped = !sources.empty();
    for (size_t i = 0; i < sources.size(); ++i) {
      const Source* s = sources[(start + i) % sources.size()];
      if (std::optional<Assignment> a = s->slots->TryNextTask()) return Next{std::move(*a), s};
      stopped = stopped && s->slots->Stopped();
    }
    if (stopped) return std::nullopt;
    absl::MutexLock lock(&mu_);
    auto signalled = [this, seen]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return signals_ != seen; };
    mu_.AwaitWithTimeout(absl::Condition(&signalled), kLookAgain);
  }
}

void Pool::Loop() {
  while (std::optional<Feed::Next> next = feed_->Wait()) {
    Slots* const slots = next->source->slots;
    const Assignment& a = next->assignment;
    log_->debug("starting task {} attempt {} ({})", a.task.task_id, a.task.attempt, a.task.kind);
    const auto start = std::chrono::steady_clock::now();
    metrics_->Started();
    Result result = RunTask(*registry_, options_, a.task, a.cancelled,
                            [slots, id = a.task.task_id, delivery = a.delivery](Progress p) {
                              slots->ReportProgress(id, delivery, std::move(p));
                            });
    const auto took = std::chrono::steady_clock::now() - start;
    metrics_->Ended(a.task.kind, result.outcome, took);
    log_->debug("task {} attempt {} ({}): {}", a.task.task_id, a.task.attempt, a.task.kind,
                OutcomeName(result.outcome));
    const WriteNow& write_now = next->source->write_now;
    std::optional<ToMaster> out =
        slots->Finish(a.delivery, std::move(result), took, write_now != nullptr);
    if (out) write_now(std::move(*out));
  }
}

}  // namespace taskmaster::worker
