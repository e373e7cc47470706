// A small HTTP/1.1 server of our own for the admin listeners: GET (and HEAD) only, one request per
// connection, bounded in every dimension a stranger controls. cpp-httplib (Debian's 0.11) was
// tried first and dropped: it reads any number of header lines before a handler can refuse the
// request (one connection grew the master by 300 MB), and its stop could hang.
#include "common/admin_http.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/util.h"

namespace taskmaster {
namespace {

using Clock = std::chrono::steady_clock;

// A request's line and headers: no page here takes a body or a long URL.
constexpr size_t kMaxRequestBytes = 8 << 10;
// The whole of a request (TLS handshake included) must arrive within this, and the whole reply
// leave within kWriteTimeout: a slow peer holds a connection for no longer.
constexpr auto kReadTimeout = std::chrono::seconds(3);
constexpr auto kWriteTimeout = std::chrono::seconds(10);
// Connections served at once; one more is closed at once. Each has a thread of its own while it
// lasts, so that probes are not queued behind slow peers.
constexpr int kMaxConnections = 32;
// After a reply, what a peer may still send is read and dropped, this much for this long.
constexpr auto kLinger = std::chrono::seconds(1);
constexpr size_t kMaxLingerBytes = 64 << 10;

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

const char* Reason(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 421:
      return "Misdirected Request";
    case 431:
      return "Request Header Fields Too Large";
    case 503:
      return "Service Unavailable";
  }
  return "Error";
}

// The value of header `name` (case-insensitive) in `head`, the lines after the request line.
std::string HeaderValue(std::string_view head, std::string_view name) {
  size_t at = head.find("\r\n");
  while (at != std::string_view::npos && at + 2 < head.size()) {
    const size_t start = at + 2;
    const size_t end = head.find("\r\n", start);
    const std::string_view line =
        head.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start);
    const size_t colon = line.find(':');
    if (colon != std::string_view::npos && colon == name.size() &&
        absl::EqualsIgnoreCase(absl::string_view(line.data(), colon),
                               absl::string_view(name.data(), name.size()))) {
      return std::string(Trim(line.substr(colon + 1)));
    }
    at = end;
  }
  return "";
}

// Header lines as RFC 9112 has them: a name of visible characters right before its colon, no
// control characters anywhere (a NUL would end the name a C function reads), one Host at most.
bool WellFormedHeaders(std::string_view head) {
  for (char c : head) {
    const auto u = static_cast<unsigned char>(c);
    if ((u < 0x20 && c != '\r' && c != '\n' && c != '\t') || u == 0x7f) return false;
  }
  int hosts = 0;
  size_t at = head.find("\r\n");
  while (at != std::string_view::npos && at + 2 < head.size()) {
    const size_t start = at + 2;
    const size_t end = head.find("\r\n", start);
    const std::string_view line = head.substr(start, end - start);
    const size_t colon = line.find(':');
    if (colon == 0 || colon == std::string_view::npos) return false;
    for (char c : line.substr(0, colon)) {
      if (c == ' ' || c == '\t' || static_cast<unsigned char>(c) > 0x7e) return false;
    }
    if (absl::EqualsIgnoreCase(absl::string_view(line.data(), colon), "host")) ++hosts;
    at = end;
  }
  return hosts <= 1;
}

// A Host header that names this machine's loopback (any port), or none: on loopback, a page a
// browser loaded from elsewhere must not reach the listener through a name it rebound to
// 127.0.0.1.
bool LoopbackHost(std::string_view host) {
  if (host.empty()) return true;
  // A port, if any, must be digits: IsLoopbackAddress reads only what comes before it.
  const size_t colon = host.rfind(':');
  const size_t bracket = host.rfind(']');
  if (colon != std::string_view::npos && (bracket == std::string_view::npos || colon > bracket)) {
    const std::string_view port = host.substr(colon + 1);
    if (!std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      return false;
    }
  }
  return IsLoopbackAddress(absl::AsciiStrToLower(absl::string_view(host.data(), host.size())));
}

// One connection's transport: the socket, and TLS over it when the server has a context. Every
// operation gives up at its deadline or when `stop` is readable.
class Connection {
 public:
  Connection(int fd, SSL_CTX* tls, int stop) : fd_(fd), stop_(stop) {
    if (tls) ssl_ = SSL_new(tls);
    if (ssl_) SSL_set_fd(ssl_, fd_);
  }
  ~Connection() {
    if (ssl_) SSL_free(ssl_);
    close(fd_);
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  bool Handshake(Clock::time_point deadline) {
    if (!ssl_) return true;
    while (true) {
      const int r = SSL_accept(ssl_);
      if (r == 1) return true;
      if (!WaitFor(SSL_get_error(ssl_, r), deadline)) return false;
    }
  }

  // Up to `size` bytes; 0 at the end of the stream, -1 on an error or past the deadline.
  ssize_t Read(char* data, size_t size, Clock::time_point deadline) {
    while (true) {
      if (!ssl_) {
        const ssize_t n = recv(fd_, data, size, 0);
        if (n >= 0) return n;
        if (errno != EAGAIN && errno != EINTR) return -1;
        if (!Wait(POLLIN, deadline)) return -1;
        continue;
      }
      const int n = SSL_read(ssl_, data, static_cast<int>(size));
      if (n > 0) return n;
      const int error = SSL_get_error(ssl_, n);
      if (error == SSL_ERROR_ZERO_RETURN) return 0;
      if (!WaitFor(error, deadline)) return -1;
    }
  }

  bool WriteAll(std::string_view data, Clock::time_point deadline) {
    while (!data.empty()) {
      ssize_t n;
      if (ssl_) {
        const int w = SSL_write(ssl_, data.data(), static_cast<int>(data.size()));
        if (w <= 0 && !WaitFor(SSL_get_error(ssl_, w), deadline)) return false;
        n = std::max(w, 0);
      } else {
        n = send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
        if (n < 0 && ((errno != EAGAIN && errno != EINTR) || !Wait(POLLOUT, deadline))) {
          return false;
        }
        n = std::max<ssize_t>(n, 0);
      }
      data.remove_prefix(static_cast<size_t>(n));
    }
    if (ssl_) SSL_shutdown(ssl_);  // close_notify, without waiting for the peer's
    return true;
  }

  // Closes our side and reads what the peer still sends, a little and briefly, before the
  // descriptor closes: closing on unread data would reset the connection, and a peer cut off
  // mid-request (431) might lose the reply it has not read yet.
  void Linger() {
    shutdown(fd_, SHUT_WR);
    const Clock::time_point until = Clock::now() + kLinger;
    char buffer[4096];
    for (size_t drained = 0; drained < kMaxLingerBytes;) {
      const ssize_t n = recv(fd_, buffer, sizeof(buffer), 0);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return;
      if (n < 0 && !Wait(POLLIN, until)) return;
      drained += static_cast<size_t>(std::max<ssize_t>(n, 0));
    }
  }

 private:
  bool WaitFor(int ssl_error, Clock::time_point deadline) {
    if (ssl_error == SSL_ERROR_WANT_READ) return Wait(POLLIN, deadline);
    if (ssl_error == SSL_ERROR_WANT_WRITE) return Wait(POLLOUT, deadline);
    ERR_clear_error();
    return false;
  }

  bool Wait(short events, Clock::time_point deadline) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return false;
    pollfd fds[2] = {{fd_, events, 0}, {stop_, POLLIN, 0}};
    const int ready = poll(fds, 2, static_cast<int>(left));
    return ready > 0 && (fds[0].revents & (events | POLLHUP | POLLERR)) && !fds[1].revents;
  }

  const int fd_;
  const int stop_;
  SSL* ssl_ = nullptr;
};

}  // namespace

struct AdminHttpServer::State {
  AdminHttpOptions options;
  // On loopback, a request's Host must name loopback too (no DNS rebinding).
  bool check_host = false;
  std::map<std::string, HttpRoute> routes;  // by exact path
  std::shared_ptr<spdlog::logger> log;
  SSL_CTX* tls = nullptr;
  int listener = -1;
  int stop_pipe[2] = {-1, -1};  // written once to stop: every poll watches the read end
  int port = 0;
  std::thread acceptor;
  std::mutex mu;
  int active = 0;  // guarded by mu: connections being served
  // Of those, the ones still reading their request, with when they came (guarded by mu).
  std::map<int, Clock::time_point> reading;
  std::condition_variable idle;

  ~State() {
    if (tls) SSL_CTX_free(tls);
    for (int fd : {listener, stop_pipe[0], stop_pipe[1]}) {
      if (fd >= 0) close(fd);
    }
  }

  void Accept() {
    while (true) {
      pollfd fds[2] = {{listener, POLLIN, 0}, {stop_pipe[0], POLLIN, 0}};
      if (poll(fds, 2, -1) < 0 && errno != EINTR) return;
      if (fds[1].revents) return;
      if (!(fds[0].revents & POLLIN)) continue;
      const int fd = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          // The connection stays queued, and poll would wake for it at once again: wait a
          // little for descriptors or memory to come back rather than spin.
          pollfd stop{stop_pipe[0], POLLIN, 0};
          if (poll(&stop, 1, 100) > 0) return;
        }
        continue;  // else the peer left already
      }
      {
        std::lock_guard<std::mutex> lock(mu);
        if (active >= kMaxConnections) {
          // Full: the connection that has been reading its request the longest makes room (its
          // thread sees its stream end), so that idle peers cannot keep a probe out. Threads
          // stay bounded, as evicted ones end within a poll.
          auto oldest = std::min_element(reading.begin(), reading.end(),
                                         [](auto& a, auto& b) { return a.second < b.second; });
          if (oldest == reading.end() || active >= 2 * kMaxConnections) {
            close(fd);
            continue;
          }
          shutdown(oldest->first, SHUT_RDWR);
          reading.erase(oldest);
        }
        ++active;
        reading.emplace(fd, Clock::now());
      }
      try {
        std::thread([this, fd] {
          Serve(fd);
          std::lock_guard<std::mutex> lock(mu);
          --active;
          idle.notify_all();
        }).detach();
      } catch (const std::system_error&) {  // no thread to be had (a pids limit): refuse it
        std::lock_guard<std::mutex> lock(mu);
        reading.erase(fd);
        close(fd);
        --active;
        idle.notify_all();
      }
    }
  }

  // The connection on `fd` has read its request (or given up): it can no longer be evicted.
  void DoneReading(int fd) {
    std::lock_guard<std::mutex> lock(mu);
    reading.erase(fd);
  }

  // The request's line and headers, each line ending in CRLF; nullopt when the peer left, was
  // too slow, or sent more than kMaxRequestBytes (then `too_large`).
  static std::optional<std::string> ReadHead(Connection& connection, bool* too_large) {
    const Clock::time_point read_by = Clock::now() + kReadTimeout;
    if (!connection.Handshake(read_by)) return std::nullopt;
    std::string request;
    char buffer[2048];
    while (true) {
      if (const size_t end = request.find("\r\n\r\n"); end != std::string::npos) {
        request.resize(end + 2);
        return request;
      }
      if (request.size() >= kMaxRequestBytes) {
        *too_large = true;
        return std::nullopt;
      }
      const ssize_t n = connection.Read(
          buffer, std::min(sizeof(buffer), kMaxRequestBytes - request.size()), read_by);
      if (n <= 0) return std::nullopt;
      request.append(buffer, static_cast<size_t>(n));
    }
  }

  void Serve(int fd) {
    Connection connection(fd, tls, stop_pipe[0]);
    bool too_large = false;
    const std::optional<std::string> request = ReadHead(connection, &too_large);
    // Before the descriptor closes, so that an eviction never shuts down a reused descriptor.
    DoneReading(fd);
    if (too_large) {
      Reply(connection, {431, "text/plain; charset=utf-8", "request too large\n"}, false);
      return;
    }
    if (!request) return;  // gone, or too slow
    const std::string_view head = *request;
    const std::string_view line = head.substr(0, head.find("\r\n"));
    const size_t space = line.find(' ');
    const size_t second = space == std::string_view::npos ? space : line.find(' ', space + 1);
    const std::string_view version =
        second == std::string_view::npos ? std::string_view() : line.substr(second + 1);
    if ((version != "HTTP/1.1" && version != "HTTP/1.0") || !WellFormedHeaders(head)) {
      Reply(connection, {400, "text/plain; charset=utf-8", "bad request\n"}, false);
      return;
    }
    const std::string_view method = line.substr(0, space);
    std::string_view target = line.substr(space + 1, second - space - 1);
    target = target.substr(0, target.find('?'));
    const bool head_only = method == "HEAD";
    if (method != "GET" && !head_only) {
      Reply(connection, {405, "text/plain; charset=utf-8", "GET only\n"}, false);
      return;
    }
    if (check_host && !LoopbackHost(HeaderValue(head, "Host"))) {
      Reply(connection, {421, "text/plain; charset=utf-8", "not a name of this host\n"}, head_only);
      return;
    }
    auto route = routes.find(std::string(target));
    if (route == routes.end()) {
      Reply(connection, {404, "text/plain; charset=utf-8", "not found\n"}, head_only);
      return;
    }
    if (!route->second.probe && options.authorize &&
        !options.authorize(HeaderValue(head, "Authorization"))) {
      Reply(connection,
            {401, "text/plain; charset=utf-8",
             "an admin token is needed: Authorization: Bearer <token>, or as the password of "
             "Basic authentication\n"},
            head_only, "WWW-Authenticate: Basic realm=\"taskmaster\", charset=\"UTF-8\"\r\n");
      return;
    }
    Reply(connection, route->second.handler(), head_only);
  }

  void Reply(Connection& connection, const HttpReply& reply, bool head_only,
             const std::string& extra_headers = "") {
    // Pages and data of the daemon's own: nothing here may be framed or sniffed elsewhere.
    std::string out = absl::StrCat(
        "HTTP/1.1 ", reply.status, " ", Reason(reply.status),
        "\r\nContent-Type: ", reply.content_type, "\r\nContent-Length: ", reply.body.size(),
        "\r\nConnection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: "
        "nosniff\r\nX-Frame-Options: DENY\r\n",
        extra_headers, "\r\n");
    if (!head_only) out += reply.body;
    if (connection.WriteAll(out, Clock::now() + kWriteTimeout)) connection.Linger();
  }
};

AdminHttpServer::AdminHttpServer(std::unique_ptr<State> state) : state_(std::move(state)) {}

AdminHttpServer::~AdminHttpServer() {
  const char byte = 0;
  if (write(state_->stop_pipe[1], &byte, 1) < 0) {
    state_->log->error("cannot stop the admin listener's threads: {}", strerror(errno));
  }
  if (state_->acceptor.joinable()) state_->acceptor.join();
  // Connections see the pipe too, and end within a poll.
  std::unique_lock<std::mutex> lock(state_->mu);
  state_->idle.wait(lock, [this] { return state_->active == 0; });
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
  state->options = options;
  state->check_host = IsLoopbackAddress(options.listen);
  state->log = std::move(log);
  for (HttpRoute& route : routes) state->routes.emplace(route.path, std::move(route));
  if (tls) {
    state->tls = SSL_CTX_new(TLS_server_method());
    if (!state->tls || !SSL_CTX_set_min_proto_version(state->tls, TLS1_2_VERSION) ||
        SSL_CTX_use_certificate_chain_file(state->tls, options.tls_cert.c_str()) != 1 ||
        SSL_CTX_use_PrivateKey_file(state->tls, options.tls_key.c_str(), SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(state->tls) != 1) {
      ERR_clear_error();
      return absl::InvalidArgumentError(
          absl::StrCat("cannot serve HTTPS with ", options.tls_cert, " and ", options.tls_key,
                       ": check that they are a PEM certificate and its key"));
    }
  }
  const auto& [host, port] = *address;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.empty() ? nullptr : host.c_str(), std::to_string(port).c_str(), &hints,
                  &found) != 0 ||
      !found) {
    return absl::InvalidArgumentError(
        absl::StrCat("admin address '", options.listen, "': no such host"));
  }
  const int fd = socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  const int on = 1;
  const bool bound = fd >= 0 && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) == 0 &&
                     bind(fd, found->ai_addr, found->ai_addrlen) == 0 && listen(fd, 64) == 0;
  freeaddrinfo(found);
  state->listener = fd;
  sockaddr_storage local{};
  socklen_t length = sizeof(local);
  if (!bound || getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for admin requests on ",
                                               options.listen, ": ", strerror(errno)));
  }
  state->port =
      ntohs(local.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&local)->sin6_port
                                        : reinterpret_cast<sockaddr_in*>(&local)->sin_port);
  if (pipe2(state->stop_pipe, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("cannot make a pipe: ", strerror(errno)));
  }
  State* s = state.get();
  state->acceptor = std::thread([s] { s->Accept(); });
  state->log->info("admin pages on {}://{}:{}", tls ? "https" : "http",
                   host.find(':') != std::string::npos ? "[" + host + "]" : host, state->port);
  return std::unique_ptr<AdminHttpServer>(new AdminHttpServer(std::move(state)));
}

}  // namespace taskmaster
