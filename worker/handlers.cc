// The registry of kinds, a task's stop and sleep helpers, and the built-in handlers.
#include "worker/handlers.h"

#include <charconv>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/util.h"

namespace taskmaster {

bool TaskContext::ShouldStop() const {
  return cancelled_->load(std::memory_order_relaxed) ||
         std::chrono::steady_clock::now() >= deadline_;
}

bool TaskContext::SleepFor(std::chrono::milliseconds d) const {
  // Short naps keep a cancel's latency low without a condition variable per task.
  constexpr auto kNap = std::chrono::milliseconds(10);
  const auto until = std::chrono::steady_clock::now() + d;
  while (!ShouldStop()) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= until) return true;
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(kNap, until - now));
  }
  return false;
}

namespace {

absl::Status RegisteredTwice(const std::string& kind) {
  return absl::AlreadyExistsError(absl::StrCat("kind '", kind, "' is registered twice"));
}

}  // namespace

absl::Status Registry::Register(const std::string& kind, Handler handler) {
  absl::Status s = CheckName("kind", kind);
  if (s.ok() && !handlers_.emplace(kind, std::move(handler)).second) s = RegisteredTwice(kind);
  if (refused_.ok()) refused_ = s;
  return s;
}

absl::Status Registry::Add(const Registry& other) {
  for (const auto& [kind, handler] : other.handlers_) {
    if (handlers_.contains(kind)) return RegisteredTwice(kind);
  }
  handlers_.insert(other.handlers_.begin(), other.handlers_.end());
  return absl::OkStatus();
}

const Handler* Registry::Find(const std::string& kind) const {
  auto it = handlers_.find(kind);
  return it == handlers_.end() ? nullptr : &it->second;
}

std::vector<std::string> Registry::Kinds() const {
  std::vector<std::string> kinds;
  for (const auto& [kind, handler] : handlers_) kinds.push_back(kind);
  return kinds;
}

namespace {

// How much of its payload `fail` shows in its error: enough to tell tests apart, well within the
// kMaxErrorBytes a result keeps.
constexpr size_t kFailPayloadShown = 1'024;

absl::StatusOr<int64_t> ParseInteger(std::string_view text, std::string_view what) {
  text = Trim(text);
  int64_t n = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) {
    // Never the payload itself: its bytes could be anything.
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(what), " must be a decimal integer, not '", Quote(text), "'"));
  }
  return n;
}

absl::StatusOr<std::string> Square(const TaskContext& ctx) {
  absl::StatusOr<int64_t> n = ParseInteger(ctx.payload(), "square's payload");
  if (!n.ok()) return n.status();
  // |n| < 3037000500 keeps n*n inside int64.
  if (*n <= -3037000500 || *n >= 3037000500) {
    return absl::OutOfRangeError(absl::StrCat("square: ", *n, " squared overflows 64 bits"));
  }
  return absl::StrCat(*n, "*", *n, "=", *n * *n);
}

absl::StatusOr<std::string> Echo(const TaskContext& ctx) { return std::string(ctx.payload()); }

absl::StatusOr<std::string> Sleep(const TaskContext& ctx) {
  absl::StatusOr<int64_t> ms = ParseInteger(ctx.payload(), "sleep's payload (milliseconds)");
  if (!ms.ok()) return ms.status();
  if (*ms < 0) return absl::InvalidArgumentError("sleep: negative milliseconds");
  if (!ctx.SleepFor(std::chrono::milliseconds(*ms))) {
    return absl::CancelledError("sleep: stopped early");
  }
  return absl::StrCat("slept ", *ms, " ms");
}

// Fails with its payload as the message, as far as a message can show it.
absl::StatusOr<std::string> Fail(const TaskContext& ctx) {
  return absl::UnknownError(ctx.payload().empty() ? std::string("fail: failed on purpose")
                                                  : Quote(ctx.payload(), kFailPayloadShown));
}

}  // namespace

absl::Status RegisterBuiltins(Registry& registry) {
  for (auto& [kind, handler] : std::vector<std::pair<std::string, Handler>>{
           {"square", Square}, {"echo", Echo}, {"sleep", Sleep}, {"fail", Fail}}) {
    if (absl::Status s = registry.Register(kind, std::move(handler)); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace taskmaster
