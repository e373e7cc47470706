#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"

namespace taskmaster {

// A message that batches items (tasks, results) closes once it holds about this many bytes, so
// no batch comes near a message limit whatever the items' sizes.
inline constexpr size_t kBatchBytes = 1 << 20;

// Limits both ends agree on: one value sets the send and receive caps.
inline constexpr int kDefaultMaxMessageBytes = 64 << 20;

// How a worker or client reaches the master.
struct ChannelOptions {
  std::string address;  // host:port
  int max_message_bytes = kDefaultMaxMessageBytes;
  std::string tls_ca_file;    // non-empty: TLS, verifying the master against this CA bundle
  std::string tls_cert_file;  // with tls_key_file: mutual TLS, presenting this certificate
  std::string tls_key_file;
  bool keepalive = false;  // long-lived worker streams ping to notice a dead peer
};

// A new channel. Reconnect loops make a new one per attempt: a channel that lost its master
// waits out gRPC's own connection backoff (seconds) before it tries again.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ChannelOptions& options);

// Status conversion at the gRPC edge.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace taskmaster
