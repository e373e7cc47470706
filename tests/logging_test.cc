// Unit tests of the log formats: what one message becomes in text and in JSON, however hostile
// the strings in it; and loggers asked for from several threads.
#include "common/logging.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <latch>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "common/util.h"
#include "nlohmann/json.hpp"

namespace taskmaster {
namespace {

using namespace std::chrono_literals;

// 2026-12-02T16:05:36.123Z.
const spdlog::log_clock::time_point kTime{
    std::chrono::sys_days{std::chrono::year{2026} / 12 / 2}.time_since_epoch() + 16h + 5min + 36s +
    123ms};

// What `format` makes of `message`, logged at info by the component "master" at kTime.
std::string Format(LogFormat format, std::string_view message) {
  const spdlog::details::log_msg msg(kTime, spdlog::source_loc{}, "master", spdlog::level::info,
                                     spdlog::string_view_t(message.data(), message.size()));
  spdlog::memory_buf_t out;
  MakeLogFormatter(format)->format(msg, out);
  return std::string(out.data(), out.size());
}

// Strings a peer could send: a forged next line (text and JSON), quotes and backslashes,
// terminal escapes (ESC, CSI as a C1 control, DEL), a NUL, bytes that are not UTF-8.
const std::vector<std::string> kHostile = {
    "w1\n2026-12-02T16:05:36.123 info [master] forged",
    "w1\r\n{\"time\":\"2026-12-02T16:05:36.123Z\",\"level\":\"info\",\"msg\":\"forged\"}",
    "quote \" backslash \\ brace }",
    "\x1B[2J\x1B]0;title\x07 cleared \x7F del \xC2\x9B"
    "31m csi",
    std::string("nul \0 tab \t", 11),
    "bad \xFF\xFE utf-8 \xC3 cut \xED\xA0\x80 surrogate caf\xC3\xA9",
};

// True when `line` ends with its only newline and holds no other control character (C0, DEL,
// C1) and nothing that is not UTF-8: one line, safe on a terminal.
bool IsOneSafeLine(const std::string& line) {
  if (line.empty() || line.back() != '\n') return false;
  const std::string body = line.substr(0, line.size() - 1);
  return IsValidUtf8(body) && Printable(body) == body;
}

TEST(Logging, JsonIsOneObjectWithTimeLevelComponentPidAndMessage) {
  const std::string line = Format(LogFormat::kJson, "listening on 127.0.0.1:7070");
  ASSERT_TRUE(IsOneSafeLine(line)) << line;
  const nlohmann::json j = nlohmann::json::parse(line);
  EXPECT_EQ(j.at("time"), "2026-12-02T16:05:36.123Z");
  EXPECT_EQ(j.at("level"), "info");
  EXPECT_EQ(j.at("component"), "master");
  EXPECT_EQ(j.at("pid"), getpid());
  EXPECT_EQ(j.at("msg"), "listening on 127.0.0.1:7070");
  EXPECT_EQ(j.size(), 5u) << line;
}

TEST(Logging, TextIsTheTimeTheLevelTheComponentAndTheMessage) {
  const std::string line = Format(LogFormat::kText, "listening on 127.0.0.1:7070");
  // Local time, to the millisecond.
  static const std::regex shape(
      R"(\d{4}-\d\d-\d\dT\d\d:\d\d:36\.123 info \[master\] listening on 127\.0\.0\.1:7070\n)");
  EXPECT_TRUE(std::regex_match(line, shape)) << line;
}

TEST(Logging, HostileStringsStayOneEscapedLineInJson) {
  for (const std::string& hostile : kHostile) {
    const std::string line = Format(LogFormat::kJson, "worker " + hostile + " attached");
    EXPECT_TRUE(IsOneSafeLine(line)) << line;
    nlohmann::json j;
    ASSERT_NO_THROW(j = nlohmann::json::parse(line)) << line;
    // The exact text, but for the bytes that were not UTF-8 (each now U+FFFD).
    EXPECT_EQ(j.at("msg"), "worker " + ValidUtf8(hostile) + " attached") << line;
    EXPECT_EQ(j.at("component"), "master");
  }
}

TEST(Logging, HostileStringsStayOneEscapedLineInText) {
  for (const std::string& hostile : kHostile) {
    const std::string line = Format(LogFormat::kText, "worker " + hostile + " attached");
    EXPECT_TRUE(IsOneSafeLine(line)) << line;
    EXPECT_TRUE(line.ends_with("[master] worker " + Printable(hostile) + " attached\n")) << line;
  }
  EXPECT_TRUE(
      Format(LogFormat::kText, kHostile[0])
          .ends_with(" info [master] w1\\x0A2026-12-02T16:05:36.123 info [master] forged\n"));
  EXPECT_TRUE(
      Format(LogFormat::kText, "\x1B[2J \xC2\x9B \xFF").ends_with("\\x1B[2J \\xC2\\x9B \\xFF\n"));
}

TEST(Logging, SetupRefusesAnUnknownLevelOrFormat) {
  const absl::Status format = SetupLogging("info", "xml");
  EXPECT_EQ(format.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(format.message(), "unknown log format 'xml' (text, json)");
  EXPECT_EQ(SetupLogging("loud", "text").code(), absl::StatusCode::kInvalidArgument);
}

// Threads that ask for the same new logger at once (a master's partitions open their stores
// together) all get it: none throws because another registered the name first.
TEST(Logging, ThreadsAskingForANewLoggerAtOnceShareIt) {
  constexpr int kThreads = 4;
  constexpr int kNames = 200;
  std::atomic<int> failures{0};
  for (int n = 0; n < kNames; ++n) {
    const std::string name = "logging-test-" + std::to_string(n);
    std::latch start(kThreads);
    std::vector<std::shared_ptr<spdlog::logger>> got(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        start.arrive_and_wait();
        try {
          got[t] = GetLogger(name);
        } catch (const std::exception&) {
          failures.fetch_add(1);
        }
      });
    }
    for (std::thread& t : threads) t.join();
    for (int t = 1; t < kThreads; ++t) EXPECT_EQ(got[t].get(), got[0].get()) << name;
  }
  EXPECT_EQ(failures.load(), 0) << "GetLogger threw when another thread registered the name";
}

}  // namespace
}  // namespace taskmaster
