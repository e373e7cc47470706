// The TOML reader (common/config) and the worker's config file (worker/config): keys over
// defaults, errors naming the key and line, unknown keys, and --print-config read back.
#include "common/config.h"

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "harness.h"
#include "tests/expect.h"
#include "worker/config.h"

namespace taskmaster {
namespace {

absl::StatusOr<WorkerConfig> LoadText(const std::string& text) {
  testing::TempDir dir;
  const std::string path = dir.File("worker.toml");
  testing::WriteFile(path, text);
  WorkerConfig config;
  if (absl::Status s = LoadWorkerConfig(path, &config); !s.ok()) return s;
  return config;
}

std::string ErrorOf(const std::string& text) {
  absl::StatusOr<WorkerConfig> config = LoadText(text);
  EXPECT_FALSE(config.ok()) << text;
  return config.ok() ? "" : std::string(config.status().message());
}

TEST(ConfigFile, TakesKeysByTypeAndKeepsDefaults) {
  absl::StatusOr<ConfigFile> file = ConfigFile::Parse(R"(
name = "w1"
threads = 4
on = true
list = ["a", "b"]
[section]
codes = [2, 3]
labels = { zone = "eu" }
)",
                                                      "t.toml");
  ASSERT_TRUE(file.ok()) << file.status();
  ConfigTable root = file->Root();
  std::string name, absent = "kept";
  int64_t threads = 0;
  bool on = false;
  std::vector<std::string> list;
  root.Get("name", &name);
  root.Get("absent", &absent);
  root.Get("threads", &threads);
  root.Get("on", &on);
  root.Get("list", &list);
  std::optional<ConfigTable> section = root.Table("section");
  ASSERT_TRUE(section);
  std::vector<int64_t> codes;
  std::map<std::string, std::string> labels;
  section->Get("codes", &codes);
  section->Get("labels", &labels);
  EXPECT_TRUE(file->Finish().ok()) << file->Finish();
  EXPECT_EQ(name, "w1");
  EXPECT_EQ(absent, "kept");
  EXPECT_EQ(threads, 4);
  EXPECT_TRUE(on);
  EXPECT_EQ(list, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(codes, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(labels.at("zone"), "eu");
}

TEST(ConfigFile, SyntaxErrorNamesFileLineAndColumn) {
  absl::StatusOr<ConfigFile> file = ConfigFile::Parse("a = 1\nb = = 2\n", "bad.toml");
  ASSERT_FALSE(file.ok());
  EXPECT_CONTAINS(std::string(file.status().message()), "bad.toml:2:");
}

TEST(ConfigFile, MissingFileIsNotFound) {
  absl::StatusOr<ConfigFile> file = ConfigFile::Load("/nonexistent/taskmaster.toml");
  ASSERT_FALSE(file.ok());
  EXPECT_CONTAINS(std::string(file.status().message()), "/nonexistent/taskmaster.toml");
}

TEST(WorkerConfig, ReadsEveryPart) {
  absl::StatusOr<WorkerConfig> config = LoadText(R"(
master = "127.0.0.1:7070"
token_file = "/etc/taskmaster/work.token"
name = "w1"
queues = ["default", "images"]
prefetch = 4
drain_timeout_ms = 0
builtins = false
plugins = ["/opt/p.so"]
[labels]
zone = "eu"
[tls]
ca = "/etc/ca.pem"
[pools.cpu]
threads = 2
kinds = ["square"]
[pools.io]
threads = 64
[exec.upper]
command = ["tr", "a-z", "A-Z"]
env = { LANG = "C.UTF-8", API_TOKEN = "hunter2" }
pass_env = ["PATH"]
kill_grace_ms = 500
max_output_bytes = 1000
permanent_exit_codes = [2]
progress_fd = 3
[exec.upper.limits]
open_files = 64
nice = 5
[exec.count]
shell = true
command = "wc -c"
)");
  ASSERT_TRUE(config.ok()) << config.status();
  const WorkerOptions& w = config->worker;
  EXPECT_EQ(w.master.address, "127.0.0.1:7070");
  EXPECT_EQ(config->token_file, "/etc/taskmaster/work.token");
  EXPECT_EQ(w.name, "w1");
  EXPECT_EQ(w.queues, (std::vector<std::string>{"default", "images"}));
  EXPECT_EQ(w.prefetch, 4);
  EXPECT_EQ(w.drain_timeout.count(), 0);
  EXPECT_FALSE(config->builtins);
  EXPECT_EQ(w.labels.at("zone"), "eu");
  EXPECT_EQ(w.master.tls_ca_file, "/etc/ca.pem");
  ASSERT_EQ(w.pools.size(), 2u);
  ASSERT_EQ(config->exec.size(), 2u);
  const auto& [kind, spec] = config->exec[1];
  EXPECT_EQ(kind, "upper");
  EXPECT_EQ(spec.argv, (std::vector<std::string>{"tr", "a-z", "A-Z"}));
  EXPECT_EQ(spec.kill_grace.count(), 500);
  EXPECT_EQ(spec.max_output, 1000u);
  EXPECT_EQ(spec.permanent_exit_codes, std::set<int>{2});
  EXPECT_EQ(spec.progress_fd, 3);
  EXPECT_EQ(spec.limits.open_files, 64u);
  EXPECT_EQ(spec.limits.nice, 5);
  EXPECT_TRUE(config->exec[0].second.shell);
  EXPECT_EQ(config->exec[0].second.argv, std::vector<std::string>{"wc -c"});

  // What --print-config prints reads back the same, with the secret masked.
  const std::string printed = FormatWorkerConfig(*config, /*token_from_env=*/false);
  EXPECT_FALSE(absl::StrContains(printed, "hunter2")) << printed;
  absl::StatusOr<WorkerConfig> again = LoadText(printed);
  ASSERT_TRUE(again.ok()) << again.status() << "\n" << printed;
  EXPECT_EQ(FormatWorkerConfig(*again, false), printed);
  EXPECT_EQ(again->exec.size(), 2u);
  EXPECT_EQ(again->worker.pools.size(), 2u);
}

TEST(WorkerConfig, UnknownKeysAndWrongTypesNameKeyAndLine) {
  EXPECT_CONTAINS(ErrorOf("master = \"a:1\"\nthreadz = 2\n"), ":2: unknown key 'threadz'");
  EXPECT_CONTAINS(ErrorOf("threads = \"four\"\n"), ":1: threads must be an integer, not a string");
  EXPECT_CONTAINS(ErrorOf("\n[exec.x]\ncommand = [\"/bin/cat\"]\ntimeout = 3\n"),
                  ":4: unknown key 'exec.x.timeout'");
  EXPECT_CONTAINS(ErrorOf("[exec.x]\ncommand = \"cat\"\n"),
                  "exec.x.command must be an array of strings, not a string");
  EXPECT_CONTAINS(ErrorOf("[exec.x]\nshell = true\n"), "exec.x.command: is required");
  EXPECT_CONTAINS(ErrorOf("threads = 0\n"), ":1: threads: must be positive");
  EXPECT_CONTAINS(ErrorOf("queues = [\"a b\"]\n"), "queues: queue name");
  EXPECT_CONTAINS(ErrorOf("[pools.cpu]\nkinds = [1]\n"),
                  ":2: pools.cpu.kinds must be an array of strings, not an integer");
  EXPECT_CONTAINS(ErrorOf("[exec.x]\ncommand = [\"cat\"]\n[exec.x.limits]\nnice = 40\n"),
                  ":4: exec.x.limits.nice: must be from -20 to 19");
  EXPECT_CONTAINS(ErrorOf("[exec.x]\ncommand = [\"cat\"]\nprogress_fd = 1\n"),
                  "exec.x.progress_fd: must be 3 or more");
  // Every problem is reported, not only the first.
  const std::string both = ErrorOf("a = 1\nthreads = true\n");
  EXPECT_CONTAINS(both, "unknown key 'a'");
  EXPECT_CONTAINS(both, "threads must be an integer");
}

TEST(ConfigSecrets, NamesThatLookSecret) {
  EXPECT_TRUE(LooksSecret("API_TOKEN"));
  EXPECT_TRUE(LooksSecret("db_password"));
  EXPECT_TRUE(LooksSecret("AWS_SECRET_ACCESS_KEY"));
  EXPECT_FALSE(LooksSecret("LANG"));
  EXPECT_FALSE(LooksSecret("PATH"));
}

}  // namespace
}  // namespace taskmaster
