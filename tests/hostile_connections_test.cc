// Hostile cases at the connection level: bytes of no protocol, plaintext and wrong certificates
// against TLS, a flood of connections and streams, and handshakes that stall (hostile_common.h).
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <functional>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/hostile_common.h"

namespace taskmaster::testing::hostile {
namespace {

// Bytes that are not HTTP/2 (random, HTTP/1.1, a preface cut short, frames that break the
// protocol) on the plaintext port, where they reach the HTTP/2 parser directly. The master closes
// every connection it can tell is broken; a preface cut short waits for gRPC's handshake deadline
// (120 s) or for the attacker to go.
TEST_F(Hostile, GarbageBytesOnThePort) {
  Start(Security::kPlain);
  if (HasFatalFailure()) return;
  BeginAttack();
  std::mt19937 rng(20261129);
  const std::vector<std::pair<std::string, std::function<std::string()>>> broken = {
      {"random bytes", [&] { return Garbage(rng); }},
      {"an HTTP/1.1 request",
       [] {
         return std::string("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n");
       }},
      // A DATA frame on stream 0 announcing 16 MiB: over any frame size, on the wrong stream.
      {"an oversized frame",
       [] { return absl::StrCat(kHttp2Preface, FrameHeader((1 << 24) - 1, 0, 0, 0)); }},
      // A complete HEADERS frame (END_HEADERS) on stream 1 whose block starts with index 0,
      // which no header has: a compression error, which ends the connection.
      {"a broken header block",
       [] {
         return absl::StrCat(kHttp2Preface, FrameHeader(0, 4, 0, 0), FrameHeader(1, 1, 4, 1),
                             "\x80");
       }},
  };
  Repeat(5000, [&] {
    for (const auto& [what, bytes] : broken) {
      RawConnection c(cluster_->port());
      ASSERT_TRUE(c.connected());
      c.Send(bytes());
      const bool closed = c.ClosedByPeer(seconds(5));
      EXPECT_TRUE(closed) << what << ": the master kept the connection";
      tally_.Add(closed ? "closed" : "kept");
    }
    RawConnection cut(cluster_->port());
    cut.Send(std::string_view(kHttp2Preface, 10));
    tally_.Add("preface_cut_short_left_by_us");
  });
  EndAttack(absl::StrCat(rounds_, " rounds of ", broken.size(),
                         " broken connections and a preface cut short"));
}

// A plaintext client on the TLS port: its calls fail with UNAVAILABLE (no TLS handshake), as do
// HTTP/2 and random bytes in clear; nothing reaches the services.
TEST_F(Hostile, PlaintextToTheTlsPort) {
  Start(Security::kTls);
  if (HasFatalFailure()) return;
  BeginAttack();
  std::mt19937 rng(7);
  Repeat(5000, [&] {
    auto plain = RawChannel(With({}));
    Expect("Stats in clear",
           Unary(&v1::TaskQueue::Stub::Stats, plain, v1::StatsRequest(), Bearer(kSubmitToken)),
           absl::StatusCode::kUnavailable);
    Expect("a worker stream in clear", Refusal(plain, Hello("plain", {"square"}, 1, 1)),
           absl::StatusCode::kUnavailable);
    for (const auto& [what, bytes] : {std::pair<std::string, std::string>{"HTTP/2", kHttp2Preface},
                                      {"random bytes", Garbage(rng)}}) {
      RawConnection c(cluster_->port());
      c.Send(bytes);
      const bool closed = c.ClosedByPeer(seconds(5));
      EXPECT_TRUE(closed) << what << " in clear: the master kept the connection";
      tally_.Add(closed ? "closed" : "kept");
    }
  });
  EndAttack(absl::StrCat(rounds_,
                         " rounds of: Stats and a worker stream in clear, an HTTP/2 preface "
                         "and 4 KiB of random bytes to the TLS port"));
}

// Under mutual TLS: a client that trusts another CA, one without a certificate and one with a
// certificate of another CA never get past the handshake (UNAVAILABLE); each round uses new
// connections, so each is a full handshake the master refuses.
TEST_F(Hostile, WrongCertificates) {
  Start(Security::kMutualTls);
  if (HasFatalFailure()) return;
  BeginAttack();
  const std::vector<std::pair<std::string, ChannelOptions>> wrong = {
      {"trusting another CA", Tls(Rogue("ca.pem"), Ours("client.pem"), Ours("client.key"))},
      {"without a client certificate", Tls(Ours("ca.pem"), "", "")},
      {"with a client certificate of another CA",
       Tls(Ours("ca.pem"), Rogue("client.pem"), Rogue("client.key"))},
  };
  Repeat(1000, [&] {
    for (const auto& [what, tls] : wrong) {
      auto channel = RawChannel(With(tls));
      Expect(what,
             Unary(&v1::TaskQueue::Stub::Stats, channel, v1::StatsRequest(), Bearer(kSubmitToken)),
             absl::StatusCode::kUnavailable);
      Expect(what + ", as a worker", Refusal(channel, Hello("rogue", {"square"}, 1, 1)),
             absl::StatusCode::kUnavailable);
    }
  });
  EndAttack(absl::StrCat(rounds_, " rounds of Stats and a worker stream, each ", wrong.size(),
                         " ways with wrong certificates"));
}

// 1,000 TCP connections that never finish their TLS handshake (the master would hold each for
// gRPC's handshake deadline, 120 s), and 100 authenticated connections holding 1,000 WatchJob
// streams (one more is over the token's limit) and 100 worker streams that never say hello,
// all at once: the master holds them within
// its memory bound, the honest client keeps getting results, a new client is served, and once
// they close the master has let go of every one.
TEST_F(Hostile, AFloodOfConnectionsAndStreams) {
  rlimit limit{};
  getrlimit(RLIMIT_NOFILE, &limit);
  const rlim_t needed = kFloodConnections + kFloodChannels + 500;
  if (limit.rlim_cur < needed) {
    GTEST_SKIP() << "the flood needs " << needed << " descriptors; the limit is " << limit.rlim_cur;
  }
  Start(Security::kMutualTls);
  if (HasFatalFailure()) return;
  // A job that never ends (no worker runs its kind), for the flood to follow.
  auto parked = cluster_->NewClient()->Submit(Tasks("parked", {"x"}));
  ASSERT_TRUE(parked.ok()) << parked.status();
  BeginAttack();
  std::vector<RawConnection> sockets;
  for (int i = 0; i < kFloodConnections; ++i) {
    sockets.emplace_back(cluster_->port());
    ASSERT_TRUE(sockets.back().connected()) << "connection " << i;
    // Half stop after a TLS record header, half send nothing.
    if (i % 2 == 1) sockets.back().Send(std::string_view("\x16\x03\x01", 3));
  }
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<RawWatch>> watches;
  std::vector<std::unique_ptr<RawWorker>> silent;
  for (int c = 0; c < kFloodChannels; ++c) {
    channels.push_back(RawChannel(Legit()));
    for (int s = 0; s < kWatchesPerChannel; ++s) {
      // The attacker's own token: each token holds at most --max-watches-per-token (1,000).
      watches.push_back(std::make_unique<RawWatch>(channels.back(), parked->job_id(), seconds(90),
                                                   Bearer(kAdminToken)));
      // The first event comes at once: the stream is open on the master.
      v1::JobEvent first;
      ASSERT_TRUE(watches.back()->Read(&first)) << "watch " << watches.size();
    }
    silent.push_back(std::make_unique<RawWorker>(channels.back(), Bearer(kWorkToken), seconds(90)));
  }
  {
    RawWatch over_quota(channels.back(), parked->job_id(), seconds(10), Bearer(kAdminToken));
    v1::JobEvent none;
    EXPECT_FALSE(over_quota.Read(&none));
    Expect("a watch past the token's limit", over_quota.Finish(),
           absl::StatusCode::kResourceExhausted);
  }
  const int flood_fds = OpenFds(master_pid());
  EXPECT_GE(flood_fds, baseline_fds_ + kFloodConnections + kFloodChannels)
      << "the master does not hold the flood";
  SampleMemory();
  auto fresh = cluster_->NewClient();
  EXPECT_TRUE(fresh->Stats().ok()) << "a client connecting during the flood is not served";
  EXPECT_TRUE(HonestKeepsUp()) << "the honest client stalled under the flood";
  SampleMemory();
  for (auto& w : watches)
    Expect("a flood watch, closed", w->Cancel(), absl::StatusCode::kCancelled);
  for (auto& w : silent) {
    Expect("a silent worker stream, closed", w->Cancel(), absl::StatusCode::kCancelled);
  }
  watches.clear();
  silent.clear();
  channels.clear();
  sockets.clear();
  int fds = 0;
  EXPECT_TRUE(WaitFor(
      [&] {
        fds = OpenFds(master_pid());
        return fds <= baseline_fds_ + 8;
      },
      seconds(30)))
      << "the master still holds " << fds - baseline_fds_ << " descriptors of the flood";
  Note("master_fds_during", flood_fds - baseline_fds_);
  Note("master_fds_after", fds - baseline_fds_);
  EndAttack(absl::StrCat(kFloodConnections, " stalled TLS connections + ", kFloodChannels,
                         " connections with ", kFloodChannels * kWatchesPerChannel,
                         " WatchJob streams and ", kFloodChannels, " silent worker streams"));
}

// Connections that never finish their TLS handshake are closed once --handshake-timeout-ms has
// passed, not held for gRPC's default of 120 s.
TEST_F(Hostile, StalledHandshakesAreClosed) {
  Start(Security::kTls, {"--handshake-timeout-ms", "1000"});
  if (HasFatalFailure()) return;
  BeginAttack();
  std::vector<RawConnection> stalled;
  for (int i = 0; i < 50; ++i) {
    stalled.emplace_back(cluster_->port());
    ASSERT_TRUE(stalled.back().connected()) << "connection " << i;
    if (i % 2 == 1) stalled.back().Send(std::string_view("\x16\x03\x01", 3));
  }
  EXPECT_TRUE(HonestKeepsUp());
  int closed = 0;
  for (RawConnection& c : stalled) closed += c.ClosedByPeer(seconds(10));
  EXPECT_EQ(closed, 50);
  Note("closed_by_master", closed);
  EndAttack("50 connections that stall in the TLS handshake, --handshake-timeout-ms 1000");
}

}  // namespace
}  // namespace taskmaster::testing::hostile
