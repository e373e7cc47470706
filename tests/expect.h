// Assertions the tests share beyond GoogleTest's own.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "absl/strings/match.h"

// Checks that `text` holds `part`, showing the whole text when it does not.
#define EXPECT_CONTAINS(text, part)                                                              \
  do {                                                                                           \
    const std::string text_ = std::string(text);                                                 \
    EXPECT_TRUE(absl::StrContains(text_, part)) << "'" << text_ << "' lacks '" << (part) << "'"; \
  } while (0)
