#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace taskmaster {

// What a token may do. `admin` may do everything.
enum class Role { kSubmit, kWork, kAdmin };

const char* RoleName(Role role);

// True when a token of role `have` may make a call that needs `need`.
bool RoleAllows(Role have, Role need);

// How much one tenant may ask of the master; 0 means no limit of that kind.
struct TenantLimits {
  int64_t max_pending = 0;  // unfinished tasks (pending, delayed or running)
  int64_t submit_rate = 0;  // tasks per second, averaged (a batch may overdraw, then waits)
  bool operator==(const TenantLimits&) const = default;
};

// Who a token is: its role and the tenant its jobs belong to ("" is the default tenant).
struct Identity {
  Role role = Role::kAdmin;
  std::string tenant;
  // Line of the token in its file: names it in limits and logs without showing it.
  int line = 0;
};

// The master's tokens. Immutable after Load; thread-safe.
//
// File format, one entry per line, blank lines and lines starting with `#` ignored:
//   ROLE TOKEN [TENANT]   ROLE is submit, work or admin; tokens are at least 16 characters;
//                         several tokens may share a role and tenant (rotation)
//   limit TENANT [max-pending=N] [submit-rate=N]   overrides the master's per-tenant defaults
// Calls refused since the master started, by reason.
struct AuthFailures {
  int64_t missing_token = 0;
  int64_t unknown_token = 0;
  int64_t role_denied = 0;  // a known token whose role may not make the call
};

class TokenSet {
 public:
  static absl::StatusOr<TokenSet> Parse(std::string_view text);
  static absl::StatusOr<TokenSet> Load(const std::string& path);

  // Who holds `token`, or nullopt when unknown. Compares against every token in time that
  // does not depend on where a mismatch is, so a caller cannot guess tokens byte by byte.
  std::optional<Identity> Lookup(std::string_view token) const;

  // The `limit` lines, by tenant: only the kinds of limit a line names are set (others are -1).
  const std::map<std::string, TenantLimits>& limits() const { return limits_; }

  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::string token;
    Identity identity;
  };
  std::vector<Entry> entries_;
  std::map<std::string, TenantLimits> limits_;
};

// The credential a worker or client presents: the first non-comment line of `path`, trimmed.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// The token a worker or client presents: read from `token_file` when one is named, else taken
// from $TASKMASTER_TOKEN, else none (empty). `warning` says when the file is readable by others.
struct PresentedToken {
  std::string token;
  std::string warning;
};
absl::StatusOr<PresentedToken> LoadPresentedToken(const std::string& token_file);

// False when `path` can be read by users other than its owner (group or others).
bool IsPrivateFile(const std::string& path);

// Extracts the token from an `authorization` header value "Bearer <token>".
std::optional<std::string_view> BearerToken(std::string_view header);

}  // namespace taskmaster
