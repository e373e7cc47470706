// The TOML reader behind every --config: toml++ parses, this file accounts for each key.
#include "common/config.h"

#include <limits>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/util.h"
#include "toml++/toml.h"

namespace taskmaster {

struct ConfigTable::State {
  std::string file;
  toml::table root;
  std::set<const toml::node*> taken;
  std::vector<std::string> errors;
};

namespace {

const toml::table& AsTable(const void* table) { return *static_cast<const toml::table*>(table); }

std::string Where(const std::string& file, const toml::node& node) {
  return absl::StrCat(file, ":", node.source().begin.line);
}

const char* TypeName(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::table:
      return "a table";
    case toml::node_type::array:
      return "an array";
    case toml::node_type::string:
      return "a string";
    case toml::node_type::integer:
      return "an integer";
    case toml::node_type::floating_point:
      return "a float";
    case toml::node_type::boolean:
      return "a boolean";
    default:
      return "a date or time";
  }
}

// Marks `node` and everything under it as taken: after a type error about it, its insides are
// no news.
void TakeAll(const toml::node& node, std::set<const toml::node*>* taken) {
  taken->insert(&node);
  if (const toml::table* table = node.as_table()) {
    for (const auto& [key, child] : *table) TakeAll(child, taken);
  }
}

// `key` under `prefix`, dotted as errors show it.
std::string JoinPath(const std::string& prefix, const std::string& key) {
  return prefix.empty() ? key : absl::StrCat(prefix, ".", key);
}

// Every key under `table` that nobody took, with its line.
void CollectUnknown(const std::string& file, const toml::table& table, const std::string& prefix,
                    const std::set<const toml::node*>& taken, std::vector<std::string>* out) {
  for (const auto& [key, node] : table) {
    const std::string path = JoinPath(prefix, std::string(key.str()));
    if (!taken.count(&node)) {
      out->push_back(absl::StrCat(Where(file, node), ": unknown key '", path, "'"));
    } else if (const toml::table* sub = node.as_table()) {
      CollectUnknown(file, *sub, path, taken, out);
    }
  }
}

}  // namespace

std::string ConfigTable::Path(const std::string& key) const { return JoinPath(prefix_, key); }

const void* ConfigTable::Take(const std::string& key) {
  const toml::node* node = AsTable(table_).get(key);
  if (node) state_->taken.insert(node);
  return node;
}

void ConfigTable::TypeError(const std::string& key, const void* node, const std::string& expected) {
  const auto& n = *static_cast<const toml::node*>(node);
  TakeAll(n, &state_->taken);
  state_->errors.push_back(absl::StrCat(Where(state_->file, n), ": ", Path(key), " must be ",
                                        expected, ", not ", TypeName(n)));
}

void ConfigTable::Error(const std::string& key, const std::string& message) {
  const toml::node* node = AsTable(table_).get(key);
  const std::string where =
      node ? Where(state_->file, *node) : Where(state_->file, AsTable(table_));
  state_->errors.push_back(absl::StrCat(where, ": ", Path(key), ": ", message));
}

template <typename T>
bool ConfigTable::GetExact(const std::string& key, T* out, const std::string& expected) {
  const auto* node = static_cast<const toml::node*>(Take(key));
  if (!node) return false;
  if (std::optional<T> value = node->value_exact<T>()) {
    *out = std::move(*value);
    return true;
  }
  TypeError(key, node, expected);
  return false;
}

bool ConfigTable::Get(const std::string& key, std::string* out) {
  return GetExact(key, out, "a string");
}

bool ConfigTable::Get(const std::string& key, bool* out) {
  return GetExact(key, out, "true or false");
}

bool ConfigTable::Get(const std::string& key, int64_t* out) {
  return GetExact(key, out, "an integer");
}

std::optional<int64_t> ConfigTable::GetInt(const std::string& key, int64_t min, int64_t max) {
  int64_t value = 0;
  if (!Get(key, &value)) return std::nullopt;
  if (value >= min && value <= max) return value;
  if (max < std::numeric_limits<int>::max()) {
    Error(key, absl::StrCat("must be from ", min, " to ", max));
  } else if (value > max) {
    Error(key, absl::StrCat("must be at most ", max));
  } else if (min == 1) {
    Error(key, "must be positive");
  } else if (min == 0) {
    Error(key, "must not be negative");
  } else {
    Error(key, absl::StrCat("must be ", min, " or more"));
  }
  return std::nullopt;
}

template <typename T>
bool ConfigTable::GetArray(const std::string& key, std::vector<T>* out,
                           const std::string& expected) {
  const auto* node = static_cast<const toml::node*>(Take(key));
  if (!node) return false;
  const toml::array* array = node->as_array();
  if (!array) {
    TypeError(key, node, expected);
    return false;
  }
  std::vector<T> values;
  for (const toml::node& item : *array) {
    std::optional<T> value = item.value_exact<T>();
    if (!value) {
      TypeError(key, &item, expected);
      return false;
    }
    values.push_back(std::move(*value));
  }
  *out = std::move(values);
  return true;
}

bool ConfigTable::Get(const std::string& key, std::vector<std::string>* out) {
  return GetArray(key, out, "an array of strings");
}

bool ConfigTable::Get(const std::string& key, std::vector<int64_t>* out) {
  return GetArray(key, out, "an array of integers");
}

bool ConfigTable::Get(const std::string& key, std::map<std::string, std::string>* out) {
  const auto* node = static_cast<const toml::node*>(Take(key));
  if (!node) return false;
  const toml::table* table = node->as_table();
  if (!table) {
    TypeError(key, node, "a table of strings");
    return false;
  }
  TakeAll(*node, &state_->taken);
  std::map<std::string, std::string> values;
  for (const auto& [name, item] : *table) {
    const auto* s = item.as_string();
    if (!s) {
      TypeError(absl::StrCat(key, ".", std::string(name.str())), &item, "a string");
      return false;
    }
    values[std::string(name.str())] = s->get();
  }
  *out = std::move(values);
  return true;
}

std::optional<ConfigTable> ConfigTable::Table(const std::string& key) {
  const auto* node = static_cast<const toml::node*>(Take(key));
  if (!node) return std::nullopt;
  if (const toml::table* table = node->as_table()) return ConfigTable(state_, table, Path(key));
  TypeError(key, node, "a table");
  return std::nullopt;
}

std::vector<std::pair<std::string, ConfigTable>> ConfigTable::Tables(const std::string& key) {
  std::vector<std::pair<std::string, ConfigTable>> tables;
  std::optional<ConfigTable> outer = Table(key);
  if (!outer) return tables;
  for (const auto& [name, node] : AsTable(outer->table_)) {
    const std::string n(name.str());
    if (std::optional<ConfigTable> table = outer->Table(n)) tables.emplace_back(n, *table);
  }
  return tables;
}

absl::StatusOr<ConfigFile> ConfigFile::Load(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return text.status();
  return Parse(*text, path);
}

absl::StatusOr<ConfigFile> ConfigFile::Parse(std::string_view text, const std::string& name) {
  auto state = std::make_shared<ConfigTable::State>();
  state->file = name;
  try {
    state->root = toml::parse(text, name);
  } catch (const toml::parse_error& e) {
    return absl::InvalidArgumentError(absl::StrCat(name, ":", e.source().begin.line, ":",
                                                   e.source().begin.column, ": ",
                                                   std::string(e.description())));
  }
  return ConfigFile(std::move(state));
}

ConfigTable ConfigFile::Root() { return ConfigTable(state_, &state_->root, ""); }

absl::Status ConfigFile::Finish() {
  std::vector<std::string> problems = state_->errors;
  CollectUnknown(state_->file, state_->root, "", state_->taken, &problems);
  if (problems.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrJoin(problems, "\n"));
}

bool LooksSecret(std::string_view name) {
  const std::string upper = absl::AsciiStrToUpper(std::string(name));
  for (const char* word : {"TOKEN", "PASSWORD", "PASSWD", "SECRET", "KEY", "CREDENTIAL"}) {
    if (absl::StrContains(upper, word)) return true;
  }
  return false;
}

}  // namespace taskmaster
