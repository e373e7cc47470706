// The built-in kinds. What a handler is and sees, and the registry, are the SDK's.
#pragma once

#include "absl/status/status.h"
#include "taskmaster/worker.h"

namespace taskmaster {

// The built-in kinds:
//   square  payload a decimal integer n, output "n*n=r" (the seed's workload)
//   echo    output = payload
//   sleep   sleeps payload milliseconds (stops early when cancelled), output "slept N ms"
//   fail    always fails with the payload as its error
absl::Status RegisterBuiltins(Registry& registry);

}  // namespace taskmaster
