// Names of task states, as clients and logs show them.
#include "master/core/task.h"

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

}  // namespace taskmaster
