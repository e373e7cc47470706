// fuzz_tokens: what authenticates a call. The input is a tokens file's text, then (after the
// first NUL byte, when there is one) the value of a call's authorization header. The text goes
// through TokenSet::Parse; the header through BearerToken, then TokenSet::Lookup, as
// Authorizer::Check does; every word of the text is looked up too, as a token someone guessed.
//
// Asserts: a parsed set holds a token; nothing shorter than a token's 16-character minimum
// authenticates; the empty token never does; BearerToken answers a non-empty, trimmed piece of
// the header.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "common/auth.h"
#include "common/util.h"
#include "tests/fuzz/fuzz_common.h"

namespace taskmaster::fuzz {
namespace {

constexpr size_t kMinTokenLength = 16;  // as the tokens file's format says (common/auth.h)

void CheckLookup(const TokenSet& tokens, std::string_view token) {
  if (tokens.Lookup(token)) FUZZ_CHECK(token.size() >= kMinTokenLength);
}

}  // namespace
}  // namespace taskmaster::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace taskmaster;
  using namespace taskmaster::fuzz;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string_view text = input.substr(0, nul);
  const std::string_view header =
      nul == std::string_view::npos ? std::string_view() : input.substr(nul + 1);

  const std::optional<std::string_view> bearer = BearerToken(header);
  if (bearer) {
    FUZZ_CHECK(!bearer->empty() && Trim(*bearer) == *bearer);
    FUZZ_CHECK(bearer->data() >= header.data() &&
               bearer->data() + bearer->size() <= header.data() + header.size());
  }

  absl::StatusOr<TokenSet> tokens = TokenSet::Parse(text);
  if (!tokens.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(tokens.status()));
    return 0;
  }
  FUZZ_CHECK(tokens->size() >= 1);
  FUZZ_CHECK(!tokens->Lookup(""));
  if (bearer) CheckLookup(*tokens, *bearer);
  CheckLookup(*tokens, header);
  for (std::string_view line : SplitLines(text)) {
    for (const std::string& word : SplitWords(line)) CheckLookup(*tokens, word);
  }
  return 0;
}
