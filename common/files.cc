// Where the master keeps its data by default, and the port file (see files.h).
#include "common/files.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace taskmaster {

std::string DefaultDataDir() {
  // systemd's StateDirectory= (a list separated by ':'; the first is the unit's own).
  if (const char* state = std::getenv("STATE_DIRECTORY"); state && *state) {
    const std::string dirs = state;
    return dirs.substr(0, dirs.find(':'));
  }
  if (const char* xdg = std::getenv("XDG_DATA_HOME"); xdg && *xdg) {
    return std::string(xdg) + "/taskmaster";
  }
  if (const char* home = std::getenv("HOME"); home && *home) {
    return std::string(home) + "/.local/share/taskmaster";
  }
  return "taskmaster-data";
}

absl::Status WritePortFile(const std::string& path, int port) {
  const std::string tmp = path + ".tmp";
  const std::string text = std::to_string(port) + "\n";
  const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
  const bool written =
      fd >= 0 && write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  if (fd >= 0) close(fd);
  if (!written || std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot write the port file ", path, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace taskmaster
