#pragma once

// What the end-to-end tests (integration_*_test.cc) share: submit requests made by hand, and the
// task ids `taskctl --format json submit` printed.

#include <cstdint>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "taskmaster/v1/taskmaster.grpc.pb.h"
#include "tests/harness.h"

namespace taskmaster::testing {

inline v1::SubmitRequest Batch(const std::string& kind, const std::vector<std::string>& payloads,
                               int32_t max_attempts = 0) {
  v1::SubmitRequest request;
  for (const std::string& p : payloads) {
    v1::TaskSpec* t = request.add_tasks();
    t->set_kind(kind);
    t->set_payload(p);
    t->set_max_attempts(max_attempts);
  }
  return request;
}

// The task ids `taskctl --format json submit` printed (none when it failed).
inline std::vector<uint64_t> SubmittedIds(const CommandResult& submitted) {
  const nlohmann::json out = nlohmann::json::parse(
      submitted.out.substr(0, submitted.out.find('\n')), nullptr, /*allow_exceptions=*/false);
  if (!out.is_object() || !out.contains("task_ids")) return {};
  return out["task_ids"].get<std::vector<uint64_t>>();
}

}  // namespace taskmaster::testing
