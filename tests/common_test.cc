// Unit tests of tokens, parsing helpers and the built-in handlers.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include "client/commands.h"
#include "common/auth.h"
#include "common/checksum.h"
#include "common/grpc_util.h"
#include "common/inline_bytes.h"
#include "common/util.h"
#include "master/rpc/master.h"
#include "tests/harness.h"
#include "worker/handlers.h"

namespace taskmaster {
namespace {

// The role of `token` in `set`, or nullopt.
std::optional<Role> RoleOf(const TokenSet& set, std::string_view token) {
  std::optional<Identity> who = set.Lookup(token);
  return who ? std::optional<Role>(who->role) : std::nullopt;
}

TEST(TokenSet, ParsesRolesAndComments) {
  auto set = TokenSet::Parse(
      "# tokens\n"
      "submit  submit-token-0123456789\n"
      "\n"
      "work\twork-token-0123456789\r\n"
      "admin admin-token-0123456789\n");
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->size(), 3u);
  EXPECT_EQ(RoleOf(*set, "submit-token-0123456789"), Role::kSubmit);
  EXPECT_EQ(RoleOf(*set, "work-token-0123456789"), Role::kWork);
  EXPECT_EQ(RoleOf(*set, "admin-token-0123456789"), Role::kAdmin);
  EXPECT_EQ(RoleOf(*set, "work-token-012345678"), std::nullopt);
  EXPECT_EQ(RoleOf(*set, "work-token-01234567890"), std::nullopt);
  EXPECT_EQ(RoleOf(*set, ""), std::nullopt);
  EXPECT_EQ(set->Lookup("submit-token-0123456789")->tenant, "");
}

TEST(TokenSet, TenantsRotationAndLimits) {
  auto set = TokenSet::Parse(
      "submit acme-old-token-0123456789 acme\n"
      "submit acme-new-token-0123456789 acme\n"
      "submit beta-token-0123456789 beta\n"
      "limit acme max-pending=100 submit-rate=50\n"
      "limit beta submit-rate=0\n");
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->Lookup("acme-old-token-0123456789")->tenant, "acme");
  EXPECT_EQ(set->Lookup("acme-new-token-0123456789")->tenant, "acme");
  EXPECT_EQ(set->Lookup("acme-new-token-0123456789")->line, 2);
  EXPECT_EQ(set->Lookup("beta-token-0123456789")->tenant, "beta");
  EXPECT_EQ(set->limits().at("acme"), (TenantLimits{100, 50}));
  EXPECT_EQ(set->limits().at("beta"), (TenantLimits{-1, 0}));  // -1: the master's default
}

TEST(TokenSet, RejectsBadLines) {
  EXPECT_FALSE(TokenSet::Parse("").ok());
  EXPECT_FALSE(TokenSet::Parse("root some-token-0123456789\n").ok());
  EXPECT_FALSE(TokenSet::Parse("submit short\n").ok());
  for (const char* text :
       {"submit a-token-0123456789 acme extra\n", "submit a-token-0123456789 bad/tenant\n",
        "submit a-token-0123456789\nwork a-token-0123456789\n",
        "submit a-token-0123456789\nlimit acme\n",
        "submit a-token-0123456789\nlimit acme max-pending=-1\n",
        "submit a-token-0123456789\nlimit acme max-pending=1e9\n",
        "submit a-token-0123456789\nlimit acme speed=3\n",
        "submit a-token-0123456789\nlimit acme max-pending=99999999999999999999\n",
        "submit a-token-0123456789\nlimit a submit-rate=1\nlimit a max-pending=1\n"}) {
    auto bad = TokenSet::Parse(text);
    ASSERT_FALSE(bad.ok()) << text;
    EXPECT_NE(std::string(bad.status().message()).find("line "), std::string::npos) << text;
  }
  EXPECT_NE(TokenSet::Parse("work a-token-0123456789 \x1b[31m\n").status().message().find("\\x1B"),
            std::string::npos);
}

TEST(Auth, RolesAndBearer) {
  EXPECT_TRUE(RoleAllows(Role::kAdmin, Role::kWork));
  EXPECT_TRUE(RoleAllows(Role::kSubmit, Role::kSubmit));
  EXPECT_FALSE(RoleAllows(Role::kWork, Role::kSubmit));
  EXPECT_EQ(BearerToken("Bearer abc"), "abc");
  EXPECT_EQ(BearerToken("bearer abc"), "abc");  // the scheme in any case
  EXPECT_EQ(BearerToken("Basic abc"), std::nullopt);
  EXPECT_EQ(BearerToken("Bearer   "), std::nullopt);
}

TEST(Auth, PrivateFiles) {
  testing::TempDir dir;
  const std::string path = dir.File("token");
  testing::WriteFile(path, "x");
  chmod(path.c_str(), 0600);
  EXPECT_TRUE(IsPrivateFile(path));
  chmod(path.c_str(), 0644);
  EXPECT_FALSE(IsPrivateFile(path));
}

// A named file wins over $TASKMASTER_TOKEN; without either there is no token.
TEST(Auth, PresentedToken) {
  testing::TempDir dir;
  const std::string path = dir.File("token");
  testing::WriteFile(path, "# the worker's\nfile-token\n");
  chmod(path.c_str(), 0600);
  setenv("TASKMASTER_TOKEN", "env-token", 1);
  absl::StatusOr<PresentedToken> from_file = LoadPresentedToken(path);
  ASSERT_TRUE(from_file.ok()) << from_file.status();
  EXPECT_EQ(from_file->token, "file-token");
  EXPECT_TRUE(from_file->warning.empty());
  chmod(path.c_str(), 0644);
  EXPECT_NE(LoadPresentedToken(path)->warning.find("chmod 600"), std::string::npos);
  EXPECT_EQ(LoadPresentedToken("")->token, "env-token");
  unsetenv("TASKMASTER_TOKEN");
  EXPECT_EQ(LoadPresentedToken("")->token, "");
  EXPECT_FALSE(LoadPresentedToken(dir.File("missing")).ok());
}

TEST(Util, LabelsAndNames) {
  auto labels = ParseLabels("gpu=yes, zone = a");
  ASSERT_TRUE(labels.ok());
  EXPECT_EQ(labels->at("gpu"), "yes");
  EXPECT_EQ(labels->at("zone"), "a");
  EXPECT_FALSE(ParseLabels("novalue").ok());
  EXPECT_TRUE(IsValidName("a-b_c.1"));
  EXPECT_FALSE(IsValidName("a b"));
  EXPECT_FALSE(IsValidName(std::string(65, 'a')));
  EXPECT_EQ(SplitList(" a, ,b "), (std::vector<std::string>{"a", "b"}));
}

TEST(Util, LoopbackAddresses) {
  EXPECT_TRUE(IsLoopbackAddress("127.0.0.1:7070"));
  EXPECT_TRUE(IsLoopbackAddress("localhost:0"));
  EXPECT_TRUE(IsLoopbackAddress("[::1]:7070"));
  EXPECT_FALSE(IsLoopbackAddress("0.0.0.0:7070"));
  EXPECT_FALSE(IsLoopbackAddress("[::]:7070"));
  EXPECT_FALSE(IsLoopbackAddress("10.0.0.1:7070"));
  EXPECT_TRUE(IsLoopbackAddress("127.3.2.1:7070"));
  EXPECT_FALSE(IsLoopbackAddress("127.example.com:7070")) << "a name, not an address";
  EXPECT_FALSE(IsLoopbackAddress("127.0.0.1.example.com:7070"));
  EXPECT_FALSE(IsLoopbackAddress("[::1:7070"));
}

// Several masters: a standby's hint is followed when it is one of ours, else the next address is
// tried; a round of failures says so, once per round; one that served starts a new round.
TEST(MasterAddresses, FollowsHintsAndCountsRounds) {
  MasterAddresses masters("a:1, b:2,c:3");
  EXPECT_EQ(masters.all(), (std::vector<std::string>{"a:1", "b:2", "c:3"}));
  EXPECT_EQ(masters.current(), "a:1");
  EXPECT_FALSE(masters.Failed("a:1", "c:3"));  // named, and ours
  EXPECT_EQ(masters.current(), "c:3");
  EXPECT_FALSE(masters.Failed("c:3", "elsewhere:9"));  // named, not ours: the next
  EXPECT_EQ(masters.current(), "a:1");
  EXPECT_FALSE(masters.Failed("b:2", ""));  // not the current one: someone moved on already
  EXPECT_TRUE(masters.Failed("a:1", ""));   // the third failure in a row: a round
  EXPECT_EQ(masters.current(), "b:2");
  masters.Served("b:2");
  EXPECT_FALSE(masters.Failed("b:2", ""));
  MasterAddresses one("only:1");
  EXPECT_TRUE(one.Failed("only:1", ""));  // one address: every failure is a round
  EXPECT_EQ(one.current(), "only:1");
}

TEST(Util, BackoffGrowsWithJitterAndCaps) {
  Backoff b(std::chrono::milliseconds(100), std::chrono::milliseconds(400));
  for (int64_t hi : {100, 200, 400, 400}) {
    const auto d = b.Next().count();
    EXPECT_GE(d, hi / 2);
    EXPECT_LE(d, hi);
  }
  b.Reset();
  EXPECT_LE(b.Next().count(), 100);
}

TEST(Checksum, Crc32cAndRecordsAsStoredBefore) {
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);  // the CRC-32C check value
  EXPECT_EQ(Crc32c(""), 0u);
  // A record's checksum chains Crc32c over its framed fields: databases written by any earlier
  // build must still check out.
  auto le = [](int64_t v) {
    std::string b(8, '\0');
    for (int i = 0; i < 8; ++i) b[i] = static_cast<char>(static_cast<uint64_t>(v) >> (8 * i));
    return b;
  };
  const std::string payload(37, 'p');
  uint32_t chained = Crc32c(le(-7));
  chained = Crc32c(le(2), chained);
  chained = Crc32c("ab", chained);
  chained = Crc32c(le(37), chained);
  chained = Crc32c(payload, chained);
  EXPECT_EQ(RecordChecksum().Add(-7).Add("ab").Add(payload).value(), chained);
  EXPECT_EQ(RecordChecksum().value(), 0u);
}

TEST(InlineBytes, KeepsShortBytesInsideAndLongOnesOnTheHeap) {
  for (size_t n : {size_t{0}, size_t{1}, size_t{15}, size_t{16}, InlineBytes::kInline,
                   InlineBytes::kInline + 1, size_t{1000}}) {
    std::string s(n, '\0');
    for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(i * 7);  // NULs included
    InlineBytes b(s);
    EXPECT_EQ(b.size(), n);
    EXPECT_EQ(b.str(), s);
    const bool inside = b.view().data() >= reinterpret_cast<const char*>(&b) &&
                        b.view().data() < reinterpret_cast<const char*>(&b + 1);
    EXPECT_EQ(inside, n <= InlineBytes::kInline) << n;

    InlineBytes copy(b);
    EXPECT_EQ(copy, s);
    InlineBytes moved(std::move(copy));
    EXPECT_EQ(moved, s);
    EXPECT_EQ(copy.size(), 0u);  // NOLINT(bugprone-use-after-move): moved-from is empty
    InlineBytes assigned;
    assigned = moved;
    EXPECT_EQ(assigned, s);
    assigned = std::move(moved);
    EXPECT_EQ(assigned, s);
    assigned = assigned.view().substr(n / 2);  // from its own bytes
    EXPECT_EQ(assigned, s.substr(n / 2));
    const InlineBytes& same = assigned;
    assigned = same;
    EXPECT_EQ(assigned, s.substr(n / 2));
    assigned = std::string_view("short");
    EXPECT_EQ(assigned, "short");
  }
}

TEST(Durations, Parse) {
  EXPECT_EQ(*ParseDurationMs("250ms"), 250);
  EXPECT_EQ(*ParseDurationMs("2"), 2000);
  EXPECT_EQ(*ParseDurationMs("1.5m"), 90'000);
  EXPECT_EQ(*ParseDurationMs("1h"), 3'600'000);
  EXPECT_FALSE(ParseDurationMs("-1s").ok());
  EXPECT_FALSE(ParseDurationMs("soon").ok());
  EXPECT_FALSE(ParseDurationMs("5x").ok());
  EXPECT_FALSE(ParseDurationMs("222222222222222222222").ok());  // over 2^63 ms
  EXPECT_FALSE(ParseDurationMs("inf").ok());
}

class HandlersTest : public ::testing::Test {
 protected:
  HandlersTest() { EXPECT_TRUE(RegisterBuiltins(registry_).ok()); }

  absl::StatusOr<std::string> Run(const std::string& kind, const std::string& payload,
                                  std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    TaskContext ctx(1, 1, payload, std::chrono::steady_clock::now() + timeout, cancelled_);
    return (*registry_.Find(kind))(ctx);
  }

  Registry registry_;
  std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);
};

TEST_F(HandlersTest, SquareAnswersLikeTheSeed) {
  EXPECT_EQ(*Run("square", "2510"), "2510*2510=6300100");
  EXPECT_EQ(*Run("square", " -3 "), "-3*-3=9");
  EXPECT_TRUE(absl::IsInvalidArgument(Run("square", "12abc").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(Run("square", "").status()));
  EXPECT_TRUE(absl::IsOutOfRange(Run("square", "4000000000").status()));
}

TEST_F(HandlersTest, EchoSleepFail) {
  EXPECT_EQ(*Run("echo", "hi"), "hi");
  EXPECT_EQ(*Run("sleep", "5"), "slept 5 ms");
  EXPECT_FALSE(Run("sleep", "5000", std::chrono::milliseconds(20)).ok());
  cancelled_->store(true);
  EXPECT_FALSE(Run("sleep", "5000").ok());
  EXPECT_FALSE(Run("fail", "").ok());
}

TEST(Util, TextFromOutsideBytes) {
  EXPECT_TRUE(IsValidUtf8("plain ascii"));
  EXPECT_TRUE(IsValidUtf8("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80"));
  for (std::string bad :
       {"\xC3\x28", "\xC0\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80", "\xE2\x82", "\xFF"}) {
    EXPECT_FALSE(IsValidUtf8(bad)) << Quote(bad);
    EXPECT_TRUE(IsValidUtf8(ValidUtf8(bad))) << Quote(bad);
  }
  EXPECT_EQ(ValidUtf8("a\xC3\x28"
                      "b"),
            "a\xEF\xBF\xBD(b");
  EXPECT_EQ(ValidUtf8("caf\xC3\xA9"), "caf\xC3\xA9");
  EXPECT_EQ(Quote("ok \\ \xC3\x28\n"), "ok \\x5C \\xC3(\\x0A");
  EXPECT_EQ(Quote(std::string(100, 'x'), 4), "xxxx... (100 bytes)");
  // For logs and terminals: controls escaped (an ANSI escape, a forged new line, C1), text kept.
  EXPECT_EQ(Printable("w1\x1B[2Jok"), "w1\\x1B[2Jok");
  EXPECT_EQ(Printable("a\nb\x7F"), "a\\x0Ab\\x7F");
  EXPECT_EQ(Printable("caf\xC3\xA9 \xC2\x9B"), "caf\xC3\xA9 \\xC2\\x9B");
  EXPECT_EQ(Printable("\xC3\x28"), "\\xC3(");
}

TEST_F(HandlersTest, ErrorsNeverCarryRawPayloadBytes) {
  for (const char* kind : {"square", "sleep", "fail"}) {
    absl::StatusOr<std::string> r = Run(kind, "\xC3\x28");
    ASSERT_FALSE(r.ok()) << kind;
    EXPECT_TRUE(IsValidUtf8(std::string(r.status().message()))) << kind << ": " << r.status();
    EXPECT_NE(r.status().message().find("\\xC3("), std::string::npos) << r.status();
  }
}

TEST_F(HandlersTest, RegistryRejectsDuplicatesAndBadNames) {
  EXPECT_FALSE(registry_.Register("square", nullptr).ok());
  EXPECT_FALSE(registry_.Register("bad name", nullptr).ok());
  EXPECT_EQ(registry_.Kinds(), (std::vector<std::string>{"echo", "fail", "sleep", "square"}));
}

}  // namespace
}  // namespace taskmaster
