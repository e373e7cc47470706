#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"

namespace taskmaster {

// Where the broker's state persists. The broker records its changes in order while holding its
// lock (no I/O there), and asks for durability with Flush before it acknowledges anything, so a
// store can commit many changes with one write (group commit).
//
// Implementations are thread-safe.
class Store {
 public:
  virtual ~Store() = default;

  // Identifies this store's contents. It changes when the state is lost (a memory store that
  // restarted), so workers and clients can tell that ids they hold no longer mean anything.
  virtual std::string Epoch() const = 0;

  // Runs `done` once every change recorded before the call is durable, or with the error that
  // prevents it. `done` may run inline or on the store's own thread, never with a broker lock.
  virtual void Flush(std::function<void(absl::Status)> done) = 0;
};

// Keeps nothing: state lives only in the broker's memory and is lost when the master stops.
std::unique_ptr<Store> NewMemoryStore();

}  // namespace taskmaster
