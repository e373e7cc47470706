// What master, worker and client share over gRPC: channels and their credentials, status
// conversion, the bearer header.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/limits.h"
#include "grpcpp/grpcpp.h"

namespace taskmaster {

// Trailing metadata on every answer of the master's handlers: a client can then tell the master's
// own UNAVAILABLE (its disk is full) from a transport failure (it cannot be reached).
inline constexpr char kAnsweredByMaster[] = "tm-answered";
// Trailing metadata on the UNAVAILABLE of a master that does not serve (a standby): host:port of
// the master that does, for clients given several masters to go to.
inline constexpr char kServingMaster[] = "tm-serving-master";

// How a worker or client reaches the master.
struct ChannelOptions {
  // host:port, or several separated by commas: masters sharing a PostgreSQL store, of which one
  // serves (see MasterAddresses). MakeChannel takes one.
  std::string address;
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

// The masters a client or worker was given. With the PostgreSQL store one of them serves and the
// others stand by, answering UNAVAILABLE with the serving one's address (kServingMaster): a
// client tries the current address, and when it does not serve, the one named (if it is one of
// its own) or the next. Thread-safe.
class MasterAddresses {
 public:
  // `list`: "host:port[,host:port...]".
  explicit MasterAddresses(const std::string& list);
  const std::vector<std::string>& all() const { return all_; }
  std::string current() const;
  // `failed` did not serve; `serving_at` is whom it named, if any. Returns true once every
  // address has failed since one last served: time to back off before the next round.
  bool Failed(const std::string& failed, const std::string& serving_at);
  // `address` served: the next failure starts a new round.
  void Served(const std::string& address);

 private:
  const std::vector<std::string> all_;
  mutable absl::Mutex mu_;
  size_t current_ ABSL_GUARDED_BY(mu_) = 0;
  size_t failures_ ABSL_GUARDED_BY(mu_) = 0;  // since one last served
};

// The kServingMaster a standby named in `context`'s trailing metadata; empty when none.
std::string ServingMaster(const grpc::ClientContext& context);

// Adds `authorization: Bearer <token>` to a call; nothing for an empty token (an --insecure
// master). The one place a client or worker sets the header.
void AddBearerToken(grpc::ClientContext& context, const std::string& token);

// What to warn about before a token travels without TLS to a host other than loopback (anyone
// on the path could read it); empty when nothing.
std::string CleartextTokenWarning(const ChannelOptions& options, bool has_token);

// Status conversion at the gRPC edge.
grpc::Status ToGrpcStatus(const absl::Status& status);
// The same from a server's call: a refusal naming the master that serves the call's partition
// (kServingMasterPayload) names it in the trailing metadata too (kServingMaster).
grpc::Status ToGrpcStatus(const absl::Status& status, grpc::ServerContextBase* context);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace taskmaster
