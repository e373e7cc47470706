#include "common/auth.h"

#include <sys/stat.h>

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
  for (std::string_view line : SplitLines(text)) {
    ++line_no;
    if (line.empty() || line.front() == '#') continue;
    std::vector<std::string> fields = SplitWords(line);
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokens line ", line_no, ": expected 'ROLE TOKEN' (ROLE: submit, work, admin)"));
    }
    Role role;
    if (fields[0] == "submit") {
      role = Role::kSubmit;
    } else if (fields[0] == "work") {
      role = Role::kWork;
    } else if (fields[0] == "admin") {
      role = Role::kAdmin;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("tokens line ", line_no, ": unknown role '",
                                                     fields[0], "' (submit, work, admin)"));
    }
    if (fields[1].size() < kMinTokenLength) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokens line ", line_no, ": token shorter than ", kMinTokenLength, " characters"));
    }
    set.entries_.push_back({fields[1], role});
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

std::optional<Role> TokenSet::Lookup(std::string_view token) const {
  std::optional<Role> found;
  for (const Entry& entry : entries_) {
    // No early exit: every entry is compared whatever matched.
    if (ConstantTimeEquals(entry.token, token)) found = entry.role;
  }
  return found;
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return text.status();
  for (std::string_view line : SplitLines(*text)) {
    if (!line.empty() && line.front() != '#') return std::string(line);
  }
  return absl::InvalidArgumentError(absl::StrCat("token file ", path, " holds no token"));
}

bool IsPrivateFile(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) != 0 || (st.st_mode & (S_IRWXG | S_IRWXO)) == 0;
}

std::optional<std::string_view> BearerToken(std::string_view header) {
  constexpr std::string_view kPrefix = "Bearer ";
  if (header.substr(0, kPrefix.size()) != kPrefix) return std::nullopt;
  header = Trim(header.substr(kPrefix.size()));
  if (header.empty()) return std::nullopt;
  return header;
}

}  // namespace taskmaster
