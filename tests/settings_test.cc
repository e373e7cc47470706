// Settings (common/settings) and the master's declaration of them (master/config): the file, the
// environment and the flags each over the one before, errors naming the key and line or the
// variable, credential paths, and --print-config read back.
#include "common/settings.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/match.h"
#include "absl/strings/str_replace.h"
#include "harness.h"
#include "master/config.h"
#include "tests/expect.h"

namespace taskmaster {
namespace {

// A master's settings from flags, a file's text and an environment, in the order the master
// reads them.
struct Parsed {
  MasterConfig config;
  Settings settings{"TASKMASTER_", {"ADDR", "TOKEN"}};
  CLI::App app{"test", "taskmaster"};
  absl::Status status;

  Parsed(const std::string& file_text, std::vector<std::string> env,
         std::vector<std::string> flags) {
    DeclareMasterSettings(&config, &settings);
    settings.AddFlags(app);
    std::vector<std::string> argv = {"taskmaster"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    std::vector<char*> args;
    for (std::string& a : argv) args.push_back(a.data());
    try {
      app.parse(static_cast<int>(args.size()), args.data());
    } catch (const CLI::ParseError& e) {
      status = absl::InvalidArgumentError(e.what());
      return;
    }
    testing::TempDir dir;
    if (!file_text.empty()) {
      testing::WriteFile(dir.File("master.toml"), file_text);
      status = settings.ReadFile(dir.File("master.toml"));
      if (!status.ok()) return;
    }
    std::vector<char*> environ;
    for (std::string& e : env) environ.push_back(e.data());
    environ.push_back(nullptr);
    status = settings.ReadEnvironment(environ.data());
    if (!status.ok()) return;
    status = settings.ResolvePaths();
    if (status.ok()) Settle(&config);
  }
};

// Sets an environment variable for the scope of a test, whatever way it leaves.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) { setenv(name, value, 1); }
  ~ScopedEnv() { unsetenv(name_); }

 private:
  const char* name_;
};

TEST(MasterSettings, FileThenEnvironmentThenFlags) {
  Parsed p(R"(
listen = "0.0.0.0:7070"
lease_timeout_ms = 9000
heartbeat_ms = 1500
store = "memory"
tick_ms = 20
allow_plaintext = true
)",
           {"TASKMASTER_LEASE_TIMEOUT_MS=8000", "TASKMASTER_HEARTBEAT_MS=1200",
            "TASKMASTER_ADDR=ignored:1", "PATH=/bin"},
           {"--heartbeat-ms", "1000"});
  ASSERT_TRUE(p.status.ok()) << p.status;
  const MasterOptions& o = p.config.master;
  EXPECT_EQ(o.listen, "0.0.0.0:7070");              // the file
  EXPECT_EQ(o.broker.lease_timeout_ms, 8000);       // the environment over the file
  EXPECT_EQ(o.broker.heartbeat_interval_ms, 1000);  // the flag over both
  EXPECT_EQ(o.store, "memory");
  EXPECT_TRUE(o.allow_plaintext);
  EXPECT_EQ(o.tick, std::chrono::milliseconds(20));  // settled from tick_ms
  EXPECT_EQ(o.broker.default_max_attempts, BrokerOptions().default_max_attempts);  // default

  const std::string printed = p.settings.Format();
  EXPECT_CONTAINS(printed, "listen = '0.0.0.0:7070'  # from the config file\n");
  EXPECT_CONTAINS(printed, "lease_timeout_ms = 8000  # from TASKMASTER_LEASE_TIMEOUT_MS\n");
  EXPECT_CONTAINS(printed, "heartbeat_ms = 1000  # from --heartbeat-ms\n");
  EXPECT_CONTAINS(printed, "default_max_attempts = 3\n");
}

TEST(MasterSettings, EveryFlagHasAKeyAndPrintConfigReadsBack) {
  Parsed first("", {},
               {"--listen", "127.0.0.2:7171", "--sync", "normal", "--tokens", "/t x\"y",
                "--max-batch", "77", "--insecure"});
  ASSERT_TRUE(first.status.ok()) << first.status;
  const std::string printed = first.settings.Format();
  // Every option of the command line, but for the flags that are actions, is a key printed.
  for (const CLI::Option* option : first.app.get_options()) {
    const std::string flag = option->get_name();
    if (flag == "--help") continue;
    std::string key = flag.substr(2);
    std::replace(key.begin(), key.end(), '-', '_');
    EXPECT_CONTAINS(printed, "\n" + key + " = ");
  }
  Parsed second(printed, {}, {});
  ASSERT_TRUE(second.status.ok()) << second.status << "\n" << printed;
  EXPECT_EQ(second.config.master.listen, "127.0.0.2:7171");
  EXPECT_EQ(second.config.master.tokens_file, "/t x\"y");
  EXPECT_EQ(second.config.master.sqlite.sync, SyncMode::kNormal);
  EXPECT_EQ(second.config.master.broker.max_batch, 77u);
  EXPECT_TRUE(second.config.master.insecure);
  // The same settings, now all from the file.
  std::string again = second.settings.Format();
  absl::StrReplaceAll({{"  # from the config file", ""}}, &again);
  std::string once = printed;
  for (const char* flag : {"--listen", "--sync", "--tokens", "--max-batch", "--insecure"}) {
    absl::StrReplaceAll({{std::string("  # from ") + flag, ""}}, &once);
  }
  EXPECT_EQ(again, once);
}

TEST(MasterSettings, FileErrorsNameKeyAndLine) {
  Parsed p(R"(listen = "127.0.0.1:1"
lease_timeout_ms = "30s"
store = "cassandra"
tick_ms = 0
lease_timout_ms = 5
[tls]
cert = "x"
)",
           {}, {});
  ASSERT_FALSE(p.status.ok());
  const std::string error(p.status.message());
  EXPECT_CONTAINS(error, "master.toml:2: lease_timeout_ms must be an integer, not a string");
  EXPECT_CONTAINS(error, "master.toml:3: store: must be one of sqlite, postgres, memory\n");
  EXPECT_CONTAINS(error, "master.toml:4: tick_ms: must be from 1 to 60000");
  EXPECT_CONTAINS(error, "master.toml:5: unknown key 'lease_timout_ms'");
  EXPECT_CONTAINS(error, "master.toml:6: unknown key 'tls'");
}

TEST(MasterSettings, EnvironmentErrorsNameTheVariableNotItsValue) {
  Parsed p("",
           {"TASKMASTER_LEASE_TIMEOUT_MS=soon", "TASKMASTER_MAX_BATCH=-4",
            "TASKMASTER_INSECURE=maybe", "TASKMASTER_SYNC=sometimes"},
           {});
  ASSERT_FALSE(p.status.ok());
  const std::string error(p.status.message());
  EXPECT_CONTAINS(error, "environment variable TASKMASTER_LEASE_TIMEOUT_MS: must be an integer");
  EXPECT_CONTAINS(error, "environment variable TASKMASTER_MAX_BATCH: must be from 1 to 10000000");
  EXPECT_CONTAINS(error, "environment variable TASKMASTER_INSECURE: must be true or false");
  EXPECT_CONTAINS(error, "TASKMASTER_SYNC: must be one of full, normal");
  EXPECT_FALSE(absl::StrContains(error, "soon"));
  EXPECT_FALSE(absl::StrContains(error, "sometimes"));
}

TEST(MasterSettings, FlagsAreCheckedAsTheFileIs) {
  Parsed p("", {}, {"--tick-ms", "0"});
  EXPECT_FALSE(p.status.ok());
  EXPECT_CONTAINS(std::string(p.status.message()), "--tick-ms");
  Parsed q("", {}, {"--store", "cassandra"});
  EXPECT_FALSE(q.status.ok());
}

TEST(MasterSettings, CredentialsDirectoryIsAPath) {
  std::optional<ScopedEnv> credentials(std::in_place, "CREDENTIALS_DIRECTORY",
                                       "/run/credentials/taskmaster.service");
  Parsed p("tokens = \"$CREDENTIALS_DIRECTORY/tokens\"\n",
           {"TASKMASTER_TLS_KEY=${CREDENTIALS_DIRECTORY}/server.key"},
           {"--tls-cert", "/etc/taskmaster/server.pem"});
  ASSERT_TRUE(p.status.ok()) << p.status;
  EXPECT_EQ(p.config.master.tokens_file, "/run/credentials/taskmaster.service/tokens");
  EXPECT_EQ(p.config.master.tls.key_file, "/run/credentials/taskmaster.service/server.key");
  EXPECT_EQ(p.config.master.tls.cert_file, "/etc/taskmaster/server.pem");
  credentials.reset();
  Parsed q("tokens = \"$CREDENTIALS_DIRECTORY/tokens\"\n", {}, {});
  ASSERT_FALSE(q.status.ok());
  EXPECT_CONTAINS(std::string(q.status.message()),
                  "tokens: '$CREDENTIALS_DIRECTORY/tokens' "
                  "names $CREDENTIALS_DIRECTORY, which is not set");
  // Only a whole leading name counts.
  Parsed r("tokens = \"$CREDENTIALS_DIRECTORYX/tokens\"\n", {}, {});
  ASSERT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(r.config.master.tokens_file, "$CREDENTIALS_DIRECTORYX/tokens");
}

TEST(MasterSettings, FlagsConvertAsTheEnvironmentDoes) {
  // No octal, no hex, no saturation: what would wrap is refused.
  Parsed octal("", {}, {"--max-batch", "010"});
  ASSERT_TRUE(octal.status.ok()) << octal.status;
  EXPECT_EQ(octal.config.master.broker.max_batch, 10u);
  for (const char* bad : {"0x10", "18446744073709551615", "99999999999999999999", "-1", "1e3"}) {
    Parsed p("", {}, {"--max-open-jobs", bad});
    EXPECT_FALSE(p.status.ok()) << bad;
    Parsed e("", {std::string("TASKMASTER_MAX_OPEN_JOBS=") + bad}, {});
    EXPECT_FALSE(e.status.ok()) << bad;
  }
  Parsed largest("", {}, {"--max-open-jobs", "9223372036854775807"});
  ASSERT_TRUE(largest.status.ok()) << largest.status;
  EXPECT_CONTAINS(largest.settings.Format(), "max_open_jobs = 9223372036854775807  # from");
}

TEST(MasterSettings, AFlagBeatsTheFileAndTheEnvironmentThatAreReadAfterIt) {
  Parsed p("insecure = true\nsync = \"normal\"\n",
           {"TASKMASTER_SYNC=full", "TASKMASTER_INSECURE=1"},
           {"--insecure=false", "--sync", "normal"});
  ASSERT_TRUE(p.status.ok()) << p.status;
  EXPECT_FALSE(p.config.master.insecure);
  EXPECT_EQ(p.config.master.sqlite.sync, SyncMode::kNormal);
  EXPECT_CONTAINS(p.settings.Format(), "insecure = false  # from --insecure\n");
  // Still checked in the file, though the flag wins.
  Parsed q("max_batch = \"many\"\n", {}, {"--max-batch", "5"});
  EXPECT_FALSE(q.status.ok());
}

TEST(MasterSettings, UnknownVariablesAreListedButForOtherPrograms) {
  Parsed p("",
           {"TASKMASTER_LEASE_TIMEOUT=5", "TASKMASTER_ADDR=a:1", "TASKMASTER_TOKEN=t",
            "TASKMASTER_CONFIG=/x", "OTHER_LEASE=1"},
           {});
  ASSERT_TRUE(p.status.ok()) << p.status;
  EXPECT_EQ(p.settings.unknown_environment(), std::vector<std::string>{"TASKMASTER_LEASE_TIMEOUT"});
}

}  // namespace
}  // namespace taskmaster
