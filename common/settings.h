// A daemon's settings from three places, each over the one before: its config file (TOML), its
// environment (PREFIX + the key in upper case), and its flags. Each setting is declared once,
// bound to the variable it sets; its key, flag, variable, checks and --print-config line all come
// from that one declaration, so no flag lacks a key and no source skips a check.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/config.h"

namespace CLI {
class App;
class Option;
}  // namespace CLI

namespace taskmaster {

class Settings {
 public:
  // Where a setting's value came from, as --print-config tells it.
  enum class Source { kDefault, kFile, kEnvironment, kFlag };

  class Setting {
   public:
    // Integers: the values allowed.
    Setting& Range(int64_t min, int64_t max);
    // Strings: the values allowed.
    Setting& Choices(std::vector<std::string> choices);
    // Strings: a file's path, where "$CREDENTIALS_DIRECTORY/NAME" names a credential systemd
    // passed the service (LoadCredential=).
    Setting& Path();

   private:
    friend class Settings;
    using Target = std::variant<std::string*, bool*, int64_t*, int*, size_t*>;
    Setting(std::string key, Target target, std::string help);
    // Sets the value from text (an environment variable's), checked as a flag's would be.
    absl::Status Parse(const std::string& text);
    // The value's error, if any, for a value set from any source.
    std::string Check() const;
    std::string RangeError() const;
    int64_t Integer() const;
    void SetInteger(int64_t value);
    std::string FormatValue() const;

    std::string key_;
    Target target_;
    std::string help_;
    int64_t min_, max_;
    std::vector<std::string> choices_;
    bool path_ = false;
    Source source_ = Source::kDefault;
    CLI::Option* flag_ = nullptr;
  };

  // `env_prefix`: "TASKMASTER_" makes lease_timeout_ms TASKMASTER_LEASE_TIMEOUT_MS.
  explicit Settings(std::string env_prefix) : env_prefix_(std::move(env_prefix)) {}
  Settings(const Settings&) = delete;
  Settings& operator=(const Settings&) = delete;

  // A setting named `key` (snake_case) bound to `value`, which holds its default.
  template <typename T>
  Setting& Add(const std::string& key, T* value, const std::string& help) {
    settings_.push_back(std::unique_ptr<Setting>(new Setting(key, value, help)));
    return *settings_.back();
  }

  // The whole command line: adds --config, --print-config and a flag per setting to `app`, then
  // reads the config file (--config, else $PREFIX CONFIG), the environment and the flags, each
  // over the one before. Returns the exit code when the program is to exit now (--help,
  // --print-config, or an error, each printed), nullopt when it is to go on.
  std::optional<int> ParseCommandLine(CLI::App& app, int argc, char** argv);

  // The steps of ParseCommandLine, for tests.
  // A flag for each setting (--lease-timeout-ms for lease_timeout_ms), showing its default.
  void AddFlags(CLI::App& app);
  // Each setting present in the file; its problems, and keys no setting has, are in the error.
  absl::Status ReadFile(const std::string& path);
  // Each PREFIX variable of `environ` that names a setting; other variables are left alone (the
  // client's and worker's TASKMASTER_ADDR and TASKMASTER_TOKEN may be in the same environment).
  absl::Status ReadEnvironment(char** environ);
  // After the flags were parsed: marks the settings they gave, and resolves credential paths.
  absl::Status Finish();
  // Every setting as a TOML file that ReadFile takes back, saying where each value came from.
  std::string Format() const;

  // The value given to `--config` in argv, found before the flags are parsed (the file's values
  // are the defaults the flags override); empty when none.
  static std::string ConfigPath(int argc, char** argv);

 private:
  std::string EnvName(const std::string& key) const;

  const std::string env_prefix_;
  std::vector<std::unique_ptr<Setting>> settings_;
};

// `path` with a leading $CREDENTIALS_DIRECTORY (or ${CREDENTIALS_DIRECTORY}) replaced by its
// value; an error when the path names it and it is not set.
absl::StatusOr<std::string> ExpandCredentialsPath(const std::string& path);

}  // namespace taskmaster
