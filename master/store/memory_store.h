// The store that keeps nothing (--store memory).
#pragma once

#include <memory>

#include "master/store/store.h"

namespace taskmaster {

// Keeps nothing: state lives only in the broker's memory and is lost when the master stops.
std::unique_ptr<Store> NewMemoryStore();

}  // namespace taskmaster
