// Authorization of calls (see auth.h).
#include "master/rpc/auth.h"

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"

namespace taskmaster {

Authorizer::Authorizer(std::optional<TokenSet> tokens) : open_(!tokens) {
  if (tokens) tokens_ = std::make_shared<const TokenSet>(std::move(*tokens));
}

void Authorizer::SetUnavailable(std::string reason, std::string serving_at) {
  absl::MutexLock lock(&mu_);
  unavailable_.store(!reason.empty(), std::memory_order_release);
  unavailable_reason_ = std::move(reason);
  serving_at_ = std::move(serving_at);
}

void Authorizer::Replace(TokenSet tokens) {
  auto replacement = std::make_shared<const TokenSet>(std::move(tokens));
  absl::MutexLock lock(&mu_);
  tokens_ = std::move(replacement);
}

grpc::Status Authorizer::Check(grpc::ServerContextBase* context, Role need, const char* call,
                               Authorized* who) const {
  context->AddTrailingMetadata(kAnsweredByMaster, "1");
  if (unavailable_.load(std::memory_order_acquire)) {
    absl::MutexLock lock(&mu_);
    if (!unavailable_reason_.empty()) {
      if (!serving_at_.empty()) context->AddTrailingMetadata(kServingMaster, serving_at_);
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, unavailable_reason_);
    }
  }
  if (open_) {
    if (who) *who = Authorized{};
    return grpc::Status::OK;
  }
  const auto& metadata = context->client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    failures_.missing.fetch_add(1, std::memory_order_relaxed);
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing 'authorization: Bearer <token>' metadata");
  }
  std::optional<std::string_view> token =
      BearerToken(std::string_view(it->second.data(), it->second.size()));
  std::optional<Identity> identity = token ? Lookup(*token) : std::nullopt;
  if (!identity) {
    failures_.unknown.fetch_add(1, std::memory_order_relaxed);
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "unknown token");
  }
  if (!RoleAllows(identity->role, need)) {
    failures_.denied.fetch_add(1, std::memory_order_relaxed);
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        absl::StrCat("a '", RoleName(identity->role), "' token may not call ", call,
                                     " (it needs a '", RoleName(need), "' or 'admin' token)"));
  }
  if (who) *who = Authorized{std::move(*identity), std::string(*token)};
  return grpc::Status::OK;
}

bool Authorizer::IsAdminAuthorization(std::string_view header) const {
  if (open_) return true;
  // Refusals are not counted with the calls' (a browser's first request always is one).
  std::optional<std::string_view> token = BearerToken(header);
  std::string basic;  // a browser's "Basic base64(user:token)"
  if (!token && header.size() > 6 &&
      absl::EqualsIgnoreCase(absl::string_view(header.data(), 6), "basic ") &&
      absl::Base64Unescape(absl::string_view(header.data() + 6, header.size() - 6), &basic) &&
      basic.find(':') != std::string::npos) {
    token = std::string_view(basic).substr(basic.find(':') + 1);
  }
  const std::optional<Identity> identity = token ? Lookup(*token) : std::nullopt;
  return identity && identity->role == Role::kAdmin;
}

std::optional<Identity> Authorizer::Lookup(std::string_view token) const {
  std::shared_ptr<const TokenSet> tokens;
  {
    absl::MutexLock lock(&mu_);
    tokens = tokens_;
  }
  return tokens->Lookup(token);
}

AuthFailures Authorizer::Failures() const {
  return {failures_.missing.load(std::memory_order_relaxed),
          failures_.unknown.load(std::memory_order_relaxed),
          failures_.denied.load(std::memory_order_relaxed)};
}

bool StreamQuota::Acquire(const std::string& token) {
  absl::MutexLock lock(&mu_);
  size_t& open = open_[token];
  if (open >= per_token_) return false;
  ++open;
  return true;
}

void StreamQuota::Release(const std::string& token) {
  absl::MutexLock lock(&mu_);
  auto it = open_.find(token);
  if (it != open_.end() && --it->second == 0) open_.erase(it);
}

}  // namespace taskmaster
