#pragma once

// What the time and partition fault tests (fault_time_*_test.cc) share: how often each task's
// handler ran, read from the workers' logs. Each of those tests prints a FIGURES line: what was
// acknowledged, recorded, lost, and run more than once.

#include <algorithm>
#include <cstdint>
#include <map>
#include <regex>
#include <string>
#include <vector>

namespace taskmaster::testing {

// How often each task's handler ran, from the workers' debug logs ("task N attempt A (kind)").
inline std::map<uint64_t, int> Executions(const std::vector<std::string>& logs) {
  std::map<uint64_t, int> runs;
  const std::regex line(R"(\] task (\d+) attempt \d+ \()");
  for (const std::string& log : logs) {
    for (auto it = std::sregex_iterator(log.begin(), log.end(), line); it != std::sregex_iterator();
         ++it) {
      runs[std::stoull((*it)[1])]++;
    }
  }
  return runs;
}

inline int ExtraExecutions(const std::map<uint64_t, int>& runs) {
  int extra = 0;
  for (const auto& [id, n] : runs) extra += std::max(0, n - 1);
  return extra;
}

}  // namespace taskmaster::testing
