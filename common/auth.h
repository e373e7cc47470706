#pragma once

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

// The master's tokens. Immutable after Load; thread-safe.
//
// File format: one `ROLE TOKEN` pair per line (ROLE is submit, work or admin), blank lines and
// lines starting with `#` ignored. Tokens are at least 16 characters.
class TokenSet {
 public:
  static absl::StatusOr<TokenSet> Parse(std::string_view text);
  static absl::StatusOr<TokenSet> Load(const std::string& path);

  // The role of `token`, or nullopt when unknown. Compares against every token in time that
  // does not depend on where a mismatch is, so a caller cannot guess tokens byte by byte.
  std::optional<Role> Lookup(std::string_view token) const;

  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::string token;
    Role role;
  };
  std::vector<Entry> entries_;
};

// The credential a worker or client presents: the first non-comment line of `path`, trimmed.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// False when `path` can be read by users other than its owner (group or others).
bool IsPrivateFile(const std::string& path);

// Extracts the token from an `authorization` header value "Bearer <token>".
std::optional<std::string_view> BearerToken(std::string_view header);

}  // namespace taskmaster
