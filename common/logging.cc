#include "common/logging.h"

#include <unistd.h>

#include <chrono>
#include <ctime>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/util.h"
#include "spdlog/pattern_formatter.h"
#include "spdlog/sinks/stdout_color_sinks.h"

namespace taskmaster {
namespace {

std::string_view View(spdlog::string_view_t s) { return {s.data(), s.size()}; }

void Append(std::string_view s, spdlog::memory_buf_t& dest) {
  dest.append(s.data(), s.data() + s.size());
}

// The text format's message: escaped by Printable, whichever call site logged it.
class PrintableMessage final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    Append(Printable(View(msg.payload)), dest);
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<PrintableMessage>();
  }
};

// `s` as a JSON string, quotes included. Beyond what JSON requires, DEL and the C1 controls
// (U+0080..U+009F) are escaped too, so that a terminal following the log never receives one.
void AppendJsonString(std::string_view s, spdlog::memory_buf_t& dest) {
  const std::string valid = ValidUtf8(s);
  auto unicode_escape = [&dest](unsigned char c) {
    fmt::format_to(fmt::appender(dest), "\\u{:04x}", c);
  };
  dest.push_back('"');
  for (size_t i = 0; i < valid.size(); ++i) {
    const auto c = static_cast<unsigned char>(valid[i]);
    if (c == '"' || c == '\\') {
      dest.push_back('\\');
      dest.push_back(static_cast<char>(c));
    } else if (c == '\n') {
      Append("\\n", dest);
    } else if (c == '\r') {
      Append("\\r", dest);
    } else if (c == '\t') {
      Append("\\t", dest);
    } else if (c < 0x20 || c == 0x7F) {
      unicode_escape(c);
    } else if (c == 0xC2 && i + 1 < valid.size() &&
               static_cast<unsigned char>(valid[i + 1]) < 0xA0) {
      // In valid UTF-8, C2 followed by 80..9F is a C1 control, U+0080..U+009F.
      unicode_escape(static_cast<unsigned char>(valid[++i]));
    } else {
      dest.push_back(static_cast<char>(c));
    }
  }
  dest.push_back('"');
}

class JsonFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    const auto second = std::chrono::floor<std::chrono::seconds>(msg.time);
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(msg.time - second);
    const std::time_t t = std::chrono::system_clock::to_time_t(second);
    std::tm utc{};
    gmtime_r(&t, &utc);
    fmt::format_to(fmt::appender(dest),
                   R"({{"time":"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z","level":)",
                   utc.tm_year + 1900, utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min,
                   utc.tm_sec, ms.count());
    AppendJsonString(View(spdlog::level::to_string_view(msg.level)), dest);
    Append(R"(,"component":)", dest);
    AppendJsonString(View(msg.logger_name), dest);
    fmt::format_to(fmt::appender(dest), R"(,"pid":{},"msg":)", pid_);
    AppendJsonString(View(msg.payload), dest);
    Append("}\n", dest);
  }
  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<JsonFormatter>();
  }

 private:
  const pid_t pid_ = getpid();
};

}  // namespace

absl::Status SetupLogging(const std::string& level, const std::string& format) {
  const spdlog::level::level_enum parsed = spdlog::level::from_str(level);
  if (parsed == spdlog::level::off && level != "off") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown log level '", level, "' (trace, debug, info, warn, error, off)"));
  }
  if (format != "text" && format != "json") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown log format '", format, "' (text, json)"));
  }
  spdlog::set_level(parsed);
  spdlog::set_formatter(MakeLogFormatter(format == "json" ? LogFormat::kJson : LogFormat::kText));
  return absl::OkStatus();
}

std::unique_ptr<spdlog::formatter> MakeLogFormatter(LogFormat format) {
  if (format == LogFormat::kJson) return std::make_unique<JsonFormatter>();
  auto text = std::make_unique<spdlog::pattern_formatter>();
  text->add_flag<PrintableMessage>('*').set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [%n] %*");
  return text;
}

std::shared_ptr<spdlog::logger> GetLogger(const std::string& name) {
  // Looking up and registering are two steps of spdlog's registry: two threads asking for a new
  // name at once would both register it, and the second would throw.
  static absl::Mutex mu;
  absl::MutexLock lock(&mu);
  if (auto existing = spdlog::get(name)) return existing;
  auto logger = spdlog::stderr_color_mt(name);
  logger->set_level(spdlog::get_level());
  return logger;
}

}  // namespace taskmaster
