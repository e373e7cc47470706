#include "common/auth.h"

#include <sys/stat.h>

#include <cstdlib>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/util.h"

namespace taskmaster {

const char* RoleName(Role role) {
  switch (role) {
    case Role::kSubmit:
      return "submit";
    case Role::kWork:
      return "work";
    case Role::kAdmin:
      return "admin";
  }
  return "?";
}

bool RoleAllows(Role have, Role need) { return have == Role::kAdmin || have == need; }

namespace {

constexpr size_t kMinTokenLength = 16;

}  // namespace

absl::StatusOr<TokenSet> TokenSet::Parse(std::string_view text) {
  TokenSet set;
  int line_no = 0;
  auto error = [&line_no](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat("tokens line ", line_no, ": ", parts...));
  };
  for (std::string_view line : SplitLines(text)) {
    ++line_no;
    if (line.empty() || line.front() == '#') continue;
    std::vector<std::string> fields = SplitWords(line);
    if (fields[0] == "limit") {
      if (fields.size() < 3 || !IsValidName(fields[1])) {
        return error("expected 'limit TENANT [max-pending=N] [submit-rate=N]'");
      }
      TenantLimits limits{-1, -1};
      for (size_t i = 2; i < fields.size(); ++i) {
        const size_t eq = fields[i].find('=');
        const std::string key = fields[i].substr(0, eq);
        int64_t value = -1;
        if (eq == std::string::npos || !absl::SimpleAtoi(fields[i].substr(eq + 1), &value) ||
            value < 0) {
          return error("'", fields[i], "': expected KEY=N with N a whole number, 0 for no limit");
        }
        if (key == "max-pending") {
          limits.max_pending = value;
        } else if (key == "submit-rate") {
          limits.submit_rate = value;
        } else {
          return error("unknown limit '", key, "' (max-pending, submit-rate)");
        }
      }
      if (!set.limits_.emplace(fields[1], limits).second) {
        return error("a second limit line for tenant '", fields[1], "'");
      }
      continue;
    }
    if (fields.size() != 2 && fields.size() != 3) {
      return error("expected 'ROLE TOKEN [TENANT]' (ROLE: submit, work, admin)");
    }
    Identity identity;
    identity.line = line_no;
    if (fields[0] == "submit") {
      identity.role = Role::kSubmit;
    } else if (fields[0] == "work") {
      identity.role = Role::kWork;
    } else if (fields[0] == "admin") {
      identity.role = Role::kAdmin;
    } else {
      return error("unknown role '", Printable(fields[0]), "' (submit, work, admin)");
    }
    if (fields[1].size() < kMinTokenLength) {
      return error("token shorter than ", kMinTokenLength, " characters");
    }
    if (fields.size() == 3) {
      if (absl::Status s = CheckName("tenant", fields[2]); !s.ok()) return error(s.message());
      identity.tenant = fields[2];
    }
    for (const Entry& e : set.entries_) {
      if (e.token == fields[1]) return error("the token of line ", e.identity.line, " again");
    }
    set.entries_.push_back({fields[1], std::move(identity)});
  }
  if (set.entries_.empty()) return absl::InvalidArgumentError("the tokens file holds no token");
  return set;
}

absl::StatusOr<TokenSet> TokenSet::Load(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return text.status();
  absl::StatusOr<TokenSet> set = Parse(*text);
  if (!set.ok())
    return absl::Status(set.status().code(),
                        absl::StrCat(path, ": ", std::string(set.status().message())));
  return set;
}

std::optional<Identity> TokenSet::Lookup(std::string_view token) const {
  const Entry* found = nullptr;
  for (const Entry& entry : entries_) {
    // No early exit: every entry is compared whatever matched.
    if (ConstantTimeEquals(entry.token, token)) found = &entry;
  }
  if (!found) return std::nullopt;
  return found->identity;
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return text.status();
  for (std::string_view line : SplitLines(*text)) {
    if (!line.empty() && line.front() != '#') return std::string(line);
  }
  return absl::InvalidArgumentError(absl::StrCat("token file ", path, " holds no token"));
}

absl::StatusOr<PresentedToken> LoadPresentedToken(const std::string& token_file) {
  PresentedToken out;
  if (token_file.empty()) {
    if (const char* env = std::getenv("TASKMASTER_TOKEN")) out.token = env;
    return out;
  }
  absl::StatusOr<std::string> token = ReadTokenFile(token_file);
  if (!token.ok()) return token.status();
  out.token = std::move(*token);
  if (!IsPrivateFile(token_file)) {
    out.warning = absl::StrCat(token_file, " can be read by other users: chmod 600 it");
  }
  return out;
}

bool IsPrivateFile(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) != 0 || (st.st_mode & (S_IRWXG | S_IRWXO)) == 0;
}

std::optional<std::string_view> BearerToken(std::string_view header) {
  // The scheme's name is case-insensitive (RFC 9110).
  constexpr std::string_view kPrefix = "bearer ";
  if (header.size() < kPrefix.size() ||
      !absl::EqualsIgnoreCase(absl::string_view(header.data(), kPrefix.size()),
                              absl::string_view(kPrefix.data(), kPrefix.size()))) {
    return std::nullopt;
  }
  header = Trim(header.substr(kPrefix.size()));
  if (header.empty()) return std::nullopt;
  return header;
}

}  // namespace taskmaster
