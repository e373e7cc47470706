// The broker's input rules (see validate.h).
#include "master/core/validate.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/util.h"

namespace taskmaster::core {

absl::Status ValidateLabels(const Labels& labels) {
  if (labels.size() > kMaxLabels) {
    return absl::InvalidArgumentError(absl::StrCat(labels.size(), " labels; at most ", kMaxLabels));
  }
  for (const auto& [key, value] : labels) {
    if (absl::Status s = CheckName("label key", key); !s.ok()) return s;
    if (value.size() > kMaxLabelValue) {
      return absl::InvalidArgumentError(
          absl::StrCat("label '", key, "' has a value over ", kMaxLabelValue, " bytes"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateSpec(const TaskSpec& s, size_t max_payload_bytes) {
  if (absl::Status st = CheckName("queue name", s.queue); !st.ok()) return st;
  if (s.kind.empty()) return absl::InvalidArgumentError("kind is empty");
  if (absl::Status st = CheckName("kind", s.kind); !st.ok()) return st;
  // Labels travel and stay with the task like its payload, and count with it.
  size_t bytes = s.payload.size();
  for (const auto& [key, value] : s.labels) bytes += key.size() + value.size();
  if (bytes > max_payload_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("payload of ", s.payload.size(), " bytes",
                                                   s.labels.empty() ? "" : " with its labels",
                                                   " exceeds the limit of ", max_payload_bytes));
  }
  for (const auto& [what, ms] :
       {std::pair<const char*, int64_t>{"delay", s.delay_ms}, {"timeout", s.timeout_ms}}) {
    if (ms < 0) return absl::InvalidArgumentError(absl::StrCat(what, " is negative"));
    if (ms > kMaxDurationMs) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " of ", ms, " ms is over 100 years (", kMaxDurationMs, " ms)"));
    }
  }
  if (s.max_attempts < 0 || s.max_attempts > kMaxAttemptsLimit) {
    return absl::InvalidArgumentError(
        absl::StrCat("max attempts must be between 1 and ", kMaxAttemptsLimit));
  }
  if (s.idempotency_key.size() > kMaxIdempotencyKey) {
    return absl::InvalidArgumentError(
        absl::StrCat("idempotency key longer than ", kMaxIdempotencyKey, " bytes"));
  }
  return ValidateLabels(s.labels);
}

absl::Status ValidateHello(WorkerHello& hello) {
  if (hello.worker_id.empty()) return absl::InvalidArgumentError("hello: worker_id is empty");
  for (const auto& [field, value] :
       {std::pair<const char*, const std::string*>{"worker_id", &hello.worker_id},
        {"name", &hello.name},
        {"host", &hello.host}}) {
    if (value->size() > kMaxHelloText) {
      return absl::InvalidArgumentError(
          absl::StrCat("hello: ", field, " is longer than ", kMaxHelloText, " bytes"));
    }
  }
  if (hello.slots < 1 || hello.slots > kMaxSlots) {
    return absl::InvalidArgumentError(
        absl::StrCat("hello: slots must be between 1 and ", kMaxSlots));
  }
  if (hello.kinds.empty()) return absl::InvalidArgumentError("hello: the worker runs no kind");
  if (hello.held.size() > kMaxHeld) {
    return absl::InvalidArgumentError(absl::StrCat("hello: a worker holds at most ", kMaxHeld,
                                                   " tasks, not ", hello.held.size()));
  }
  if (hello.queues.empty()) hello.queues = {kDefaultQueue};
  if (hello.kinds.size() > kMaxNames || hello.queues.size() > kMaxNames) {
    return absl::InvalidArgumentError(
        absl::StrCat("hello: at most ", kMaxNames, " kinds and ", kMaxNames, " queues"));
  }
  if (absl::Status s = ValidateLabels(hello.labels); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("hello: ", s.message()));
  }
  for (const auto& names : {hello.kinds, hello.queues}) {
    for (const std::string& name : names) {
      if (absl::Status s = CheckName("kind or queue", name); !s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("hello: ", s.message()));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace taskmaster::core
