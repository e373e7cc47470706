// Authorization of calls: the bearer token checked against the tokens file, the caller's role
// and tenant, and the per-token cap on open streams.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>

#include "absl/synchronization/mutex.h"
#include "common/auth.h"
#include "grpcpp/grpcpp.h"
#include "master/core/task.h"

namespace taskmaster {

// Who made a call, once its token checked out.
struct Authorized {
  Identity identity;
  std::string token;  // as presented ("" without authentication): keys per-token limits

  Caller caller() const { return {identity.tenant, identity.role == Role::kAdmin}; }
};

// Checks the bearer token of a call. Without a token set (the master's --insecure mode) every
// call is allowed, as an admin of the default tenant. Thread-safe.
class Authorizer {
 public:
  explicit Authorizer(std::optional<TokenSet> tokens);
  // UNAUTHENTICATED without a known token, PERMISSION_DENIED when its role may not do `call`;
  // otherwise fills `who`. Every call starts here: it also marks the answer as the master's
  // (kAnsweredByMaster).
  grpc::Status Check(grpc::ServerContextBase* context, Role need, const char* call,
                     Authorized* who = nullptr) const;
  // New tokens for calls from now on (streams already open keep going).
  void Replace(TokenSet tokens);
  AuthFailures Failures() const;
  // Whether an HTTP Authorization header ("Bearer TOKEN", or Basic with the token as password)
  // holds an admin token, for the admin listener. Always true without tokens (--insecure).
  bool IsAdminAuthorization(std::string_view header) const;
  // While set, every call is answered UNAVAILABLE with `reason`: the master listens while it
  // recovers its store (so that probes hear NOT_SERVING), or while another master serves
  // (`serving_at` then goes back as trailing metadata, kServingMaster, for clients to follow),
  // and nothing may reach the broker meanwhile. An empty reason: the master serves.
  void SetUnavailable(std::string reason, std::string serving_at = "");

 private:
  // The identity of `token` in the tokens in use.
  std::optional<Identity> Lookup(std::string_view token) const;

  const bool open_;                       // --insecure
  std::atomic<bool> unavailable_{false};  // unavailable_reason_ is set
  std::string unavailable_reason_ ABSL_GUARDED_BY(mu_);
  std::string serving_at_ ABSL_GUARDED_BY(mu_);
  struct {
    std::atomic<int64_t> missing{0}, unknown{0}, denied{0};
  } mutable failures_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const TokenSet> tokens_ ABSL_GUARDED_BY(mu_);
};

// Open streams per token, so that one token cannot hold the master's memory with streams that
// never read. Thread-safe.
class StreamQuota {
 public:
  explicit StreamQuota(size_t per_token) : per_token_(per_token) {}
  // False when `token` has its limit open already; else counts one more until Release.
  bool Acquire(const std::string& token);
  void Release(const std::string& token);
  size_t per_token() const { return per_token_; }

 private:
  const size_t per_token_;
  absl::Mutex mu_;
  std::unordered_map<std::string, size_t> open_ ABSL_GUARDED_BY(mu_);
};

}  // namespace taskmaster
