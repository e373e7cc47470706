// Settings: one declaration per setting, read from a file, the environment and flags in turn.
#include "common/settings.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <sstream>
#include <utility>

#include "CLI/CLI.hpp"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "toml++/toml.h"

extern char** environ;

namespace taskmaster {
namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

std::string FlagName(const std::string& key) {
  return "--" + absl::StrReplaceAll(key, {{"_", "-"}});
}

}  // namespace

Settings::Setting::Setting(std::string key, Target target, std::string help)
    : key_(std::move(key)), target_(target), help_(std::move(help)), min_(0), max_(kInt64Max) {
  // Counts, sizes and durations are never negative: a setting that allows it says so (Range).
  if (std::holds_alternative<int*>(target_)) max_ = std::numeric_limits<int>::max();
}

Settings::Setting& Settings::Setting::Range(int64_t min, int64_t max) {
  min_ = min;
  max_ = max;
  return *this;
}

Settings::Setting& Settings::Setting::Choices(std::vector<std::string> choices) {
  choices_ = std::move(choices);
  return *this;
}

Settings::Setting& Settings::Setting::Path() {
  path_ = true;
  return *this;
}

int64_t Settings::Setting::Integer() const {
  if (auto* p = std::get_if<int64_t*>(&target_)) return **p;
  if (auto* p = std::get_if<int*>(&target_)) return **p;
  return static_cast<int64_t>(*std::get<size_t*>(target_));
}

void Settings::Setting::SetInteger(int64_t value) {
  if (auto* p = std::get_if<int64_t*>(&target_)) {
    **p = value;
  } else if (auto* p = std::get_if<int*>(&target_)) {
    **p = static_cast<int>(value);  // Range keeps it within int
  } else {
    *std::get<size_t*>(target_) = static_cast<size_t>(value);  // Range keeps it non-negative
  }
}

std::string Settings::Setting::ChoiceError(const std::string& value) const {
  if (choices_.empty() || std::find(choices_.begin(), choices_.end(), value) != choices_.end()) {
    return "";
  }
  return absl::StrCat("must be one of ", absl::StrJoin(choices_, ", "));
}

std::string Settings::Setting::RangeError() const {
  if (max_ == kInt64Max) return absl::StrCat("must be ", min_, " or more");
  return absl::StrCat("must be from ", min_, " to ", max_);
}

absl::Status Settings::Setting::Parse(const std::string& text) {
  if (auto* p = std::get_if<std::string*>(&target_)) {
    if (std::string problem = ChoiceError(text); !problem.empty()) {
      return absl::InvalidArgumentError(problem);
    }
    **p = text;
  } else if (auto* p = std::get_if<bool*>(&target_)) {
    const std::string lower = absl::AsciiStrToLower(text);
    if (lower == "true" || lower == "1" || lower == "yes" || lower == "on") {
      **p = true;
    } else if (lower == "false" || lower == "0" || lower == "no" || lower == "off") {
      **p = false;
    } else {
      return absl::InvalidArgumentError("must be true or false");
    }
  } else {
    int64_t value = 0;
    if (!absl::SimpleAtoi(text, &value)) return absl::InvalidArgumentError("must be an integer");
    // Checked before it is set: an int or a size_t must not wrap on the way in.
    if (value < min_ || value > max_) return absl::InvalidArgumentError(RangeError());
    SetInteger(value);
  }
  return absl::OkStatus();
}

std::string Settings::Setting::FormatValue() const {
  std::ostringstream out;
  if (auto* p = std::get_if<std::string*>(&target_)) {
    out << toml::value<std::string>(**p);
  } else if (auto* p = std::get_if<bool*>(&target_)) {
    out << (**p ? "true" : "false");
  } else {
    out << Integer();
  }
  return out.str();
}

void Settings::AddFlags(CLI::App& app) {
  for (const std::unique_ptr<Setting>& s : settings_) {
    const std::string flag = FlagName(s->key_);
    Setting* setting = s.get();
    if (auto* p = std::get_if<bool*>(&s->target_)) {
      // --insecure, or --insecure=false to override the file or the environment.
      app.add_flag_function(
          flag,
          [setting, target = *p](int64_t count) {
            *target = count > 0;
            setting->source_ = Source::kFlag;
          },
          s->help_);
      continue;
    }
    // Through the same Parse as the environment: one conversion and one check for both (CLI11's
    // own would take 010 as octal and saturate what overflows).
    app.add_option_function<std::string>(
           flag,
           [setting, flag](const std::string& text) {
             if (absl::Status status = setting->Parse(text); !status.ok()) {
               throw CLI::ValidationError(flag, std::string(status.message()));
             }
             setting->source_ = Source::kFlag;
           },
           s->help_)
        ->default_str(s->FormatValue());
  }
}

absl::Status Settings::ReadFile(const std::string& path) {
  absl::StatusOr<ConfigFile> file = ConfigFile::Load(path);
  if (!file.ok()) return file.status();
  ConfigTable root = file->Root();
  for (const std::unique_ptr<Setting>& s : settings_) {
    // A key the flags gave is still read, so that its type and value are checked and it is not
    // "unknown", but the flag's value stays.
    const bool keep = s->source_ == Source::kFlag;
    bool set = false;
    if (auto* p = std::get_if<std::string*>(&s->target_)) {
      std::string value;
      if (root.Get(s->key_, &value)) {
        if (std::string problem = s->ChoiceError(value); !problem.empty()) {
          root.Error(s->key_, problem);
        } else if (!keep) {
          **p = std::move(value);
          set = true;
        }
      }
    } else if (auto* p = std::get_if<bool*>(&s->target_)) {
      bool value = false;
      if (root.Get(s->key_, &value) && !keep) {
        **p = value;
        set = true;
      }
    } else if (std::optional<int64_t> value = root.GetInt(s->key_, s->min_, s->max_)) {
      if (!keep) s->SetInteger(*value);
      set = !keep;
    }
    if (set) s->source_ = Source::kFile;
  }
  return file->Finish();
}

std::string Settings::EnvName(const std::string& key) const {
  return env_prefix_ + absl::AsciiStrToUpper(key);
}

absl::Status Settings::ReadEnvironment(char** environ) {
  std::vector<std::string> problems;
  unknown_environment_.clear();
  for (char** entry = environ; entry && *entry; ++entry) {
    const std::string_view text = *entry;
    const size_t eq = text.find('=');
    if (eq == std::string_view::npos || !text.starts_with(env_prefix_)) continue;
    const std::string name(text.substr(0, eq));
    const auto setting = std::find_if(settings_.begin(), settings_.end(),
                                      [&](const auto& s) { return EnvName(s->key_) == name; });
    if (setting == settings_.end()) {
      if (!others_.count(name.substr(env_prefix_.size()))) unknown_environment_.push_back(name);
      continue;
    }
    Setting& s = **setting;
    if (s.source_ == Source::kFlag) continue;
    // The value is not repeated in the error: it may be something the operator keeps private.
    if (absl::Status status = s.Parse(std::string(text.substr(eq + 1))); !status.ok()) {
      problems.push_back(absl::StrCat("environment variable ", name, ": ", status.message()));
    } else {
      s.source_ = Source::kEnvironment;
    }
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrJoin(problems, "\n"));
}

absl::Status Settings::ResolvePaths() {
  for (const std::unique_ptr<Setting>& s : settings_) {
    if (!s->path_) continue;
    std::string* path = std::get<std::string*>(s->target_);
    absl::StatusOr<std::string> expanded = ExpandCredentialsPath(*path);
    if (!expanded.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(s->key_, ": ", expanded.status().message()));
    }
    *path = std::move(*expanded);
  }
  return absl::OkStatus();
}

std::string Settings::Format() const {
  std::ostringstream out;
  out << "# The settings in effect: defaults, then the --config file, then " << env_prefix_
      << "* variables, then flags.\n";
  for (const std::unique_ptr<Setting>& s : settings_) {
    out << s->key_ << " = " << s->FormatValue();
    switch (s->source_) {
      case Source::kDefault:
        break;
      case Source::kFile:
        out << "  # from the config file";
        break;
      case Source::kEnvironment:
        out << "  # from " << EnvName(s->key_);
        break;
      case Source::kFlag:
        out << "  # from " << FlagName(s->key_);
        break;
    }
    out << "\n";
  }
  return out.str();
}

std::optional<int> Settings::ParseCommandLine(CLI::App& app, int argc, char** argv) {
  std::string config_path;
  bool print_config = false;
  CLI::Option* config =
      app.add_option("--config", config_path,
                     "TOML file of these settings, by their names with '_' for '-' (" +
                         env_prefix_ + "CONFIG works too; " + env_prefix_ +
                         "NAME variables override the file, flags override both)");
  app.add_flag("--print-config", print_config,
               "print the settings in effect (file, environment and flags merged, paths as "
               "given) and exit");
  AddFlags(app);
  auto fail = [&](const std::string& message) {
    fprintf(stderr, "%s: %s\n", app.get_name().c_str(), message.c_str());
    return 2;
  };
  // The flags first, so that --config is found as CLI11 finds it and --help works whatever the
  // file holds; the file and the environment then leave the settings the flags gave alone.
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (config->count() > 0 && config_path.empty()) return fail("--config: no file named");
  if (config_path.empty()) {
    if (const char* env = std::getenv((env_prefix_ + "CONFIG").c_str()); env && *env) {
      config_path = env;
    }
  }
  if (!config_path.empty()) {
    if (absl::Status s = ReadFile(config_path); !s.ok()) return fail(std::string(s.message()));
  }
  if (absl::Status s = ReadEnvironment(environ); !s.ok()) return fail(std::string(s.message()));
  if (!unknown_environment_.empty()) {
    fprintf(stderr, "%s: warning: no setting is named %s (ignored)\n", app.get_name().c_str(),
            absl::StrJoin(unknown_environment_, ", ").c_str());
  }
  // Printed before credential paths are resolved: outside the unit they would not resolve.
  if (print_config) {
    fputs(Format().c_str(), stdout);
    return 0;
  }
  if (absl::Status s = ResolvePaths(); !s.ok()) return fail(std::string(s.message()));
  return std::nullopt;
}

absl::StatusOr<std::string> ExpandCredentialsPath(const std::string& path) {
  std::optional<std::string_view> rest;
  const std::string_view p = path;
  for (std::string_view name : {"$CREDENTIALS_DIRECTORY", "${CREDENTIALS_DIRECTORY}"}) {
    // Only the whole name: $CREDENTIALS_DIRECTORYX is some other variable.
    if (p.starts_with(name) && (p.size() == name.size() || p[name.size()] == '/')) {
      rest = p.substr(name.size());
    }
  }
  if (!rest) return path;
  const char* dir = std::getenv("CREDENTIALS_DIRECTORY");
  if (!dir || !*dir) {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", path,
        "' names $CREDENTIALS_DIRECTORY, which is not set (systemd sets it for a unit with "
        "LoadCredential=)"));
  }
  return std::string(dir) + std::string(*rest);
}

}  // namespace taskmaster
