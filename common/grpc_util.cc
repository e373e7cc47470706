#include "common/grpc_util.h"

#include <algorithm>

#include "common/partition.h"
#include "common/util.h"

namespace taskmaster {

void AddBearerToken(grpc::ClientContext& context, const std::string& token) {
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
}

MasterAddresses::MasterAddresses(const std::string& list) : all_(SplitList(list)) {}

std::string MasterAddresses::current() const {
  absl::MutexLock lock(&mu_);
  return all_.empty() ? "" : all_[current_];
}

bool MasterAddresses::Failed(const std::string& failed, const std::string& serving_at) {
  absl::MutexLock lock(&mu_);
  if (all_.empty() || all_[current_] != failed) return false;  // another caller moved on
  ++failures_;
  auto named = std::find(all_.begin(), all_.end(), serving_at);
  current_ = named != all_.end() && !serving_at.empty() ? static_cast<size_t>(named - all_.begin())
                                                        : (current_ + 1) % all_.size();
  if (failures_ < all_.size()) return false;
  failures_ = 0;
  return true;
}

void MasterAddresses::Served(const std::string& address) {
  absl::MutexLock lock(&mu_);
  if (!all_.empty() && all_[current_] == address) failures_ = 0;
}

std::string ServingMaster(const grpc::ClientContext& context) {
  const auto& trailers = context.GetServerTrailingMetadata();
  auto it = trailers.find(kServingMaster);
  return it == trailers.end() ? "" : std::string(it->second.data(), it->second.size());
}

std::string CleartextTokenWarning(const ChannelOptions& options, bool has_token) {
  if (!has_token || !options.tls_ca_file.empty()) return "";
  for (const std::string& address : SplitList(options.address)) {
    if (!IsLoopbackAddress(address)) {
      return "the token goes to " + address +
             " in clear (no --tls-ca): anyone on the path can read it and act with it";
    }
  }
  return "";
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ChannelOptions& options) {
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (options.tls_ca_file.empty()) {
    if (!options.tls_cert_file.empty()) {
      return absl::InvalidArgumentError("a client certificate needs --tls-ca as well");
    }
    creds = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    absl::StatusOr<std::string> ca = ReadWholeFile(options.tls_ca_file);
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
    if (!options.tls_cert_file.empty() || !options.tls_key_file.empty()) {
      absl::StatusOr<std::string> cert = ReadWholeFile(options.tls_cert_file);
      if (!cert.ok()) return cert.status();
      absl::StatusOr<std::string> key = ReadWholeFile(options.tls_key_file);
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *cert;
      ssl.pem_private_key = *key;
    }
    creds = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  if (options.keepalive_ms > 0) {
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(options.keepalive_ms));
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                static_cast<int>(std::max<int64_t>(1'000, options.keepalive_ms / 2)));
    args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  }
  // A channel of its own connections: one that failed does not share gRPC's cached backoff
  // with the fresh channel our reconnect loops make, so their own jittered backoff governs.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  // A long-lived channel (a client library user's) retries a lost master every second at most,
  // instead of backing off to gRPC's default of two minutes.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1'000);
  return grpc::CreateCustomChannel(options.address, creds, args);
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::Status ToGrpcStatus(const absl::Status& status, grpc::ServerContextBase* context) {
  if (auto owner = status.GetPayload(kServingMasterPayload)) {
    context->AddTrailingMetadata(kServingMaster, std::string(*owner));
  }
  return ToGrpcStatus(status);
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

}  // namespace taskmaster
