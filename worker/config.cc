// The worker's TOML keys, read over defaults, and printed back with secrets masked.
#include "worker/config.h"

#include <limits>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/config.h"
#include "common/util.h"
#include "toml++/toml.h"

namespace taskmaster {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

// A duration in milliseconds, at least `min`.
void GetMillis(ConfigTable& table, const std::string& key, std::chrono::milliseconds* out,
               int64_t min = 1) {
  if (std::optional<int64_t> ms = table.GetInt(key, min)) *out = std::chrono::milliseconds(*ms);
}

// An int field, at least `min`.
void GetInt(ConfigTable& table, const std::string& key, int* out, int64_t min = 1) {
  if (std::optional<int64_t> value = table.GetInt(key, min, kIntMax))
    *out = static_cast<int>(*value);
}

void GetNames(ConfigTable& table, const std::string& key, const std::string& what,
              std::vector<std::string>* out) {
  std::vector<std::string> names;
  if (!table.Get(key, &names)) return;
  for (const std::string& name : names) {
    if (absl::Status s = CheckName(what, name); !s.ok()) {
      table.Error(key, std::string(s.message()));
      return;
    }
  }
  *out = std::move(names);
}

void ReadLimits(ConfigTable& table, ExecLimits* limits) {
  for (auto [key, limit] : {std::pair{"address_space_bytes", &limits->address_space_bytes},
                            {"cpu_seconds", &limits->cpu_seconds},
                            {"open_files", &limits->open_files}}) {
    if (std::optional<int64_t> value = table.GetInt(key, 1)) *limit = static_cast<uint64_t>(*value);
  }
  if (std::optional<int64_t> nice = table.GetInt("nice", -20, 19)) {
    limits->nice = static_cast<int>(*nice);
  }
}

ExecSpec ReadExec(ConfigTable& table) {
  ExecSpec spec;
  table.Get("shell", &spec.shell);
  if (spec.shell) {
    std::string command;
    if (table.Get("command", &command)) spec.argv = {command};
  } else {
    table.Get("command", &spec.argv);
  }
  if (spec.argv.empty() || spec.argv[0].empty()) {
    table.Error("command", spec.shell ? "is required: a shell command line (a string)"
                                      : "is required: the program and its arguments (an array)");
  }
  table.Get("cwd", &spec.cwd);
  table.Get("env", &spec.env);
  table.Get("pass_env", &spec.pass_env);
  GetMillis(table, "kill_grace_ms", &spec.kill_grace, /*min=*/0);
  if (std::optional<int64_t> max = table.GetInt("max_output_bytes", 1)) {
    spec.max_output = static_cast<size_t>(*max);
  }
  if (std::optional<int64_t> tail = table.GetInt("stderr_tail_bytes", 0)) {
    spec.stderr_tail = static_cast<size_t>(*tail);
  }
  std::vector<int64_t> permanent;
  if (table.Get("permanent_exit_codes", &permanent)) {
    for (int64_t code : permanent) {
      if (code < 1 || code > 255) {
        table.Error("permanent_exit_codes", absl::StrCat(code, " is not an exit code (1..255)"));
      } else {
        spec.permanent_exit_codes.insert(static_cast<int>(code));
      }
    }
  }
  if (std::optional<int64_t> fd = table.GetInt("progress_fd", 3, kIntMax)) {
    spec.progress_fd = static_cast<int>(*fd);
  }
  if (std::optional<ConfigTable> limits = table.Table("limits")) ReadLimits(*limits, &spec.limits);
  return spec;
}

void ReadPools(ConfigTable& root, WorkerOptions* worker) {
  for (auto& [name, table] : root.Tables("pools")) {
    PoolOptions pool;
    pool.name = name;
    if (absl::Status s = CheckName("pool name", name); !s.ok()) {
      root.Error("pools", std::string(s.message()));
    }
    GetInt(table, "threads", &pool.threads);
    GetNames(table, "kinds", "kind", &pool.kinds);
    // -1: adaptive.
    if (std::optional<int64_t> prefetch = table.GetInt("prefetch", -1, kIntMax)) {
      pool.prefetch = static_cast<int>(*prefetch);
    }
    worker->pools.push_back(std::move(pool));
  }
}

}  // namespace

absl::Status LoadWorkerConfig(const std::string& path, WorkerConfig* config) {
  absl::StatusOr<ConfigFile> file = ConfigFile::Load(path);
  if (!file.ok()) return file.status();
  ConfigTable root = file->Root();
  WorkerOptions& w = config->worker;
  root.Get("master", &w.master.address);
  root.Get("token_file", &config->token_file);
  root.Get("name", &w.name);
  GetInt(root, "threads", &w.threads);
  GetInt(root, "prefetch", &w.prefetch, /*min=*/-1);  // -1: adaptive
  GetInt(root, "prefetch_max", &w.prefetch_max);
  GetMillis(root, "prefetch_window_ms", &w.prefetch_window);
  GetMillis(root, "progress_interval_ms", &w.progress_interval);
  GetNames(root, "queues", "queue name", &w.queues);
  root.Get("labels", &w.labels);
  GetMillis(root, "drain_timeout_ms", &w.drain_timeout, /*min=*/0);
  GetMillis(root, "reconnect_max_ms", &w.reconnect_max);
  GetInt(root, "max_message_bytes", &w.master.max_message_bytes);
  root.Get("admin_listen", &w.admin_listen);
  root.Get("admin_allow_plaintext", &w.admin_allow_plaintext);
  root.Get("log_level", &config->log_level);
  root.Get("log_format", &config->log_format);
  root.Get("builtins", &config->builtins);
  root.Get("plugins", &config->plugins);
  if (std::optional<ConfigTable> tls = root.Table("tls")) {
    tls->Get("ca", &w.master.tls_ca_file);
    tls->Get("cert", &w.master.tls_cert_file);
    tls->Get("key", &w.master.tls_key_file);
  }
  ReadPools(root, &w);
  for (auto& [kind, table] : root.Tables("exec")) {
    if (absl::Status s = CheckName("kind", kind); !s.ok()) {
      root.Error("exec", std::string(s.message()));
    }
    config->exec.emplace_back(kind, ReadExec(table));
  }
  return file->Finish();
}

namespace {

toml::array Strings(const std::vector<std::string>& values) {
  toml::array array;
  for (const std::string& v : values) array.push_back(v);
  return array;
}

toml::table StringTable(const std::map<std::string, std::string>& values, bool mask_secrets) {
  toml::table table;
  for (const auto& [k, v] : values) {
    table.insert(k, mask_secrets && LooksSecret(k) ? std::string(kMaskedSecret) : v);
  }
  return table;
}

toml::table FormatExec(const ExecSpec& spec) {
  toml::table t;
  if (spec.shell) {
    t.insert("shell", true);
    t.insert("command", spec.argv.empty() ? std::string() : spec.argv[0]);
  } else {
    t.insert("command", Strings(spec.argv));
  }
  if (!spec.cwd.empty()) t.insert("cwd", spec.cwd);
  if (!spec.env.empty()) t.insert("env", StringTable(spec.env, /*mask_secrets=*/true));
  if (!spec.pass_env.empty()) t.insert("pass_env", Strings(spec.pass_env));
  t.insert("kill_grace_ms", spec.kill_grace.count());
  t.insert("max_output_bytes", static_cast<int64_t>(spec.max_output));
  t.insert("stderr_tail_bytes", static_cast<int64_t>(spec.stderr_tail));
  toml::array codes;
  for (int code : spec.permanent_exit_codes) codes.push_back(code);
  if (!codes.empty()) t.insert("permanent_exit_codes", codes);
  if (spec.progress_fd >= 0) t.insert("progress_fd", spec.progress_fd);
  toml::table limits;
  const ExecLimits& l = spec.limits;
  if (l.address_space_bytes) limits.insert("address_space_bytes", int64_t(*l.address_space_bytes));
  if (l.cpu_seconds) limits.insert("cpu_seconds", int64_t(*l.cpu_seconds));
  if (l.open_files) limits.insert("open_files", int64_t(*l.open_files));
  if (l.nice) limits.insert("nice", *l.nice);
  if (!limits.empty()) t.insert("limits", limits);
  return t;
}

}  // namespace

std::string FormatWorkerConfig(const WorkerConfig& config, bool token_from_env) {
  const WorkerOptions& w = config.worker;
  toml::table root;
  root.insert("master", w.master.address);
  if (!config.token_file.empty()) root.insert("token_file", config.token_file);
  if (!w.name.empty()) root.insert("name", w.name);
  if (w.threads > 0) root.insert("threads", w.threads);
  root.insert("prefetch", w.prefetch);
  root.insert("prefetch_max", w.prefetch_max);
  root.insert("prefetch_window_ms", w.prefetch_window.count());
  root.insert("progress_interval_ms", w.progress_interval.count());
  root.insert("queues", Strings(w.queues));
  if (!w.labels.empty()) root.insert("labels", StringTable(w.labels, /*mask_secrets=*/false));
  root.insert("drain_timeout_ms", w.drain_timeout.count());
  root.insert("reconnect_max_ms", w.reconnect_max.count());
  root.insert("max_message_bytes", w.master.max_message_bytes);
  if (!w.admin_listen.empty()) root.insert("admin_listen", w.admin_listen);
  if (w.admin_allow_plaintext) root.insert("admin_allow_plaintext", true);
  root.insert("log_level", config.log_level);
  root.insert("log_format", config.log_format);
  root.insert("builtins", config.builtins);
  if (!config.plugins.empty()) root.insert("plugins", Strings(config.plugins));
  toml::table tls;
  if (!w.master.tls_ca_file.empty()) tls.insert("ca", w.master.tls_ca_file);
  if (!w.master.tls_cert_file.empty()) tls.insert("cert", w.master.tls_cert_file);
  if (!w.master.tls_key_file.empty()) tls.insert("key", w.master.tls_key_file);
  if (!tls.empty()) root.insert("tls", tls);
  toml::table pools;
  for (const PoolOptions& p : w.pools) {
    toml::table pool;
    if (p.threads > 0) pool.insert("threads", p.threads);
    if (!p.kinds.empty()) pool.insert("kinds", Strings(p.kinds));
    if (p.prefetch) pool.insert("prefetch", *p.prefetch);
    pools.insert(p.name, pool);
  }
  if (!pools.empty()) root.insert("pools", pools);
  toml::table exec;
  for (const auto& [kind, spec] : config.exec) exec.insert(kind, FormatExec(spec));
  if (!exec.empty()) root.insert("exec", exec);

  std::ostringstream out;
  // The token itself is never in the file; say where it comes from without showing it.
  if (token_from_env) out << "# token: from TASKMASTER_TOKEN " << kMaskedSecret << "\n";
  out << root << "\n";
  return out.str();
}

}  // namespace taskmaster
