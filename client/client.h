#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/grpc_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"

namespace taskmaster {

struct ClientOptions {
  ChannelOptions master;
  std::string token;  // bearer token with the `submit` (or `admin`) role
  std::chrono::milliseconds rpc_timeout{30'000};
  // WatchJob keeps reconnecting this long after losing the master (e.g. across a restart).
  std::chrono::milliseconds reconnect_timeout{60'000};
  // Given several masters, a call none of them serves (one died, another takes over) is tried
  // again, round after round, for this long.
  std::chrono::milliseconds failover_timeout{15'000};
};

// The C++ client of a master, or of masters sharing a PostgreSQL store (options.master.address
// lists them): it follows the one that serves. Thread-safe. Errors carry a message a person can
// act on.
class Client {
 public:
  static absl::StatusOr<std::unique_ptr<Client>> Connect(ClientOptions options);
  const ClientOptions& options() const { return options_; }

  absl::StatusOr<v1::SubmitResponse> Submit(const v1::SubmitRequest& request) const;
  absl::StatusOr<v1::TaskInfo> GetTask(uint64_t id) const;
  absl::StatusOr<v1::JobInfo> GetJob(const std::string& job_id) const;
  absl::StatusOr<int64_t> CancelTask(uint64_t id) const;
  absl::StatusOr<int64_t> CancelJob(const std::string& job_id) const;
  // With the queues split into partitions, Stats and Workers ask every master that serves some
  // (as the masters name each other) and merge their answers; `partitions` then lists those
  // counted, and `other_masters` the masters that could not be asked.
  absl::StatusOr<v1::StatsResponse> Stats() const;
  absl::StatusOr<v1::WorkersResponse> Workers() const;
  // The master's answer to the standard health check (grpc.health.v1): whether it serves.
  absl::StatusOr<bool> Serving() const;

  // Follows a job until every task has finished, calling `on_event` with each batch of new
  // results in completion order. Survives master restarts (within reconnect_timeout) and
  // delivers each result once.
  absl::Status WatchJob(const std::string& job_id,
                        const std::function<void(const v1::JobEvent&)>& on_event) const;

  // Submits and follows the new job in one call (one round trip less than Submit + WatchJob);
  // returns the job id. If the call fails before the master named the job, whether it was
  // submitted is unknown: resubmit with idempotency keys.
  absl::StatusOr<std::string> SubmitAndWatch(
      const v1::SubmitRequest& request,
      const std::function<void(const v1::JobEvent&)>& on_event) const;

 private:
  // One master of the list, and a channel to it.
  struct Endpoint {
    std::string address;
    std::unique_ptr<v1::TaskQueue::Stub> stub;
    std::unique_ptr<grpc::health::v1::Health::Stub> health;
  };

  Client(ClientOptions options, std::vector<Endpoint> endpoints);
  const Endpoint& Current() const;
  // After `status` from `endpoint`: whether to try again at the next master. Only a call that
  // did not reach one that serves (a standby's answer, a refused connection) goes again, and
  // only while `deadline` has not passed.
  bool FailOver(const Endpoint& endpoint, const grpc::Status& status,
                const grpc::ClientContext& context,
                std::chrono::steady_clock::time_point deadline) const;
  void Prepare(grpc::ClientContext* context) const;
  // One call at `address`, without following another master.
  template <typename Response, typename Request>
  absl::StatusOr<Response> CallAt(const std::string& address,
                                  grpc::Status (v1::TaskQueue::Stub::*method)(grpc::ClientContext*,
                                                                              const Request&,
                                                                              Response*),
                                  const Request& request) const;
  // Call, then the same call at each master serving partitions the answers did not cover yet,
  // merged with `merge`.
  template <typename Response, typename Request>
  absl::StatusOr<Response> CallEveryPartition(
      grpc::Status (v1::TaskQueue::Stub::*method)(grpc::ClientContext*, const Request&, Response*),
      const Request& request, void (*merge)(const Response&, Response*)) const;
  // A unary call with the token, the deadline, and errors explained.
  template <typename Response, typename Request>
  absl::StatusOr<Response> Call(grpc::Status (v1::TaskQueue::Stub::*method)(grpc::ClientContext*,
                                                                            const Request&,
                                                                            Response*),
                                const Request& request) const;
  // Follows a job after its first `seen` results, reconnecting while the master is away.
  absl::Status Follow(const std::string& job_id, int64_t seen,
                      const std::function<void(const v1::JobEvent&)>& on_event,
                      bool lost_master) const;
  absl::Status Explain(const grpc::Status& status, const grpc::ClientContext& context,
                       const std::string& address) const;

  const ClientOptions options_;
  const std::vector<Endpoint> endpoints_;
  mutable MasterAddresses masters_;
};

}  // namespace taskmaster
