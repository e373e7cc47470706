#pragma once

// What the fuzz targets share: invariant checks that stop the run, silent logs, a store that
// answers at once, and framed inputs.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "google/protobuf/stubs/logging.h"
#include "master/store/store.h"
#include "spdlog/logger.h"

namespace taskmaster::fuzz {

// A broken invariant is a finding like a crash: abort, which libFuzzer reports with the input.
#define FUZZ_CHECK(cond)                                                                \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                     \
    }                                                                                   \
  } while (false)

// Log lines cost formatting and flood the fuzzer's output; a logger that is off has neither.
inline std::shared_ptr<spdlog::logger> QuietLogger() {
  auto log = std::make_shared<spdlog::logger>("fuzz");
  log->set_level(spdlog::level::off);
  return log;
}

// Protobuf logs every string field that is not UTF-8 as it refuses a message: noise here, where
// refused messages are most of the input.
inline void SilenceProtobufLogs() { google::protobuf::SetLogHandler(nullptr); }

// Keeps nothing, like the memory store, but says it persists: the broker then takes the paths a
// durable master takes (staged submits, results revealed once durable, acknowledgements after a
// flush), with every write answered at once. Its epoch is fixed, so an input can name it.
class InstantDurableStore final : public Store {
 public:
  static constexpr char kEpoch[] = "fuzz-epoch";
  std::string Epoch() const override { return kEpoch; }
  bool persistent() const override { return true; }
  absl::Status Load(RecoveryVisitor*) override { return absl::OkStatus(); }
  absl::Status Writable() const override { return absl::OkStatus(); }
  void Submit(SubmitRows, std::function<void(absl::Status)> done) override {
    done(absl::OkStatus());
  }
  void UpdateTask(TaskId, TaskStatusRow) override {}
  void DeleteTask(TaskId) override {}
  void DeleteJob(const std::string&) override {}
  void PutWorker(const WorkerRow&) override {}
  void DeleteWorker(const std::string&) override {}
  void Flush(std::function<void(absl::Status)> done) override { done(absl::OkStatus()); }
  void Close() override {}
};

// Reads an input as frames: a two-byte little-endian length, then that many bytes (fewer at the
// end of the input). Each frame is one message, so libFuzzer's mutations of one message leave
// the others whole.
class Frames {
 public:
  Frames(const uint8_t* data, size_t size) : rest_(reinterpret_cast<const char*>(data), size) {}
  bool empty() const { return rest_.empty(); }
  uint8_t Byte() {
    if (rest_.empty()) return 0;
    const auto b = static_cast<uint8_t>(rest_.front());
    rest_.remove_prefix(1);
    return b;
  }
  std::string_view Next() {
    const size_t low = Byte();
    const size_t n = low | (size_t{Byte()} << 8);
    const std::string_view frame = rest_.substr(0, n);
    rest_.remove_prefix(frame.size());
    return frame;
  }

 private:
  std::string_view rest_;
};

}  // namespace taskmaster::fuzz
