// The daemons' admin HTTP listener: metrics, probes and the master's status page. GET only,
// small requests read within a deadline, a bounded number of connections, TLS with OpenSSL: it
// serves operators and scrapers, and anyone who can reach it is a stranger until it says
// otherwise.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "spdlog/logger.h"

namespace taskmaster {

struct AdminHttpOptions {
  // host:port; port 0 picks a free one (see AdminHttpServer::port).
  std::string listen;
  // Serve HTTPS with this certificate and key (PEM files).
  std::string tls_cert;
  std::string tls_key;
  // Off loopback the listener needs TLS, unless told this in so many words.
  bool allow_plaintext = false;
  // Whether a request's Authorization header lets it read what is not a probe; unset: every
  // request may. A browser is asked for it as a Basic password, a scraper sends it as Bearer.
  std::function<bool(std::string_view authorization)> authorize;
};

struct HttpReply {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};

struct HttpRoute {
  std::string path;  // matched exactly (a query string is ignored)
  // Answered without authorization: health probes carry none, and say only a status.
  bool probe = false;
  std::function<HttpReply()> handler;  // thread-safe: requests run on several threads
};

class AdminHttpServer {
 public:
  // Listens at once, and serves from its own threads until destroyed.
  static absl::StatusOr<std::unique_ptr<AdminHttpServer>> Start(
      const AdminHttpOptions& options, std::vector<HttpRoute> routes,
      std::shared_ptr<spdlog::logger> log);
  ~AdminHttpServer();  // stops serving and joins its threads
  AdminHttpServer(const AdminHttpServer&) = delete;
  AdminHttpServer& operator=(const AdminHttpServer&) = delete;

  int port() const;

 private:
  struct State;
  explicit AdminHttpServer(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace taskmaster
