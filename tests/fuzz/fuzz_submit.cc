// fuzz_submit: what a client's Submit reaches. The input is one SubmitRequest. It is translated
// as the service translates it (TakeSpecs), validated and enqueued by a Broker on the memory
// store, submitted a second time (its idempotency keys then come back), then read and cancelled
// through GetTask, GetJob, ReadJob, CancelTask and CancelJob, with the ids of the answers and
// with ids taken from the request's own fields, while the clock runs past delays and retention.
//
// Asserts: a refused batch leaves no task behind and answers with a client's status code, and
// the same batch is refused again the same way; an accepted batch has one id per task, a key
// repeated in it or resubmitted gives the same id, and each task reads back with its queue, kind
// and payload unchanged and with text a protobuf string field can carry; a delayed task is ready
// once its delay has passed; a cancelled job is finished and reads back one result per task; a
// job past retention is gone with its tasks.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/util.h"
#include "master/core/broker.h"
#include "master/rpc/translate.h"
#include "master/store/memory_store.h"
#include "tests/fuzz/fuzz_common.h"

namespace taskmaster::fuzz {
namespace {

// Clients of two tenants: the work is the owner's, and never the stranger's to see.
const Caller kOwner{"owner"};
const Caller kStranger{"stranger"};

// The clock moves at most this far at once: further would only skip the same ticks.
constexpr int64_t kMaxStepMs = 24 * 3600 * 1000;

BrokerOptions Options() {
  BrokerOptions o;
  // Small limits, so that inputs reach every one of them.
  o.max_payload_bytes = 512;
  o.max_batch = 16;
  o.max_queue_length = 24;
  o.max_task_classes = 6;
  // Longer than the delays the clock runs past, so that a task cancelled before them (by an id
  // taken from the request) is still there to read after them.
  o.result_retention_ms = 2 * kMaxStepMs;
  return o;
}

absl::StatusOr<SubmitOutcome> SubmitCopy(Broker& broker, const v1::SubmitRequest& request) {
  v1::SubmitRequest copy = request;  // TakeSpecs moves the strings out of what it is given
  std::optional<absl::StatusOr<SubmitOutcome>> answer;
  broker.Submit(kOwner, TakeSpecs(&copy),
                [&answer](absl::StatusOr<SubmitOutcome> outcome) { answer = std::move(outcome); });
  FUZZ_CHECK(answer.has_value());  // the memory store answers at once
  return *std::move(answer);
}

bool IsClientError(absl::StatusCode code) {
  return code == absl::StatusCode::kInvalidArgument ||
         code == absl::StatusCode::kResourceExhausted || code == absl::StatusCode::kAlreadyExists;
}

// Pending (and delayed) tasks over all queues; no counter may go negative.
int64_t Pending(const Broker& broker) {
  int64_t pending = 0;
  for (const QueueStatsView& q : broker.QueueStats()) {
    FUZZ_CHECK(q.pending >= 0 && q.leased >= 0 && q.succeeded >= 0 && q.failed >= 0 &&
               q.dead >= 0 && q.cancelled >= 0);
    pending += q.pending;
  }
  return pending;
}

// Every text a TaskInfo carries goes into a protobuf string field, which must be UTF-8: the
// client could not parse the answer otherwise.
void CheckText(const TaskView& v) {
  for (const std::string* s : {&v.job_id, &v.queue, &v.kind, &v.error, &v.worker, &v.waiting_for}) {
    FUZZ_CHECK(IsValidUtf8(*s));
  }
}

void CheckJob(const JobView& job) {
  FUZZ_CHECK(job.total >= 1);
  FUZZ_CHECK(job.done >= 0 && job.done <= job.total);
  FUZZ_CHECK(job.succeeded + job.dead + job.cancelled == job.done);
}

void CheckAccepted(const Broker& broker, const v1::SubmitRequest& request,
                   const SubmitOutcome& out) {
  FUZZ_CHECK(out.task_ids.size() == static_cast<size_t>(request.tasks_size()));
  std::map<std::string, TaskId> by_key;
  for (int i = 0; i < request.tasks_size(); ++i) {
    const v1::TaskSpec& spec = request.tasks(i);
    const TaskId id = out.task_ids[i];
    absl::StatusOr<TaskView> view = broker.GetTask(kOwner, id);
    FUZZ_CHECK(view.ok());
    FUZZ_CHECK(view->payload == spec.payload());
    FUZZ_CHECK(view->kind == spec.kind());
    FUZZ_CHECK(view->queue == (spec.queue().empty() ? "default" : spec.queue()));
    CheckText(*view);
    if (!spec.idempotency_key().empty()) {
      FUZZ_CHECK(by_key.emplace(spec.idempotency_key(), id).first->second == id);
    }
  }
  absl::StatusOr<JobView> job = broker.GetJob(kOwner, out.job_id);
  FUZZ_CHECK(job.ok());
  CheckJob(*job);
  const std::set<TaskId> distinct(out.task_ids.begin(), out.task_ids.end());
  FUZZ_CHECK(job->total == static_cast<int64_t>(distinct.size()));
}

// A lookup with an id from outside finds something or answers NOT_FOUND, nothing else.
template <typename T>
void CheckLookup(const absl::StatusOr<T>& found) {
  FUZZ_CHECK(found.ok() || absl::IsNotFound(found.status()));
}

void CheckReadJob(const Broker& broker, const std::string& job_id, int64_t after, size_t max,
                  size_t max_bytes) {
  absl::StatusOr<JobEvents> events = broker.ReadJob(kOwner, job_id, after, max, max_bytes);
  CheckLookup(events);
  if (!events.ok()) return;
  CheckJob(events->progress);
  FUZZ_CHECK(events->results.size() <= max);
  for (const TaskView& v : events->results) {
    FUZZ_CHECK(v.job_id == job_id || !v.kind.empty());  // a followed task keeps its own job
    FUZZ_CHECK(IsFinished(v.state) || v.kind.empty());
    CheckText(v);
  }
}

}  // namespace
}  // namespace taskmaster::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  taskmaster::fuzz::SilenceProtobufLogs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace taskmaster;
  using namespace taskmaster::fuzz;
  v1::SubmitRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  FakeClock clock;
  std::unique_ptr<Store> store = NewMemoryStore();
  Broker broker(Options(), &clock, store.get(), QuietLogger());

  const absl::StatusOr<SubmitOutcome> first = SubmitCopy(broker, request);
  if (first.ok()) {
    CheckAccepted(broker, request, *first);
  } else {
    FUZZ_CHECK(IsClientError(first.status().code()));
    FUZZ_CHECK(Pending(broker) == 0);
  }
  const absl::StatusOr<SubmitOutcome> second = SubmitCopy(broker, request);
  if (!first.ok()) {
    FUZZ_CHECK(!second.ok() && second.status().code() == first.status().code());
    FUZZ_CHECK(Pending(broker) == 0);
    return 0;
  }
  if (second.ok()) {
    CheckAccepted(broker, request, *second);
    for (int i = 0; i < request.tasks_size(); ++i) {
      if (!request.tasks(i).idempotency_key().empty()) {
        FUZZ_CHECK(second->task_ids[i] == first->task_ids[i]);
      }
    }
  } else {
    // Nothing changed but the queues' lengths: only their limit may refuse the same batch now.
    FUZZ_CHECK(absl::IsResourceExhausted(second.status()));
  }
  std::vector<std::string> jobs = {first->job_id};
  if (second.ok()) jobs.push_back(second->job_id);

  // Ids from the request's own fields: small numbers hit real tasks, others hit none.
  for (const v1::TaskSpec& spec : request.tasks()) {
    CheckLookup(broker.GetTask(kOwner, static_cast<TaskId>(spec.priority())));
    CheckLookup(broker.CancelTask(kOwner, static_cast<TaskId>(spec.max_attempts())));
    CheckLookup(broker.GetJob(kOwner, spec.idempotency_key()));
    CheckLookup(broker.CancelJob(kOwner, spec.kind()));
    CheckReadJob(broker, spec.queue(), 0, 10, 1 << 20);
    CheckReadJob(broker, first->job_id, spec.delay_ms(), static_cast<uint8_t>(spec.priority()),
                 static_cast<size_t>(spec.timeout_ms()));
  }

  // Every delay up to a day passes; a delayed task is ready (or was cancelled) after its own.
  int64_t passed = 0;
  for (const v1::TaskSpec& spec : request.tasks()) {
    const int64_t step = std::clamp<int64_t>(spec.delay_ms() - passed, 0, kMaxStepMs - passed);
    clock.Advance(step);
    passed += step;
    broker.Tick();
  }
  for (int i = 0; i < request.tasks_size(); ++i) {
    if (request.tasks(i).delay_ms() > passed) continue;
    absl::StatusOr<TaskView> view = broker.GetTask(kOwner, first->task_ids[i]);
    FUZZ_CHECK(view.ok());
    FUZZ_CHECK(absl::IsNotFound(broker.GetTask(kStranger, first->task_ids[i]).status()));
    FUZZ_CHECK(view->state == TaskState::kPending || view->state == TaskState::kCancelled);
  }

  for (const std::string& job_id : jobs) {
    FUZZ_CHECK(absl::IsNotFound(broker.GetJob(kStranger, job_id).status()));
    FUZZ_CHECK(absl::IsNotFound(broker.CancelJob(kStranger, job_id).status()));
    FUZZ_CHECK(broker.CancelJob(kOwner, job_id).ok());
    absl::StatusOr<JobView> job = broker.GetJob(kOwner, job_id);
    FUZZ_CHECK(job.ok());
    CheckJob(*job);
    FUZZ_CHECK(job->done == job->total);
    absl::StatusOr<JobEvents> all = broker.ReadJob(kOwner, job_id, 0, 1000, 1 << 30);
    FUZZ_CHECK(all.ok());
    FUZZ_CHECK(static_cast<int64_t>(all->results.size()) == job->total);
  }
  FUZZ_CHECK(Pending(broker) == 0);

  clock.Advance(Options().result_retention_ms);
  broker.Tick();
  for (const std::string& job_id : jobs) {
    FUZZ_CHECK(absl::IsNotFound(broker.GetJob(kOwner, job_id).status()));
  }
  for (const TaskId id : first->task_ids) {
    FUZZ_CHECK(absl::IsNotFound(broker.GetTask(kOwner, id).status()));
  }
  return 0;
}
