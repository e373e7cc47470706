// fuzz_text: the text helpers that outside bytes go through: UTF-8 checks and repair
// (IsValidUtf8, ValidUtf8, the error cap), escaping for logs and terminals (Printable, Quote),
// the small parsers of common/util (Trim, SplitLines, SplitWords, SplitList, ParseLabels,
// IsValidName, IsLoopbackAddress), ConstantTimeEquals, and taskctl's ParseDurationMs. The first
// byte of the input sets the cut for ValidUtf8 and Quote; the rest is the text.
//
// Asserts: ValidUtf8 makes valid UTF-8, leaves valid UTF-8 as it was, and keeps to its cut but
// for the replacement characters; Printable's output is valid UTF-8 with no control character,
// and Printable leaves its own output as it is; Quote's output is printable ASCII; trimmed and
// split pieces carry no surrounding blanks; parsed label keys are valid names; ConstantTimeEquals
// agrees with ==; a duration that parses is not negative.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "client/commands.h"
#include "common/util.h"
#include "tests/fuzz/fuzz_common.h"

namespace taskmaster::fuzz {
namespace {

bool IsBlank(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

bool Trimmed(std::string_view s) {
  return s.empty() || (!IsBlank(s.front()) && !IsBlank(s.back()));
}

// C0 controls, DEL, and C1 controls (U+0080 to U+009F, C2 80 to C2 9F in UTF-8).
bool HasControl(std::string_view s) {
  for (size_t i = 0; i < s.size(); ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7F) return true;
    if (c == 0xC2 && i + 1 < s.size() && static_cast<unsigned char>(s[i + 1]) < 0xA0) return true;
  }
  return false;
}

}  // namespace
}  // namespace taskmaster::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace taskmaster;
  using namespace taskmaster::fuzz;
  if (size == 0) return 0;
  const size_t cut = data[0];
  const std::string_view s(reinterpret_cast<const char*>(data) + 1, size - 1);

  const bool valid = IsValidUtf8(s);
  const std::string repaired = ValidUtf8(s);
  FUZZ_CHECK(IsValidUtf8(repaired));
  if (valid) FUZZ_CHECK(repaired == s);
  const std::string capped = ValidUtf8(s, cut);
  FUZZ_CHECK(IsValidUtf8(capped));
  FUZZ_CHECK(capped.size() <= 3 * std::min(cut, s.size()));
  if (valid && s.size() <= cut) FUZZ_CHECK(capped == s);

  const std::string printable = Printable(s);
  FUZZ_CHECK(IsValidUtf8(printable) && !HasControl(printable));
  FUZZ_CHECK(Printable(printable) == printable);
  if (valid && !HasControl(s)) FUZZ_CHECK(printable == s);

  for (const unsigned char c : Quote(s, cut)) FUZZ_CHECK(c >= 0x20 && c < 0x7F);

  const std::string_view trimmed = Trim(s);
  FUZZ_CHECK(Trimmed(trimmed));
  for (std::string_view line : SplitLines(s)) {
    FUZZ_CHECK(Trimmed(line) && line.find('\n') == std::string_view::npos);
  }
  for (const std::string& word : SplitWords(s)) {
    FUZZ_CHECK(!word.empty() && word.find_first_of(" \t") == std::string::npos);
  }
  for (const std::string& item : SplitList(s)) {
    FUZZ_CHECK(!item.empty() && Trimmed(item) && item.find(',') == std::string::npos);
  }
  if (absl::StatusOr<std::map<std::string, std::string>> labels = ParseLabels(s); labels.ok()) {
    for (const auto& [key, value] : *labels) FUZZ_CHECK(IsValidName(key) && Trimmed(value));
  }
  if (IsValidName(s)) FUZZ_CHECK(s.size() <= 64 && Printable(s) == s);
  IsLoopbackAddress(std::string(s));

  const std::string_view a = s.substr(0, s.size() / 2);
  const std::string_view b = s.substr(s.size() / 2);
  FUZZ_CHECK(ConstantTimeEquals(a, b) == (a == b));
  FUZZ_CHECK(ConstantTimeEquals(a, a));

  if (absl::StatusOr<int64_t> ms = ParseDurationMs(std::string(s)); ms.ok()) FUZZ_CHECK(*ms >= 0);
  return 0;
}
