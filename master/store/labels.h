// A task's labels as the durable stores keep them: a JSON object of strings, "" for none.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "master/core/task.h"

namespace taskmaster {

std::string EncodeLabels(const Labels& labels);
// INVALID_ARGUMENT naming what is wrong when `text` is not what EncodeLabels writes.
absl::StatusOr<Labels> DecodeLabels(std::string_view text);

}  // namespace taskmaster
