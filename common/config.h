// Reading a TOML configuration file so that no key goes unnoticed: the reader takes each key by
// name and type, and a key of the wrong type, a value out of range, or a key nobody took is an
// error naming the file, the line and the key. Daemons share it for their --config files.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace taskmaster {

class ConfigFile;

// One table of a config file: the top level, or a [section] of it. Copies share the file's state,
// so the errors and the keys taken are those of the whole file. Thread-compatible.
class ConfigTable {
 public:
  // Each Get leaves `out` as it is when `key` is absent, so that it keeps its default; a key of
  // another type or out of range records an error and leaves it too. Returns whether it set `out`.
  bool Get(const std::string& key, std::string* out);
  bool Get(const std::string& key, bool* out);
  bool Get(const std::string& key, int64_t* out);
  bool Get(const std::string& key, std::vector<std::string>* out);
  bool Get(const std::string& key, std::vector<int64_t>* out);
  // An integer from `min` to `max`; nullopt when absent, or (with an error naming the bounds)
  // of another type or out of them.
  std::optional<int64_t> GetInt(const std::string& key, int64_t min,
                                int64_t max = std::numeric_limits<int64_t>::max());
  // A table of strings: [labels] or labels = { k = "v" }.
  bool Get(const std::string& key, std::map<std::string, std::string>* out);

  // The sub-table `key`; nullopt when absent (or, with an error, not a table).
  std::optional<ConfigTable> Table(const std::string& key);
  // Every sub-table of the table `key`, by name: [handlers.resize], [handlers.ocr]...
  std::vector<std::pair<std::string, ConfigTable>> Tables(const std::string& key);

  // Records an error about `key` of this table, for a value its type allows but the program does
  // not ("threads must be positive"): "FILE:LINE: KEY: MESSAGE".
  void Error(const std::string& key, const std::string& message);

 private:
  friend class ConfigFile;
  struct State;
  ConfigTable(std::shared_ptr<State> state, const void* table, std::string prefix)
      : state_(std::move(state)), table_(table), prefix_(std::move(prefix)) {}
  // The node of `key`, marked as taken; nullptr when absent.
  const void* Take(const std::string& key);
  void TypeError(const std::string& key, const void* node, const std::string& expected);
  // The dotted name of `key` in this table, as errors show it ("exec.resize.command").
  std::string Path(const std::string& key) const;
  // Get for a scalar of exactly type T (toml++'s value_exact), and for an array of them.
  template <typename T>
  bool GetExact(const std::string& key, T* out, const std::string& expected);
  template <typename T>
  bool GetArray(const std::string& key, std::vector<T>* out, const std::string& expected);

  std::shared_ptr<State> state_;
  const void* table_;  // a toml::table, kept out of this header
  std::string prefix_;
};

// A parsed config file. Read it through Root(), then Finish() says what was wrong with it.
class ConfigFile {
 public:
  // Reads and parses `path`; a syntax error names the file, the line and the column.
  static absl::StatusOr<ConfigFile> Load(const std::string& path);
  // Parses `text` as if it were the file `name` (for tests).
  static absl::StatusOr<ConfigFile> Parse(std::string_view text, const std::string& name);

  ConfigTable Root();
  // Every error recorded, and every key never taken ("unknown key"), one per line; OK when none.
  absl::Status Finish();

 private:
  explicit ConfigFile(std::shared_ptr<ConfigTable::State> state) : state_(std::move(state)) {}
  std::shared_ptr<ConfigTable::State> state_;
};

// What --print-config shows of a secret: that it is set, never its value.
inline constexpr std::string_view kMaskedSecret = "(secret)";
// True for the name of something that likely holds a secret (TOKEN, PASSWORD, SECRET, KEY...),
// whose value --print-config masks.
bool LooksSecret(std::string_view name);

}  // namespace taskmaster
