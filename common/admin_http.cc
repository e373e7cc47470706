#include "common/admin_http.h"

#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/util.h"
#include "httplib.h"

namespace taskmaster {
namespace {

// A request line and headers beyond this are refused: no page here takes a body or a long URL.
constexpr size_t kMaxRequestBytes = 8 << 10;
// A peer that sends or reads nothing for this long is dropped, so that a few idle connections
// cannot hold every thread.
constexpr time_t kIoTimeoutSeconds = 5;

absl::StatusOr<std::pair<std::string, int>> SplitListen(const std::string& listen) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("admin address '", listen, "' must be host:port (127.0.0.1:7071)"));
  }
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  int port = 0;
  if (!absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("admin address '", listen, "' has no valid port (0 to 65535)"));
  }
  return std::make_pair(host, port);
}

}  // namespace

struct AdminHttpServer::State {
  std::unique_ptr<httplib::Server> server;
  std::thread thread;
  int port = 0;
};

AdminHttpServer::AdminHttpServer(std::unique_ptr<State> state) : state_(std::move(state)) {}

AdminHttpServer::~AdminHttpServer() {
  state_->server->stop();
  if (state_->thread.joinable()) state_->thread.join();
}

int AdminHttpServer::port() const { return state_->port; }

absl::StatusOr<std::unique_ptr<AdminHttpServer>> AdminHttpServer::Start(
    const AdminHttpOptions& options, std::vector<HttpRoute> routes,
    std::shared_ptr<spdlog::logger> log) {
  absl::StatusOr<std::pair<std::string, int>> address = SplitListen(options.listen);
  if (!address.ok()) return address.status();
  const bool tls = !options.tls_cert.empty();
  if (!tls && !options.allow_plaintext && !IsLoopbackAddress(options.listen)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the admin listener on ", options.listen,
        " is off loopback without TLS: its pages would cross the network in clear; listen on "
        "127.0.0.1, serve TLS (the master's --tls-cert and --tls-key), or say "
        "--admin-allow-plaintext"));
  }
  auto state = std::make_unique<State>();
  if (tls) {
    auto server =
        std::make_unique<httplib::SSLServer>(options.tls_cert.c_str(), options.tls_key.c_str());
    if (!server->is_valid()) {
      return absl::InvalidArgumentError(absl::StrCat("cannot serve HTTPS with ", options.tls_cert,
                                                     " and ", options.tls_key,
                                                     ": check that they are a PEM certificate "
                                                     "and its key"));
    }
    state->server = std::move(server);
  } else {
    state->server = std::make_unique<httplib::Server>();
  }
  httplib::Server& server = *state->server;
  const int threads = std::max(1, options.threads);
  server.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server.set_read_timeout(kIoTimeoutSeconds, 0);
  server.set_write_timeout(kIoTimeoutSeconds, 0);
  server.set_keep_alive_timeout(kIoTimeoutSeconds);
  server.set_payload_max_length(kMaxRequestBytes);
  auto authorize = options.authorize;
  for (HttpRoute& route : routes) {
    const std::string path = route.path;  // read before the route moves into its handler
    server.Get(path, [route = std::move(route), authorize](const httplib::Request& request,
                                                           httplib::Response& response) {
      if (!route.probe && authorize && !authorize(request.get_header_value("Authorization"))) {
        response.status = 401;
        response.set_header("WWW-Authenticate", "Basic realm=\"taskmaster\", charset=\"UTF-8\"");
        response.set_content(
            "an admin token is needed: Authorization: Bearer <token>, or as the "
            "password of Basic authentication\n",
            "text/plain; charset=utf-8");
        return;
      }
      HttpReply reply = route.handler();
      response.status = reply.status;
      // Pages and data of the master's own: nothing here may be framed or sniffed elsewhere.
      response.set_header("X-Content-Type-Options", "nosniff");
      response.set_header("X-Frame-Options", "DENY");
      response.set_header("Cache-Control", "no-store");
      response.set_content(std::move(reply.body), reply.content_type.c_str());
    });
  }
  const auto& [host, port] = *address;
  if (port == 0) {
    state->port = server.bind_to_any_port(host.c_str());
  } else {
    state->port = server.bind_to_port(host.c_str(), port) ? port : -1;
  }
  if (state->port <= 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for admin requests on ",
                                               options.listen,
                                               ": the address is in use or not this host's"));
  }
  state->thread = std::thread([&server] { server.listen_after_bind(); });
  log->info("admin pages on {}://{}:{}", tls ? "https" : "http", host, state->port);
  return std::unique_ptr<AdminHttpServer>(new AdminHttpServer(std::move(state)));
}

}  // namespace taskmaster
