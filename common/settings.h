// A daemon's settings from three places, each over the one before: its config file (TOML), its
// environment (PREFIX + the key in upper case), and its flags. Each setting is declared once,
// bound to the variable it sets; its key, flag, variable, checks and --print-config line all come
// from that one declaration, so no flag lacks a key and no source skips a check.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/config.h"

namespace CLI {
class App;
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
    // Sets the value from text (a flag's or an environment variable's), checked before it is set.
    absl::Status Parse(const std::string& text);
    // What is wrong with a string's `value` (not among the choices), or "".
    std::string ChoiceError(const std::string& value) const;
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
  };

  // `env_prefix`: "TASKMASTER_" makes lease_timeout_ms TASKMASTER_LEASE_TIMEOUT_MS. `others`:
  // names after the prefix that other programs read (ADDR, TOKEN), which draw no warning.
  Settings(std::string env_prefix, std::set<std::string> others)
      : env_prefix_(std::move(env_prefix)), others_(std::move(others)) {
    others_.insert("CONFIG");  // ParseCommandLine's
  }
  Settings(const Settings&) = delete;
  Settings& operator=(const Settings&) = delete;

  // A setting named `key` (snake_case) bound to `value`, which holds its default.
  template <typename T>
  Setting& Add(const std::string& key, T* value, const std::string& help) {
    settings_.push_back(std::unique_ptr<Setting>(new Setting(key, value, help)));
    return *settings_.back();
  }

  // The whole command line: adds --config, --print-config and a flag per setting to `app`, then
  // reads the flags, the config file (--config, else $PREFIX CONFIG) and the environment, each
  // taking only what the ones before it did not (so that flags beat the environment, which beats
  // the file). Returns the exit code when the program is to exit now (--help, --print-config, or
  // an error, each printed), nullopt when it is to go on.
  std::optional<int> ParseCommandLine(CLI::App& app, int argc, char** argv);

  // The steps of ParseCommandLine, in its order, for tests.
  // A flag for each setting (--lease-timeout-ms for lease_timeout_ms), showing its default;
  // parsed and checked as the file's and the environment's values are.
  void AddFlags(CLI::App& app);
  // Each setting present in the file and not given by a flag; its problems, and keys no setting
  // has, are in the error.
  absl::Status ReadFile(const std::string& path);
  // Each PREFIX variable of `environ` naming a setting no flag gave. Other PREFIX variables are
  // left alone, listed by unknown_environment() unless they are among `others`.
  absl::Status ReadEnvironment(char** environ);
  const std::vector<std::string>& unknown_environment() const { return unknown_environment_; }
  // Resolves credential paths ($CREDENTIALS_DIRECTORY/NAME).
  absl::Status ResolvePaths();
  // Every setting as a TOML file that ReadFile takes back, saying where each value came from.
  std::string Format() const;

 private:
  std::string EnvName(const std::string& key) const;

  const std::string env_prefix_;
  std::set<std::string> others_;
  std::vector<std::unique_ptr<Setting>> settings_;
  std::vector<std::string> unknown_environment_;
};

// `path` with a leading $CREDENTIALS_DIRECTORY (or ${CREDENTIALS_DIRECTORY}) replaced by its
// value; an error when the path names it and it is not set.
absl::StatusOr<std::string> ExpandCredentialsPath(const std::string& path);

}  // namespace taskmaster
