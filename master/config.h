// The master's settings: each one a flag, a key of its --config file (TOML) and a TASKMASTER_*
// variable. deploy/master.example.toml documents every key.
#pragma once

#include <cstdint>
#include <string>

#include "common/settings.h"
#include "master/rpc/master.h"

namespace taskmaster {

// The admin listener's address when no setting names one (MasterOptions leaves it off).
inline constexpr char kDefaultAdminListen[] = "127.0.0.1:7071";

struct MasterConfig {
  MasterConfig() { master.admin.http.listen = kDefaultAdminListen; }
  MasterOptions master;
  std::string log_level = "info";
  std::string log_format = "text";
  std::string port_file;  // where the port listened on is written; empty: nowhere
  int64_t shutdown_timeout_ms = 5'000;
  // Read as plain values, then put into `master` by Settle.
  int64_t tick_ms = 100;
  std::string sync = "full";
};

// Declares every setting of `config` in `settings`, each bound to its field.
void DeclareMasterSettings(MasterConfig* config, Settings* settings);

// After the settings were read: the fields derived from them.
void Settle(MasterConfig* config);

}  // namespace taskmaster
