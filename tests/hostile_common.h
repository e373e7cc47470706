#pragma once

// What the hostile tests share: the master's limits and memory bound, the honest client, the
// attackers' hand-made connections and streams, and the Hostile fixture (hostile_common.cc).
//
// Hostile tests: a real master (TLS, mutual TLS, or plain loopback where the case needs it) under
// attack, while an honest client keeps submitting square tasks and checking every result. Each
// attack must get its documented status, the honest client must keep getting exactly its results
// (nothing acknowledged lost or altered), and the master's memory must stay under a bound. Every
// case prints a FIGURES line: what was sent, what came back, the honest client's latency during
// the attack and the master's memory.

#include <gtest/gtest.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "grpcpp/grpcpp.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"
#include "tests/harness.h"

namespace taskmaster::testing::hostile {

using std::chrono::milliseconds;
using std::chrono::seconds;
using Clock = std::chrono::steady_clock;

// The master's limits in every case, small so that the memory bound below can be tight.
inline constexpr int kMaxMessageBytes = 16 << 20;
inline constexpr int kMaxWorkerBufferBytes = 8 << 20;
inline constexpr int kMaxBatch = 10'000;
inline constexpr int kMaxPayloadBytes = 1 << 20;  // the default

// The master's resident memory may grow at most this much over its baseline (taken once the
// cluster runs and the honest client is warm). What may legitimately grow in one case:
// - what the case stores: up to 24 MiB of payloads and as much of outputs (the worker that never
//   reads), a 10,000-task job of 512-byte outputs, the honest client's tasks;
// - messages being handled: up to --max-message-bytes (16 MiB) each, many times that as
//   objects (a hello holding the most a worker may hold, 100,000 tasks, ~0.8 MB on the wire,
//   costs ~19 MB while it is handled; a million used to be allowed, and cost ~185 MB each);
// - what waits for peers that do not read: --max-worker-buffer-bytes (8 MiB) per worker; one
//   event (at most 1 MiB) with its encoding per watcher, ~2 MiB for each of kSilentWatchers;
// - gRPC's buffers per connection and stream, ~30 KiB each in the flood;
// - jemalloc's retained pages, SQLite's page cache.
// Measured peaks (2 cores): +1 to +4 MB for garbage, certificates and tokens, +35 MB for the
// hostile field values, +69 MB for the flood, +85 MB for the watchers, +100 MB for the worker
// that never reads. A master that buffered for watchers
// without bound (a whole job each, 32 x ~12 MB) would pass it.
inline constexpr int64_t kMemoryBoundKib = 256 << 10;

inline constexpr int kTasksPerJob = 4;                  // per honest job
inline constexpr auto kHonestPeriod = milliseconds(5);  // at most 200 honest jobs a second
inline constexpr int64_t kWarmupJobs = 20;              // before the baseline is taken
// Honest jobs that must complete while an attack runs, and how long that may take at most.
inline constexpr int64_t kMinHonestJobs = 20;
inline constexpr auto kAttackCap = seconds(60);
// The shortest attack made of repeated rounds.
inline constexpr auto kMinAttack = seconds(2);
inline constexpr auto kCallDeadline = seconds(10);

inline constexpr int kFloodConnections = 1000;
inline constexpr int kFloodChannels = 100;
// With kFloodChannels: 1,000 WatchJob streams, and 100 silent worker streams.
inline constexpr int kWatchesPerChannel = 10;
inline constexpr int kSilentWatchers = 32;
inline constexpr int kBigJobTasks = 10'000;
inline constexpr size_t kBigJobOutputBytes = 512;

// ---- The master's memory and descriptors, from /proc ----

struct Memory {
  int64_t rss_kib = 0;  // resident now
  int64_t hwm_kib = 0;  // the peak resident size since the process started
};

Memory ReadMemory(pid_t pid);

int OpenFds(pid_t pid);

// ---- The honest client ----

struct Latency {
  int64_t jobs = 0;
  double p50_ms = 0, p99_ms = 0, max_ms = 0;
};

// Submits jobs of square tasks with known payloads one after another, follows each to its end
// and checks every result against its payload, recording each round trip (submit to last
// result). Thread-safe.
class HonestClient {
 public:
  struct Verdict {
    int64_t acknowledged = 0;  // tasks whose submit was answered OK
    int64_t correct = 0;
    int64_t lost = 0;     // acknowledged, no result even after the attack
    int64_t altered = 0;  // a result other than n*n=r
    int64_t errors = 0;   // calls that failed (submits, or follows retried after the attack)
    std::vector<std::string> samples;  // what went wrong, the first few
  };

  explicit HonestClient(std::unique_ptr<Client> client)
      : client_(std::move(client)), thread_([this] { Run(); }) {}
  ~HonestClient() { Stop(); }

  int64_t completed() const {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(latencies_ms_.size());
  }
  uint64_t last_task_id() const {
    std::lock_guard<std::mutex> lock(mu_);
    return last_task_id_;
  }
  bool WaitForJobs(int64_t n, milliseconds timeout) const {
    return WaitFor([&] { return completed() >= n; }, timeout);
  }

  // The round trips of the jobs completed after the first `from`.
  Latency Since(int64_t from) const;

  // Stops submitting, then follows again every job whose stream broke: a result missing after
  // that is lost.
  Verdict Stop();

 private:
  struct Job {
    std::string id;
    std::map<uint64_t, std::string> expected;  // task id → its result
  };

  void Run();

  // Follows `job` to its end and checks each of its results.
  absl::Status Follow(const Job& job);

  void ErrorLocked(std::string what) {
    verdict_.errors++;
    SampleLocked(std::move(what));
  }
  void SampleLocked(std::string what) {
    if (verdict_.samples.size() < 5) verdict_.samples.push_back(std::move(what));
  }

  const std::unique_ptr<Client> client_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;
  std::vector<double> latencies_ms_;  // in completion order
  uint64_t last_task_id_ = 0;
  std::vector<Job> unresolved_;  // acknowledged jobs whose stream broke
  Verdict verdict_;
  std::thread thread_;  // last: it starts once everything above is ready
};

// ---- Attackers' tools ----

// What came back for what the attack sent, counted by outcome for the FIGURES line.
class Tally {
 public:
  void Add(const std::string& outcome, int n = 1) {
    std::lock_guard<std::mutex> lock(mu_);
    counts_[outcome] += n;
  }
  std::string ToString() const {
    std::lock_guard<std::mutex> lock(mu_);
    return absl::StrJoin(counts_, ",", absl::PairFormatter("="));
  }

 private:
  mutable std::mutex mu_;
  std::map<std::string, int> counts_;
};

inline std::string Bearer(const std::string& token) { return "Bearer " + token; }

// A channel of its own connection (not shared with any other channel), with `tls` (or plaintext
// without a CA), taking messages of any size: an attacker's, made by hand.
std::shared_ptr<grpc::Channel> RawChannel(const ChannelOptions& tls,
                                          grpc::ChannelArguments args = {});

void Prepare(grpc::ClientContext& context, const std::string& authorization,
             milliseconds deadline = kCallDeadline);

// The status of one unary call made by hand, with `authorization` (none when empty).
template <typename Request, typename Response>
absl::Status Unary(grpc::Status (v1::TaskQueue::Stub::*method)(grpc::ClientContext*, const Request&,
                                                               Response*),
                   const std::shared_ptr<grpc::Channel>& channel, const Request& request,
                   const std::string& authorization) {
  grpc::ClientContext context;
  Prepare(context, authorization);
  Response response;
  return FromGrpcStatus(
      (v1::TaskQueue::NewStub(channel).get()->*method)(&context, request, &response));
}

// A worker stream made by hand.
class RawWorker {
 public:
  RawWorker(const std::shared_ptr<grpc::Channel>& channel, const std::string& authorization,
            milliseconds deadline = kCallDeadline)
      : stub_(v1::WorkerService::NewStub(channel)) {
    Prepare(context_, authorization, deadline);
    stream_ = stub_->Connect(&context_);
  }
  bool Write(const v1::WorkerMessage& m) { return stream_->Write(m); }
  bool Read(v1::MasterMessage* m) { return stream_->Read(m); }
  // Reads and drops what is left; the status the stream ended with.
  absl::Status End() {
    v1::MasterMessage m;
    while (stream_->Read(&m)) {
    }
    return FromGrpcStatus(stream_->Finish());
  }
  absl::Status Cancel() {
    context_.TryCancel();
    return End();
  }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::WorkerMessage, v1::MasterMessage>> stream_;
};

// A WatchJob stream made by hand; it reads only when told to.
class RawWatch {
 public:
  RawWatch(const std::shared_ptr<grpc::Channel>& channel, const std::string& job_id,
           milliseconds deadline, const std::string& authorization = Bearer(kSubmitToken))
      : stub_(v1::TaskQueue::NewStub(channel)) {
    Prepare(context_, authorization, deadline);
    v1::WatchJobRequest request;
    request.set_job_id(job_id);
    stream_ = stub_->WatchJob(&context_, request);
  }
  bool Read(v1::JobEvent* event) { return stream_->Read(event); }
  absl::Status Finish() { return FromGrpcStatus(stream_->Finish()); }
  absl::Status Cancel() {
    context_.TryCancel();
    return Finish();
  }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<v1::TaskQueue::Stub> stub_;
  std::unique_ptr<grpc::ClientReader<v1::JobEvent>> stream_;
};

// The refusal of a worker stream whose first message is `first`.
absl::Status Refusal(const std::shared_ptr<grpc::Channel>& channel, const v1::WorkerMessage& first,
                     const std::string& authorization = Bearer(kWorkToken));

v1::WorkerMessage Hello(const std::string& worker_id, const std::vector<std::string>& kinds,
                        int32_t slots, int32_t credits);

v1::SubmitRequest Tasks(const std::string& kind, const std::vector<std::string>& payloads);

// A TCP connection to the master's port, for bytes no client library would send.
class RawConnection {
 public:
  explicit RawConnection(int port);
  RawConnection(RawConnection&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  RawConnection& operator=(RawConnection&&) = delete;
  ~RawConnection() {
    if (fd_ >= 0) close(fd_);
  }
  bool connected() const { return fd_ >= 0; }

  void Send(std::string_view bytes);

  // Whether the master closed the connection within `timeout`; what it sends is dropped.
  bool ClosedByPeer(milliseconds timeout);

 private:
  int fd_;
};

inline constexpr char kHttp2Preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// An HTTP/2 frame header: 24-bit length, type, flags, stream id.
std::string FrameHeader(uint32_t length, uint8_t type, uint8_t flags, uint32_t stream);

// Bytes of no protocol: random after two zero bytes, which start no TLS record. (A TLS server
// waits, until its handshake deadline, for the rest of a record whose header looks right, and a
// second byte of 3 is enough: random bytes do that one time in 256.)
std::string Garbage(std::mt19937& rng);

// ---- The fixture ----

enum class Security { kPlain, kTls, kMutualTls };

class Hostile : public ::testing::Test {
 protected:
  static void SetUpTestSuite();
  static void TearDownTestSuite() { delete certs_; }

  static std::string Ours(const std::string& file) { return certs_->File("ours/" + file); }
  static std::string Rogue(const std::string& file) { return certs_->File("rogue/" + file); }

  // TLS settings trusting `ca`, presenting the client certificate `cert` (none when empty).
  static ChannelOptions Tls(const std::string& ca, const std::string& cert,
                            const std::string& key) {
    ChannelOptions tls;
    tls.tls_ca_file = ca;
    tls.tls_cert_file = cert;
    tls.tls_key_file = key;
    return tls;
  }

  // Starts the master, two honest workers and the honest client; takes the memory baseline.
  void Start(Security security, const std::vector<std::string>& master_flags = {});

  pid_t master_pid() { return cluster_->master().pid(); }
  // What a legitimate client of this cluster uses: its address and TLS settings.
  ChannelOptions Legit() const { return cluster_->channel(); }
  // `Legit()` with other TLS settings.
  ChannelOptions With(const ChannelOptions& tls) const {
    ChannelOptions o = tls;
    o.address = cluster_->address();
    return o;
  }

  void SampleMemory() { peak_rss_kib_ = std::max(peak_rss_kib_, ReadMemory(master_pid()).rss_kib); }

  // Counts `got` under `what` and checks it is `want`.
  void Expect(const std::string& what, const absl::Status& got, absl::StatusCode want) {
    EXPECT_EQ(got.code(), want) << what << ": " << got;
    tally_.Add(absl::StatusCodeToString(got.code()));
  }

  // A figure of the case for its FIGURES line.
  void Note(const std::string& name, int64_t value) {
    notes_ += absl::StrCat(" ", name, "=", value);
  }

  void BeginAttack() {
    attack_from_ = honest_->completed();
    attack_start_ = Clock::now();
  }

  // While an attack is held (its connections open, its peers not reading): the honest client
  // completes kMinHonestJobs more jobs.
  bool HonestKeepsUp() {
    return honest_->WaitForJobs(honest_->completed() + kMinHonestJobs, kAttackCap);
  }

  // The honest client has completed kMinHonestJobs jobs since the attack began (waiting for the
  // last of them within kAttackCap).
  bool HonestProgressed() {
    return honest_->WaitForJobs(attack_from_ + kMinHonestJobs, kAttackCap);
  }

  // Runs `round` again and again (at most `max_rounds` times, within kAttackCap), for at least
  // kMinAttack and until the honest client has completed kMinHonestJobs jobs since the attack
  // began.
  void Repeat(int max_rounds, const std::function<void()>& round);

  // The attack is over: records the honest client's latency during it, and checks that the
  // master still serves (the honest client, and a client that connects now).
  void EndAttack(std::string sent);

  // Every case ends here: nothing the honest client was told is lost or altered, the master
  // stayed within its memory bound; the case's figures.
  void TearDown() override;

  static TempDir* certs_;
  static std::string certs_error_;

  std::unique_ptr<Cluster> cluster_;
  std::unique_ptr<HonestClient> honest_;
  Memory baseline_;
  int64_t peak_rss_kib_ = 0;
  int baseline_fds_ = 0;
  Tally tally_;
  int rounds_ = 0;
  int64_t attack_from_ = 0;
  Clock::time_point attack_start_;
  Latency during_;
  double attack_ms_ = 0;
  std::string sent_;
  std::string notes_;
};

}  // namespace taskmaster::testing::hostile
