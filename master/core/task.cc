// Names of task states, as clients and logs show them, and sums of queue counts.
#include "master/core/task.h"

#include <algorithm>

namespace taskmaster {

std::string_view TaskStateName(TaskState state) {
  switch (state) {
    case TaskState::kPending:
      return "PENDING";
    case TaskState::kDelayed:
      return "DELAYED";
    case TaskState::kLeased:
      return "LEASED";
    case TaskState::kSucceeded:
      return "SUCCEEDED";
    case TaskState::kDead:
      return "DEAD";
    case TaskState::kCancelled:
      return "CANCELLED";
  }
  return "?";
}

void AddCounts(QueueStatsView& into, const QueueStatsView& from) {
  into.pending += from.pending;
  into.delayed += from.delayed;
  into.leased += from.leased;
  into.oldest_ready_age_ms = std::max(into.oldest_ready_age_ms, from.oldest_ready_age_ms);
  into.submitted += from.submitted;
  into.succeeded += from.succeeded;
  into.failed += from.failed;
  into.retried += from.retried;
  into.redelivered += from.redelivered;
  into.reclaimed += from.reclaimed;
  into.dead += from.dead;
  into.cancelled += from.cancelled;
}

}  // namespace taskmaster
