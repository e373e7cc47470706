// What the worker exchanges with the master, as plain structs: the session converts them from and
// to protobuf at the stream's edge, so the accounting and the pool never see a gRPC type.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

// Worker internals live in their own namespace: the master's core has plain structs of the same
// names (TaskRef, Welcome), and tests link both.
namespace taskmaster::worker {

using TaskId = uint64_t;
// Every timer of the worker runs on the monotonic clock; tests feed it fake time points.
using Time = std::chrono::steady_clock::time_point;

struct TaskRef {
  TaskId task_id = 0;
  int32_t attempt = 0;
};

// A task as the master hands it out.
struct Task {
  TaskId task_id = 0;
  int32_t attempt = 0;
  std::string kind;
  std::string payload;
  int64_t timeout_ms = 0;  // 0: none
};

enum class Outcome {
  kSucceeded,
  kFailed,
  kCancelled,  // stopped after a cancel from the master
  kReturned,   // never started: given back without using the attempt
};
// The wire protocol's name of an outcome ("SUCCEEDED"...), for log lines.
const char* OutcomeName(Outcome outcome);

// How far a running task has come, as its handler last said.
struct ProgressReport {
  TaskId task_id = 0;
  int32_t attempt = 0;
  int64_t done = 0;
  int64_t total = 0;
  std::string message;
};

struct Result {
  TaskId task_id = 0;
  int32_t attempt = 0;
  Outcome outcome = Outcome::kFailed;
  std::string output;
  std::string error;
  bool permanent = false;  // a failure no retry can fix: the task is DEAD at once
};

// The first message of a stream, from the master.
struct Welcome {
  std::string master_epoch;  // changes when the master loses its state
  int64_t heartbeat_interval_ms = 0;
  int64_t lease_timeout_ms = 0;
  std::vector<TaskRef> revoked;  // held tasks the master no longer leases to this worker
  bool echoes_heartbeats = false;
  std::string worker_secret;  // shown in every later hello
};

// What a later message from the master carries for the accounting.
struct FromMaster {
  std::vector<Task> tasks;             // each against one credit
  std::vector<TaskId> cancel;          // stop these
  std::vector<TaskRef> acked;          // results recorded
  std::optional<Time> heartbeat_echo;  // the latest heartbeat whose leases were extended
};

// What the sender writes next.
struct ToMaster {
  std::vector<Result> results;
  int32_t credits = 0;                   // more tasks the worker can take (additive)
  int64_t task_us = 0;                   // with credits: its tasks' average time (0: unknown)
  std::optional<Time> heartbeat_at;      // a heartbeat, sent at this time
  int32_t stuck = 0;                     // with a heartbeat: handlers running past their deadline
  std::vector<ProgressReport> progress;  // the latest of tasks that reported since the last
  bool draining = false;                 // send no more tasks
  bool bye = false;                      // the worker leaves

  bool empty() const {
    return results.empty() && credits == 0 && !heartbeat_at && !draining && !bye &&
           progress.empty();
  }
};

}  // namespace taskmaster::worker
