// Labels in the durable stores (see labels.h).
#include "master/store/labels.h"

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace taskmaster {

std::string EncodeLabels(const Labels& labels) {
  if (labels.empty()) return "";
  return nlohmann::json(labels).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

absl::StatusOr<Labels> DecodeLabels(std::string_view text) {
  if (text.empty()) return Labels{};
  try {
    return nlohmann::json::parse(text).get<Labels>();
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("unreadable labels: ", e.what()));
  }
}

}  // namespace taskmaster
