// What master, worker and client share over gRPC: channels and their credentials, status
// conversion, the bearer header.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/limits.h"
#include "grpcpp/grpcpp.h"

namespace taskmaster {

// Trailing metadata on every answer of the master's handlers: a client can then tell the master's
// own UNAVAILABLE (its disk is full) from a transport failure (it cannot be reached).
inline constexpr char kAnsweredByMaster[] = "tm-answered";

// How a worker or client reaches the master.
struct ChannelOptions {
  std::string address;  // host:port
  int max_message_bytes = kDefaultMaxMessageBytes;
  std::string tls_ca_file;    // non-empty: TLS, verifying the master against this CA bundle
  std::string tls_cert_file;  // with tls_key_file: mutual TLS, presenting this certificate
  std::string tls_key_file;
  // Long-lived worker streams ping this often (0: never) to notice a dead connection.
  int64_t keepalive_ms = 0;
};

// A new channel. Reconnect loops make a new one per attempt: a channel that lost its master
// waits out gRPC's own connection backoff (seconds) before it tries again.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ChannelOptions& options);

// Adds `authorization: Bearer <token>` to a call; nothing for an empty token (an --insecure
// master). The one place a client or worker sets the header.
void AddBearerToken(grpc::ClientContext& context, const std::string& token);

// What to warn about before a token travels without TLS to a host other than loopback (anyone
// on the path could read it); empty when nothing.
std::string CleartextTokenWarning(const ChannelOptions& options, bool has_token);

// Status conversion at the gRPC edge.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace taskmaster
