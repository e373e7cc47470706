// The status page's files (master/admin/web/), embedded into the binary at build time by
// cmake/EmbedFiles.cmake, so that the page needs nothing from outside the master.
#pragma once

#include <span>
#include <string_view>

namespace taskmaster {

struct WebAsset {
  const char* path;  // "/" for index.html, else "/" and the file's name
  const char* content_type;
  std::string_view body;
};

std::span<const WebAsset> WebAssets();

}  // namespace taskmaster
