#pragma once

// Hosts in network namespaces, for tests that need a network between processes which can be cut:
// each host is a namespace with one address, and every host's link (a veth pair) ends on a bridge
// in a namespace of its own, the switch. A link is cut with iptables inside a host's namespace.
// Only these namespaces and the veth pairs that live in them are made: the root namespace's
// network is never touched, and deleting the namespaces takes the links and rules with them.

#include <string>
#include <vector>

namespace taskmaster::testing {

class NetworkNamespaces {
 public:
  // Hosts called `hosts`, the i-th at `subnet` followed by i + 1 on a /24 (`subnet` as
  // "198.18.0."). Needs root, iproute2 and iptables; skip() says why when they cannot work.
  NetworkNamespaces(std::vector<std::string> hosts, std::string subnet);
  // Deletes every namespace it made, and fails the test if one is left behind. Processes still
  // running in them must be stopped first (they keep a deleted namespace alive).
  ~NetworkNamespaces();
  NetworkNamespaces(const NetworkNamespaces&) = delete;
  NetworkNamespaces& operator=(const NetworkNamespaces&) = delete;

  // Empty when the hosts are up; else why not, for GTEST_SKIP.
  const std::string& skip() const { return skip_; }

  std::string Address(const std::string& host) const;
  // `argv` to run inside `host`'s namespace.
  std::vector<std::string> In(const std::string& host, std::vector<std::string> argv) const;
  // Drops every packet between `host` and `peer`, inside `host`'s namespace (`cut`), or stops
  // dropping them. False (with the reason on stderr) if iptables refused.
  bool Cut(const std::string& host, const std::string& peer, bool cut) const;

 private:
  size_t Index(const std::string& host) const;
  std::string Namespace(const std::string& host) const;

  std::vector<std::string> hosts_;
  std::string subnet_;
  std::string prefix_;                // of the namespaces' names: unique to this process
  std::vector<std::string> created_;  // namespaces to delete
  std::string skip_;
};

}  // namespace taskmaster::testing
