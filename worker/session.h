// The worker's session with the master: one gRPC stream at a time (hello, welcome, messages both
// ways), reconnects with backoff, the sender, and the watchdog that cuts a silent stream. The only
// part of the worker that sees gRPC or protobuf: it converts them from and to plain structs.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "spdlog/logger.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"
#include "worker/slots.h"
#include "worker/worker.h"

namespace taskmaster::worker {

// How this worker presents itself in every hello.
struct SessionIdentity {
  std::string worker_id;  // stable for the process: a reconnect keeps its leases
  std::string name;
  std::string host;
  int slots = 0;  // threads
  std::vector<std::string> kinds;
  int32_t partition = 0;  // of the queues: the session follows whichever master serves it
  // Hears how many partitions the queues have, at every welcome.
  std::function<void(int32_t)> on_partitions;
};

// Thread-safe. Start once; Cancel any time; Join once, after Slots::Stop.
class Session {
 public:
  // `options` and `slots` must outlive the session.
  Session(const WorkerOptions* options, SessionIdentity identity, Slots* slots,
          std::shared_ptr<spdlog::logger> log)
      : options_(*options),
        identity_(std::move(identity)),
        slots_(slots),
        log_(std::move(log)),
        masters_(options_.master.address) {}

  // Starts the session thread (connect, read, reconnect) and the watchdog.
  void Start();
  // Cancels the live stream, if any: the worker is leaving.
  void Cancel();
  void Join();
  // Whether a stream is open and the master welcomed it.
  bool connected() const { return connected_.load(std::memory_order_relaxed); }
  // Streams the master welcomed, the first included.
  int64_t connections() const { return connections_.load(std::memory_order_relaxed); }
  // Writes what Slots::Finish gave a pool thread to the live stream, then calls Slots::Sent.
  void WriteNow(ToMaster out);

 private:
  using Stream = grpc::ClientReaderWriter<v1::WorkerMessage, v1::MasterMessage>;

  void Loop();
  // One stream to `address`, from hello to its end. Returns whether the master welcomed us;
  // `serving_at` gets whom a standby named.
  bool Run(const std::string& address, grpc::Status* status, std::string* serving_at);
  void Ended(bool master_stopping, const grpc::Status& status);
  void SendLoop(Stream* stream);
  // Writes `out` (a goodbye ends the writing side too); false when the stream is broken or done.
  static bool Write(Stream* stream, ToMaster out);
  void WatchdogLoop();
  // Cancels the stream of session `number` if it is still the live one; 0: whichever is.
  void CancelSession(uint64_t number);
  v1::WorkerMessage MakeHello(const HelloState& state) const;

  const WorkerOptions& options_;
  const SessionIdentity identity_;
  Slots* const slots_;
  const std::shared_ptr<spdlog::logger> log_;
  MasterAddresses masters_;
  // Session and watchdog threads: started by Start, joined by Join.
  std::thread thread_;
  std::thread watchdog_;

  absl::Mutex mu_;
  uint64_t number_ ABSL_GUARDED_BY(mu_) = 0;  // of the latest session
  // Its call, from before its hello to its end; the watchdog and Cancel cancel it.
  std::shared_ptr<grpc::ClientContext> live_ ABSL_GUARDED_BY(mu_);
  // Its stream, from before its welcome until nothing writes to it any more (WriteNow's).
  Stream* stream_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::atomic<bool> connected_{false};   // for status lines only
  std::atomic<int64_t> connections_{0};  // for metrics only
};

}  // namespace taskmaster::worker
