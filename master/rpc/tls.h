#pragma once

// The master's TLS: certificates checked before they are served, and served through credentials
// whose certificates can be replaced while the server runs (on SIGHUP), without dropping a
// connection.

#include <chrono>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/security/server_credentials.h"

namespace taskmaster {

struct TlsFiles {
  std::string cert_file;       // PEM certificate chain, the master's first
  std::string key_file;        // PEM private key of cert_file
  std::string client_ca_file;  // PEM CA bundle; set: clients must show a certificate it signed
};

// What TlsFiles held, checked.
struct TlsMaterial {
  std::string cert;
  std::string key;
  std::string client_ca;
  std::string subject;  // of the master's certificate, for logs
  std::chrono::system_clock::time_point not_after;
};

// Reads `files` and checks them as of `now`: each certificate parses and is valid now (neither
// expired nor not yet valid), the key parses and belongs to the master's certificate, and the CA
// bundle holds at least one valid certificate. Errors name the file and what to do.
absl::StatusOr<TlsMaterial> LoadTlsMaterial(const TlsFiles& files,
                                            std::chrono::system_clock::time_point now);

// Server credentials that serve the latest material given to them: every TLS handshake after
// Replace uses the new certificate, key and CA; connections made before keep theirs.
// Thread-safe; must outlive every server it was added to.
class ReloadableServerCredentials final : public grpc::ServerCredentials {
 public:
  explicit ReloadableServerCredentials(TlsMaterial material);
  ~ReloadableServerCredentials() override;

  void Replace(TlsMaterial material);

  // Token authentication happens in the services, not in a processor.
  void SetAuthMetadataProcessor(
      const std::shared_ptr<grpc::AuthMetadataProcessor>& processor) override {}

 private:
  int AddPortToServer(const std::string& addr, grpc_server* server) override;
  // gRPC asks before each handshake whether the certificates changed.
  static grpc_ssl_certificate_config_reload_status Fetch(
      void* self, grpc_ssl_server_certificate_config** config);

  const bool require_client_cert_;
  absl::Mutex mu_;
  TlsMaterial material_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t served_ ABSL_GUARDED_BY(mu_) = 0;  // the generation gRPC has
};

}  // namespace taskmaster
