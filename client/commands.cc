#include "client/commands.h"

#include <charconv>
#include <cmath>
#include <deque>
#include <iomanip>
#include <iostream>
#include <optional>
#include <set>
#include <thread>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/util.h"
#include "nlohmann/json.hpp"

namespace taskmaster {
namespace {

using nlohmann::json;

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

absl::StatusOr<uint64_t> ParseTaskId(const std::string& id) {
  uint64_t task_id = 0;
  const auto [end, ec] = std::from_chars(id.data(), id.data() + id.size(), task_id);
  if (id.empty() || ec != std::errc() || end != id.data() + id.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", id, "' is neither a task id (a number) nor a job id (job-...)"));
  }
  return task_id;
}

std::string StateName(v1::TaskState state) {
  return state == v1::TASK_STATE_UNSPECIFIED ? "EXPIRED" : v1::TaskState_Name(state);
}

// `wait` results come without payloads (status shows them).
json ProgressJson(const v1::TaskProgress& p) {
  return {{"task_id", p.task_id()}, {"attempt", p.attempt()}, {"done", p.done()},
          {"total", p.total()},     {"message", p.message()}, {"updated_ms", p.updated_ms()}};
}

// "40/100 (40%) resizing", or "40 resizing" when the total is unknown.
std::string ProgressText(const v1::TaskProgress& p) {
  std::string text =
      p.total() > 0 ? absl::StrCat(p.done(), "/", p.total(), " (", 100 * p.done() / p.total(), "%)")
                    : absl::StrCat(p.done());
  if (!p.message().empty()) absl::StrAppend(&text, " ", Printable(p.message()));
  return text;
}

json TaskJson(const v1::TaskInfo& t, bool with_payload = true) {
  json j = {{"id", t.id()},
            {"job_id", t.job_id()},
            {"queue", t.queue()},
            {"kind", t.kind()},
            {"state", StateName(t.state())},
            {"attempts", t.attempts()},
            {"max_attempts", t.max_attempts()},
            {"priority", t.priority()},
            {"output", t.output()},
            {"error", t.error()},
            {"worker", t.worker()},
            {"created_ms", t.created_ms()},
            {"finished_ms", t.finished_ms()}};
  if (with_payload) j["payload"] = t.payload();
  if (!t.waiting_for().empty()) j["waiting_for"] = t.waiting_for();
  if (t.not_before_ms() > 0) j["not_before_ms"] = t.not_before_ms();
  if (t.has_progress()) j["progress"] = ProgressJson(t.progress());
  return j;
}

json JobJson(const v1::JobInfo& j) {
  json running = json::array();
  for (const v1::TaskProgress& p : j.running()) running.push_back(ProgressJson(p));
  return {{"job_id", j.job_id()},         {"total", j.total()}, {"done", j.done()},
          {"succeeded", j.succeeded()},   {"dead", j.dead()},   {"cancelled", j.cancelled()},
          {"created_ms", j.created_ms()}, {"open", j.open()},   {"running", running}};
}

json WorkerJson(const v1::WorkerInfo& w) {
  return {{"worker_id", w.worker_id()},
          {"name", w.name()},
          {"host", w.host()},
          {"kinds", std::vector<std::string>(w.kinds().begin(), w.kinds().end())},
          {"queues", std::vector<std::string>(w.queues().begin(), w.queues().end())},
          {"labels", std::map<std::string, std::string>(w.labels().begin(), w.labels().end())},
          {"slots", w.slots()},
          {"running", w.running()},
          {"stuck", w.stuck()},
          {"connected", w.connected()},
          {"draining", w.draining()},
          {"heartbeat_age_ms", w.heartbeat_age_ms()},
          {"silent", w.silent()}};
}

json WorkersJson(const google::protobuf::RepeatedPtrField<v1::WorkerInfo>& workers) {
  json list = json::array();
  for (const v1::WorkerInfo& w : workers) list.push_back(WorkerJson(w));
  return list;
}

// One line per finished task, as the seed's result.get() printed them.
std::string ResultLine(const v1::TaskInfo& t) {
  // What came from workers reaches a terminal: printable (--format json has it exactly).
  if (t.state() == v1::SUCCEEDED) return Printable(t.output());
  return absl::StrCat("task ", t.id(), " ", StateName(t.state()), ": ", Printable(t.error()));
}

// The job's bar, and the latest progress one of its running tasks reported (`running`).
void DrawProgress(const Console& console, int64_t done, int64_t total, const std::string& running) {
  constexpr int kWidth = 30;
  // Keeps the line within a common terminal's width: a wrapped line cannot be redrawn with \r.
  constexpr size_t kRunningShown = 40;
  const int filled = total > 0 ? static_cast<int>(kWidth * done / total) : kWidth;
  console.err << "\r\033[K[" << std::string(filled, '#') << std::string(kWidth - filled, '.')
              << "] " << done << "/" << total;
  if (!running.empty()) console.err << "  " << running.substr(0, kRunningShown);
  console.err << std::flush;
}

void PrintWorkersTable(const Console& console,
                       const google::protobuf::RepeatedPtrField<v1::WorkerInfo>& workers) {
  console.out << std::left << std::setw(24) << "WORKER" << std::setw(20) << "HOST" << std::setw(8)
              << "SLOTS" << std::setw(8) << "RUNNING" << std::setw(6) << "STUCK" << std::setw(14)
              << "STATE" << std::setw(7) << "HEARD"
              << "KINDS\n";
  for (const v1::WorkerInfo& w : workers) {
    std::string kinds;
    for (const auto& k : w.kinds()) absl::StrAppend(&kinds, kinds.empty() ? "" : ",", k);
    console.out << std::left << std::setw(24) << Printable(w.name()) << std::setw(20)
                << Printable(w.host()) << std::setw(8) << w.slots() << std::setw(8) << w.running()
                << std::setw(6) << w.stuck() << std::setw(14) << WorkerState(w) << std::setw(7)
                << absl::StrCat(w.heartbeat_age_ms() / 1000, "s") << kinds << "\n";
  }
}

}  // namespace

int Fail(const Console& console, const absl::Status& status) {
  console.err << "taskctl: " << Printable(std::string(status.message())) << "\n";
  return kExitError;
}

// "silent": connected, but the master heard no heartbeat for three intervals (or its lease
// timeout), so likely cut off; it takes the worker's tasks back at the lease timeout.
std::string WorkerState(const v1::WorkerInfo& w) {
  if (!w.connected()) return "disconnected";
  if (w.silent()) return "silent";
  return w.draining() ? "draining" : "connected";
}

absl::StatusOr<int64_t> ParseDurationMs(const std::string& text) {
  std::string_view s = Trim(text);
  size_t unit_at = s.size();
  while (unit_at > 0 && std::isalpha(static_cast<unsigned char>(s[unit_at - 1]))) --unit_at;
  const std::string_view unit = s.substr(unit_at);
  const std::string number(s.substr(0, unit_at));
  double value = 0;
  const auto [end, ec] = std::from_chars(number.data(), number.data() + number.size(), value);
  double scale = 0;
  if (unit == "ms") scale = 1;
  if (unit == "s" || unit.empty()) scale = 1000;
  if (unit == "m") scale = 60'000;
  if (unit == "h") scale = 3'600'000;
  // Beyond 2^63 ms (and for infinities and NaN), llround's result is unspecified.
  const double ms = value * scale;
  if (number.empty() || ec != std::errc() || end != number.data() + number.size() || scale == 0 ||
      value < 0 || !(ms < 0x1p63)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", text, "' is not a duration (a number with ms, s, m or h; seconds by default)"));
  }
  return static_cast<int64_t>(std::llround(ms));
}

namespace {

// Submit's input, read on a thread of its own: a batch can then go out on a timer while the
// input is slow, so its tasks run before the rest has arrived. Holds at most `max_queued`
// payloads; the reader waits for room.
class PayloadQueue {
 public:
  PayloadQueue(std::function<bool(std::string*)> next, size_t max_queued)
      : shared_(std::make_shared<Shared>()) {
    reader_ = std::thread([shared = shared_, next = std::move(next), max_queued] {
      Read(*shared, next, max_queued);
    });
  }

  // Stops the reader. One blocked in its input (submit gave up while a producer is still
  // writing) is left to end with the process; it owns what it touches.
  ~PayloadQueue() {
    Shared& s = *shared_;
    bool idle;
    {
      absl::MutexLock lock(&s.mu);
      s.stop = true;
      // A read from a file returns soon: wait for it rather than leave it reading.
      auto out_of_input = [&s]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) { return !s.reading; };
      idle = s.mu.AwaitWithTimeout(absl::Condition(&out_of_input), absl::Seconds(1));
    }
    if (idle) {
      reader_.join();
    } else {
      reader_.detach();
    }
  }

  enum class Got { kPayload, kTimeout, kEnd };
  // The next payload, waiting until `deadline` at most.
  Got Next(std::string* payload, absl::Time deadline) {
    Shared& s = *shared_;
    absl::MutexLock lock(&s.mu);
    auto ready = [&s]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) { return !s.queue.empty() || s.ended; };
    if (!s.mu.AwaitWithDeadline(absl::Condition(&ready), deadline)) return Got::kTimeout;
    if (s.queue.empty()) return Got::kEnd;
    *payload = std::move(s.queue.front());
    s.queue.pop_front();
    return Got::kPayload;
  }

 private:
  struct Shared {
    absl::Mutex mu;
    std::deque<std::string> queue ABSL_GUARDED_BY(mu);
    bool ended ABSL_GUARDED_BY(mu) = false;    // the input has no more
    bool stop ABSL_GUARDED_BY(mu) = false;     // nobody reads the queue any more
    bool reading ABSL_GUARDED_BY(mu) = false;  // the reader is inside `next`
  };

  static void Read(Shared& s, const std::function<bool(std::string*)>& next, size_t max_queued) {
    auto room = [&s, max_queued]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
      return s.stop || s.queue.size() < max_queued;
    };
    std::string payload;
    s.mu.Lock();
    while (!s.stop) {
      s.reading = true;
      s.mu.Unlock();
      const bool got = next(&payload);
      s.mu.Lock();
      s.reading = false;
      if (!got) break;
      s.mu.Await(absl::Condition(&room));
      s.queue.push_back(std::move(payload));
    }
    s.ended = true;
    s.mu.Unlock();
  }

  std::shared_ptr<Shared> shared_;
  std::thread reader_;
};

// Submit's input as requests: a batch closes at --batch-size payloads, at batch_bytes, or
// batch_wait after its first payload, whichever comes first.
class BatchReader {
 public:
  BatchReader(const SubmitArgs& args, std::map<std::string, std::string> labels)
      : args_(args), labels_(std::move(labels)) {
    if (args.input_may_block) input_.emplace(args.next_payload, 2 * args.batch_size);
  }

  // The next batch, and whether the input ended with it.
  std::pair<v1::SubmitRequest, bool> Next(absl::Duration wait) {
    v1::SubmitRequest request;
    size_t bytes = 0;
    absl::Time deadline = absl::InfiniteFuture();
    std::string payload;
    while (static_cast<size_t>(request.tasks_size()) < args_.batch_size &&
           bytes < args_.batch_bytes) {
      switch (Take(&payload, deadline)) {
        case PayloadQueue::Got::kEnd:
          return {std::move(request), true};
        case PayloadQueue::Got::kTimeout:
          return {std::move(request), false};
        case PayloadQueue::Got::kPayload:
          break;
      }
      if (request.tasks_size() == 0) deadline = absl::Now() + wait;
      bytes += payload.size();
      v1::TaskSpec* t = request.add_tasks();
      t->set_queue(args_.queue);
      t->set_kind(args_.kind);
      t->set_payload(std::move(payload));
      t->set_priority(args_.priority);
      t->set_delay_ms(args_.delay_ms);
      t->set_timeout_ms(args_.timeout_ms);
      t->set_max_attempts(args_.max_attempts);
      if (!args_.key.empty()) t->set_idempotency_key(absl::StrCat(args_.key, "/", index_));
      t->mutable_labels()->insert(labels_.begin(), labels_.end());
      ++index_;
    }
    return {std::move(request), false};
  }

  // Whether the input ends here (waits for the next payload or the end).
  bool AtEnd() {
    std::string payload;
    return Take(&payload, absl::InfiniteFuture()) == PayloadQueue::Got::kEnd;
  }

 private:
  // An input that answers at once is read here: a hand-off per payload to a reader thread costs
  // more than the read (taskctl's CPU per 200,000 lines: see the README's Performance section).
  PayloadQueue::Got Take(std::string* payload, absl::Time deadline) {
    if (input_) return input_->Next(payload, deadline);
    return args_.next_payload(payload) ? PayloadQueue::Got::kPayload : PayloadQueue::Got::kEnd;
  }

  const SubmitArgs& args_;
  const std::map<std::string, std::string> labels_;
  std::optional<PayloadQueue> input_;  // the reader of an input that may block
  size_t index_ = 0;                   // of the next payload in the whole input
};

// Adds a batch to an open job. A lost answer, a master restarting, or a queue or tenant limit
// (which clears as workers catch up) is retried with the same batch number, which the master
// applies once, until `give_up_after`; other refusals are final.
absl::StatusOr<v1::SubmitResponse> Append(const Client& client, const v1::SubmitRequest& request,
                                          std::chrono::milliseconds give_up_after,
                                          const Console& console) {
  Backoff backoff(std::chrono::milliseconds(100), std::chrono::milliseconds(2'000));
  const auto deadline = std::chrono::steady_clock::now() + give_up_after;
  bool told = false;
  while (true) {
    absl::StatusOr<v1::SubmitResponse> response = client.Submit(request);
    if (response.ok()) return response;
    const absl::Status& s = response.status();
    const bool transient = absl::IsUnavailable(s) || absl::IsAborted(s) ||
                           absl::IsDeadlineExceeded(s) || absl::IsResourceExhausted(s);
    if (!transient || std::chrono::steady_clock::now() >= deadline) return s;
    if (absl::IsResourceExhausted(s) && !told) {
      console.err << "taskctl: waiting: " << s.message() << "\n";
      told = true;
    }
    std::this_thread::sleep_for(backoff.Next());
  }
}

// Each warning once: every batch of a job may bring the same one.
void PrintWarnings(const v1::SubmitResponse& response, std::set<std::string>& printed,
                   const Console& console) {
  for (const std::string& warning : response.warnings()) {
    if (printed.insert(warning).second) console.err << "taskctl: warning: " << warning << "\n";
  }
}

}  // namespace

int RunSubmit(const Client& client, const SubmitArgs& args, const Console& console) {
  absl::StatusOr<std::map<std::string, std::string>> labels = ParseLabels(args.labels);
  if (!labels.ok()) return Fail(console, labels.status());
  BatchReader reader(args, std::move(*labels));
  // Keyed tasks are resubmitted as a whole: they must fit one call, read entire.
  const bool keyed = !args.key.empty();
  auto [batch, ended] =
      reader.Next(keyed ? absl::InfiniteDuration() : absl::FromChrono(args.batch_wait));
  if (batch.tasks_size() == 0) {
    return Fail(console, absl::InvalidArgumentError("no payloads to submit"));
  }
  if (keyed && !ended && !reader.AtEnd()) {
    return Fail(console, absl::InvalidArgumentError(absl::StrCat(
                             "--key covers at most --batch-size (", args.batch_size,
                             ") payloads: a job of several calls cannot be resubmitted by key")));
  }
  ended = ended || keyed;
  // A lone task takes the key as it is; several take key/0, key/1 ...
  if (ended && batch.tasks_size() == 1 && keyed) {
    batch.mutable_tasks(0)->set_idempotency_key(args.key);
  }
  batch.set_keep_open(!ended);
  absl::StatusOr<v1::SubmitResponse> response = client.Submit(batch);
  if (!response.ok()) return Fail(console, response.status());
  std::set<std::string> warned;
  PrintWarnings(*response, warned, console);
  const std::string job_id = response->job_id();
  if (console.format == OutputFormat::kJson) {
    nlohmann::json out = {{"job_id", job_id},
                          {"warnings", std::vector<std::string>(response->warnings().begin(),
                                                                response->warnings().end())}};
    // The ids of a job of one call; a job of several has as many as its input, maybe millions.
    if (ended) {
      out["task_ids"] =
          std::vector<uint64_t>(response->task_ids().begin(), response->task_ids().end());
    }
    console.out << Dump(out) << "\n";
  } else {
    console.out << job_id << "\n";
  }
  console.out.flush();
  // Results are followed while the rest of the input goes in.
  int waited = kExitOk;
  std::thread follower;
  if (args.wait) follower = std::thread([&] { waited = RunWait(client, job_id, console); });
  absl::Status appended;
  int64_t number = 0;
  int64_t submitted = batch.tasks_size();
  while (!ended) {
    std::tie(batch, ended) = reader.Next(absl::FromChrono(args.batch_wait));
    if (batch.tasks_size() == 0 && !ended) continue;  // nothing came within the wait
    batch.set_job_id(job_id);
    batch.set_batch(++number);
    batch.set_keep_open(!ended);
    const int size = batch.tasks_size();
    absl::StatusOr<v1::SubmitResponse> added =
        Append(client, batch, client.options().reconnect_timeout, console);
    if (!added.ok()) {
      appended = added.status();
      break;
    }
    PrintWarnings(*added, warned, console);
    submitted += size;
  }
  if (!appended.ok()) {
    // Closed as it is, so that it completes and its followers end. The failed batch may have
    // been stored all the same (its answer lost): then its number is taken, and the next closes.
    v1::SubmitRequest close;
    close.set_job_id(job_id);
    for (int64_t n : {number, number + 1}) {
      close.set_batch(n);
      absl::StatusOr<v1::SubmitResponse> closed =
          Append(client, close, client.options().reconnect_timeout, console);
      if (!closed.ok() || !closed->duplicate()) break;
    }
  }
  if (follower.joinable()) follower.join();
  if (!appended.ok()) {
    return Fail(console, absl::Status(appended.code(),
                                      absl::StrCat("job ", job_id, " holds the first ", submitted,
                                                   " tasks of the input (or a batch more); the "
                                                   "rest were not submitted: ",
                                                   appended.message())));
  }
  return waited;
}

int RunWait(const Client& client, const std::string& job_id, const Console& console) {
  absl::Mutex mu;  // the terminal and what it shows, between the results and the poller
  v1::JobInfo last;
  std::string running;  // guarded by mu
  // On a terminal, running tasks' progress too: results come on the stream, progress does not,
  // so a poller asks for it now and then.
  absl::Notification finished;
  std::thread poller;
  if (console.progress) {
    poller = std::thread([&] {
      while (!finished.WaitForNotificationWithTimeout(absl::Seconds(1))) {
        absl::StatusOr<v1::JobInfo> job = client.GetJob(job_id);
        if (!job.ok()) continue;
        absl::MutexLock lock(&mu);
        running = job->running().empty() ? ""
                                         : absl::StrCat("task ", job->running(0).task_id(), ": ",
                                                        ProgressText(job->running(0)));
        DrawProgress(console, last.done(), last.total(), running);
      }
    });
  }
  absl::Status status = client.WatchJob(job_id, [&](const v1::JobEvent& event) {
    absl::MutexLock lock(&mu);
    if (console.progress) console.err << "\r\033[K" << std::flush;
    // An event's lines go out in one write.
    std::string lines;
    for (const v1::TaskInfo& t : event.results()) {
      absl::StrAppend(
          &lines, console.format == OutputFormat::kJson ? Dump(TaskJson(t, false)) : ResultLine(t),
          "\n");
    }
    console.out << lines << std::flush;
    last = event.progress();
    if (console.progress) DrawProgress(console, last.done(), last.total(), running);
  });
  finished.Notify();
  if (poller.joinable()) poller.join();
  if (console.progress) console.err << "\r\033[K" << std::flush;
  if (!status.ok()) return Fail(console, status);
  if (console.progress) {
    console.err << last.done() << "/" << last.total() << " done: " << last.succeeded()
                << " succeeded, " << last.dead() << " dead, " << last.cancelled() << " cancelled\n";
  }
  return last.succeeded() == last.total() ? kExitOk : kExitTaskFailed;
}

int RunStatus(const Client& client, const std::string& id, const Console& console) {
  if (id.rfind("job-", 0) == 0) {
    absl::StatusOr<v1::JobInfo> job = client.GetJob(id);
    if (!job.ok()) return Fail(console, job.status());
    if (console.format == OutputFormat::kJson) {
      console.out << Dump(JobJson(*job)) << "\n";
    } else {
      console.out << "job:       " << job->job_id() << (job->open() ? " (open)" : "") << "\n"
                  << "total:     " << job->total() << "\n"
                  << "done:      " << job->done() << "\n"
                  << "succeeded: " << job->succeeded() << "\n"
                  << "dead:      " << job->dead() << "\n"
                  << "cancelled: " << job->cancelled() << "\n";
      for (const v1::TaskProgress& p : job->running()) {
        console.out << "running:   task " << p.task_id() << ": " << ProgressText(p) << "\n";
      }
    }
    return kExitOk;
  }
  absl::StatusOr<uint64_t> task_id = ParseTaskId(id);
  if (!task_id.ok()) return Fail(console, task_id.status());
  absl::StatusOr<v1::TaskInfo> task = client.GetTask(*task_id);
  if (!task.ok()) return Fail(console, task.status());
  if (console.format == OutputFormat::kJson) {
    console.out << Dump(TaskJson(*task)) << "\n";
    return kExitOk;
  }
  console.out << "task:     " << task->id() << "\n"
              << "job:      " << task->job_id() << "\n"
              << "queue:    " << task->queue() << "\n"
              << "kind:     " << task->kind() << "\n"
              << "state:    " << StateName(task->state()) << "\n"
              << "attempts: " << task->attempts() << "/" << task->max_attempts() << "\n";
  if (!task->worker().empty()) console.out << "worker:   " << Printable(task->worker()) << "\n";
  if (!task->waiting_for().empty()) console.out << "waiting:  " << task->waiting_for() << "\n";
  if (task->has_progress()) console.out << "progress: " << ProgressText(task->progress()) << "\n";
  if (task->state() == v1::SUCCEEDED) {
    console.out << "output:   " << Printable(task->output()) << "\n";
  }
  if (!task->error().empty()) console.out << "error:    " << Printable(task->error()) << "\n";
  return kExitOk;
}

int RunCancel(const Client& client, const std::string& id, const Console& console) {
  absl::StatusOr<int64_t> cancelled;
  if (id.rfind("job-", 0) == 0) {
    cancelled = client.CancelJob(id);
  } else {
    absl::StatusOr<uint64_t> task_id = ParseTaskId(id);
    if (!task_id.ok()) return Fail(console, task_id.status());
    cancelled = client.CancelTask(*task_id);
  }
  if (!cancelled.ok()) return Fail(console, cancelled.status());
  if (console.format == OutputFormat::kJson) {
    console.out << Dump({{"cancelled", *cancelled}}) << "\n";
  } else {
    console.out << "cancelled " << *cancelled << " task" << (*cancelled == 1 ? "" : "s") << "\n";
  }
  return kExitOk;
}

int RunHealth(const Client& client, const Console& console) {
  absl::StatusOr<bool> serving = client.Serving();
  if (!serving.ok()) return Fail(console, serving.status());
  const char* status = *serving ? "SERVING" : "NOT_SERVING";
  if (console.format == OutputFormat::kJson) {
    console.out << Dump({{"status", status}}) << "\n";
  } else {
    console.out << status << "\n";
  }
  return *serving ? kExitOk : kExitNotServing;
}

namespace {

// An answer over partitions some of which no master reached serves (one is being taken over, or
// could not be asked) is printed, with a warning of what it leaves out.
template <typename Response>
void WarnUncounted(const Console& console, const Response& response) {
  if (response.partition_count() <= 1 || response.partitions_size() >= response.partition_count()) {
    return;
  }
  console.err << "taskctl: warning: this counts " << response.partitions_size() << " of the "
              << response.partition_count() << " partitions of the queues";
  if (response.other_masters_size() > 0) {
    console.err << "; could not ask " << absl::StrJoin(response.other_masters(), ", ");
  } else {
    console.err << "; no master reached serves the others now (one may be taking them over)";
  }
  console.err << "\n";
}

}  // namespace

int RunStats(const Client& client, const Console& console) {
  absl::StatusOr<v1::StatsResponse> stats = client.Stats();
  if (!stats.ok()) return Fail(console, stats.status());
  WarnUncounted(console, *stats);
  if (console.format == OutputFormat::kJson) {
    json queues = json::array();
    for (const v1::QueueStats& q : stats->queues()) {
      queues.push_back({{"queue", q.queue()},
                        {"pending", q.pending()},
                        {"delayed", q.delayed()},
                        {"leased", q.leased()},
                        {"oldest_ready_age_ms", q.oldest_ready_age_ms()},
                        {"submitted", q.submitted()},
                        {"succeeded", q.succeeded()},
                        {"failed", q.failed()},
                        {"retried", q.retried()},
                        {"redelivered", q.redelivered()},
                        {"dead", q.dead()},
                        {"cancelled", q.cancelled()}});
    }
    console.out << Dump({{"queues", queues},
                         {"workers", WorkersJson(stats->workers())},
                         {"duplicate_results", stats->duplicate_results()}})
                << "\n";
    return kExitOk;
  }
  console.out << std::left << std::setw(20) << "QUEUE" << std::right << std::setw(10) << "PENDING"
              << std::setw(10) << "LEASED" << std::setw(12) << "SUCCEEDED" << std::setw(10)
              << "FAILED" << std::setw(10) << "DEAD" << std::setw(11) << "CANCELLED"
              << "\n";
  for (const v1::QueueStats& q : stats->queues()) {
    console.out << std::left << std::setw(20) << q.queue() << std::right << std::setw(10)
                << q.pending() << std::setw(10) << q.leased() << std::setw(12) << q.succeeded()
                << std::setw(10) << q.failed() << std::setw(10) << q.dead() << std::setw(11)
                << q.cancelled() << "\n";
  }
  console.out << "duplicate results dropped: " << stats->duplicate_results() << "\n\n";
  PrintWorkersTable(console, stats->workers());
  return kExitOk;
}

int RunWorkers(const Client& client, const Console& console) {
  absl::StatusOr<v1::WorkersResponse> workers = client.Workers();
  if (!workers.ok()) return Fail(console, workers.status());
  WarnUncounted(console, *workers);
  if (console.format == OutputFormat::kJson) {
    console.out << Dump(WorkersJson(workers->workers())) << "\n";
    return kExitOk;
  }
  PrintWorkersTable(console, workers->workers());
  return kExitOk;
}

}  // namespace taskmaster
