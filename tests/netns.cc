#include "tests/netns.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tests/harness.h"

namespace taskmaster::testing {
namespace {

constexpr std::chrono::seconds kCommandTimeout(10);

}  // namespace

NetworkNamespaces::NetworkNamespaces(std::vector<std::string> hosts, std::string subnet)
    : hosts_(std::move(hosts)), subnet_(std::move(subnet)), prefix_(absl::StrCat("tm", getpid())) {
  if (geteuid() != 0) {
    skip_ = "network namespaces need root";
    return;
  }
  const std::string sw = prefix_ + "-switch";
  // Each step's failure names the command: the usual one is a missing iproute2 or iptables, or a
  // container that does not allow namespaces.
  auto run = [&](std::vector<std::string> argv) {
    if (!skip_.empty()) return;
    CommandResult r;
    try {
      r = RunCommand(argv, "", kCommandTimeout);
    } catch (const std::runtime_error& e) {  // not installed
      r.err = e.what();
    }
    if (r.exit_code != 0) {
      skip_ = absl::StrCat("cannot set up network namespaces (", absl::StrJoin(argv, " "), ": ",
                           r.err, "); root, iproute2 and iptables are needed");
    }
  };
  auto add_namespace = [&](const std::string& ns) {
    run({"ip", "netns", "add", ns});
    if (skip_.empty()) created_.push_back(ns);
  };
  add_namespace(sw);
  run({"ip", "-n", sw, "link", "add", "br0", "type", "bridge"});
  run({"ip", "-n", sw, "link", "set", "br0", "up"});
  for (size_t i = 0; i < hosts_.size(); ++i) {
    const std::string ns = Namespace(hosts_[i]);
    const std::string port = absl::StrCat("port", i);
    add_namespace(ns);
    // Made in the namespaces directly: the names never meet the root namespace's.
    run({"ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns",
         sw});
    run({"ip", "-n", sw, "link", "set", port, "master", "br0", "up"});
    run({"ip", "-n", ns, "addr", "add", Address(hosts_[i]) + "/24", "dev", "eth0"});
    run({"ip", "-n", ns, "link", "set", "eth0", "up"});
    run({"ip", "-n", ns, "link", "set", "lo", "up"});
    run(In(hosts_[i], {"iptables", "-L", "-n"}));
  }
}

NetworkNamespaces::~NetworkNamespaces() {
  for (const std::string& ns : created_) {
    CommandResult r = RunCommand({"ip", "netns", "delete", ns}, "", kCommandTimeout);
    if (r.exit_code != 0) {
      ADD_FAILURE() << "cannot delete network namespace " << ns << ": " << r.err;
    }
  }
  if (created_.empty()) return;
  // Lines of "NAME" or "NAME (id: N)".
  std::istringstream left(RunCommand({"ip", "netns", "list"}, "", kCommandTimeout).out);
  for (std::string line; std::getline(left, line);) {
    const std::string name = line.substr(0, line.find(' '));
    EXPECT_EQ(std::find(created_.begin(), created_.end(), name), created_.end())
        << "network namespace " << name << " is left behind";
  }
}

size_t NetworkNamespaces::Index(const std::string& host) const {
  const auto it = std::find(hosts_.begin(), hosts_.end(), host);
  if (it == hosts_.end()) throw std::invalid_argument("no host " + host);
  return it - hosts_.begin();
}

std::string NetworkNamespaces::Namespace(const std::string& host) const {
  return absl::StrCat(prefix_, "-", hosts_[Index(host)]);
}

std::string NetworkNamespaces::Address(const std::string& host) const {
  return absl::StrCat(subnet_, Index(host) + 1);
}

std::vector<std::string> NetworkNamespaces::In(const std::string& host,
                                               std::vector<std::string> argv) const {
  argv.insert(argv.begin(), {"ip", "netns", "exec", Namespace(host)});
  return argv;
}

bool NetworkNamespaces::Cut(const std::string& host, const std::string& peer, bool cut) const {
  const std::string op = cut ? "-A" : "-D";
  const std::string address = Address(peer);
  bool ok = true;
  // Outgoing first: from then on nothing `host` does reaches `peer`, even what it does with the
  // last packets that reach it before the second rule.
  for (const auto& rule : std::vector<std::vector<std::string>>{
           {"iptables", op, "OUTPUT", "-d", address, "-j", "DROP"},
           {"iptables", op, "INPUT", "-s", address, "-j", "DROP"}}) {
    CommandResult r = RunCommand(In(host, rule), "", kCommandTimeout);
    if (r.exit_code != 0) {
      std::cerr << absl::StrJoin(rule, " ") << " in " << Namespace(host) << ": " << r.err;
      ok = false;
    }
  }
  return ok;
}

}  // namespace taskmaster::testing
