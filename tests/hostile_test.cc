// Hostile tests: a real master (TLS, mutual TLS, or plain loopback where the case needs it) under
// attack, while an honest client keeps submitting square tasks and checking every result. Each
// attack must get its documented status, the honest client must keep getting exactly its results
// (nothing acknowledged lost or altered), and the master's memory must stay under a bound. Every
// case prints a FIGURES line: what was sent, what came back, the honest client's latency during
// the attack and the master's memory.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "grpcpp/grpcpp.h"
#include "taskmaster/v1/taskmaster.grpc.pb.h"
#include "tests/harness.h"

namespace taskmaster::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using Clock = std::chrono::steady_clock;

// The master's limits in every case, small so that the memory bound below can be tight.
constexpr int kMaxMessageBytes = 16 << 20;
constexpr int kMaxWorkerBufferBytes = 8 << 20;
constexpr int kMaxBatch = 10'000;
constexpr int kMaxPayloadBytes = 1 << 20;  // the default

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
constexpr int64_t kMemoryBoundKib = 256 << 10;

constexpr int kTasksPerJob = 4;                  // per honest job
constexpr auto kHonestPeriod = milliseconds(5);  // at most 200 honest jobs a second
constexpr int64_t kWarmupJobs = 20;              // before the baseline is taken
// Honest jobs that must complete while an attack runs, and how long that may take at most.
constexpr int64_t kMinHonestJobs = 20;
constexpr auto kAttackCap = seconds(60);
// The shortest attack made of repeated rounds.
constexpr auto kMinAttack = seconds(2);
constexpr auto kCallDeadline = seconds(10);

constexpr int kFloodConnections = 1000;
constexpr int kFloodChannels = 100;
constexpr int kWatchesPerChannel = 10;  // 1,000 WatchJob streams, and 100 silent worker streams
constexpr int kSilentWatchers = 32;
constexpr int kBigJobTasks = 10'000;
constexpr size_t kBigJobOutputBytes = 512;

// ---- The master's memory and descriptors, from /proc ----

struct Memory {
  int64_t rss_kib = 0;  // resident now
  int64_t hwm_kib = 0;  // the peak resident size since the process started
};

Memory ReadMemory(pid_t pid) {
  Memory m;
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmRSS:", 0) == 0) m.rss_kib = std::stoll(line.substr(6));
    if (line.rfind("VmHWM:", 0) == 0) m.hwm_kib = std::stoll(line.substr(6));
  }
  return m;
}

int OpenFds(pid_t pid) {
  std::error_code ec;
  auto it = std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec);
  return ec ? -1 : static_cast<int>(std::distance(it, std::filesystem::directory_iterator()));
}

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
  Latency Since(int64_t from) const {
    std::vector<double> v;
    {
      std::lock_guard<std::mutex> lock(mu_);
      v.assign(latencies_ms_.begin() + std::min<size_t>(from, latencies_ms_.size()),
               latencies_ms_.end());
    }
    Latency l;
    if (v.empty()) return l;
    std::sort(v.begin(), v.end());
    const auto rank = [&](double p) {  // nearest rank
      return v[static_cast<size_t>(std::ceil(p * static_cast<double>(v.size()))) - 1];
    };
    l.jobs = static_cast<int64_t>(v.size());
    l.p50_ms = rank(0.50);
    l.p99_ms = rank(0.99);
    l.max_ms = v.back();
    return l;
  }

  // Stops submitting, then follows again every job whose stream broke: a result missing after
  // that is lost.
  Verdict Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    std::vector<Job> unresolved;
    {
      std::lock_guard<std::mutex> lock(mu_);
      unresolved.swap(unresolved_);
    }
    for (const Job& job : unresolved) {
      if (absl::Status s = Follow(job); !s.ok()) {
        std::lock_guard<std::mutex> lock(mu_);
        ErrorLocked(absl::StrCat("after the attack, following ", job.id, ": ", s.ToString()));
        verdict_.lost += static_cast<int64_t>(job.expected.size());
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    return verdict_;
  }

 private:
  struct Job {
    std::string id;
    std::map<uint64_t, std::string> expected;  // task id → its result
  };

  void Run() {
    int64_t n = 0;
    auto next_start = Clock::now();
    while (!stop_) {
      // Paces the honest client (a job every kHonestPeriod): a rate, not a wait for a condition.
      std::this_thread::sleep_until(next_start);
      next_start = Clock::now() + kHonestPeriod;
      v1::SubmitRequest request;
      std::vector<std::string> want;
      for (int i = 0; i < kTasksPerJob; ++i, ++n) {
        v1::TaskSpec* t = request.add_tasks();
        t->set_kind("square");
        t->set_payload(std::to_string(n));
        want.push_back(Square(n));
      }
      const auto start = Clock::now();
      absl::StatusOr<v1::SubmitResponse> submitted = client_->Submit(request);
      if (!submitted.ok()) {
        std::lock_guard<std::mutex> lock(mu_);
        ErrorLocked(absl::StrCat("submit: ", submitted.status().ToString()));
        continue;
      }
      Job job{submitted->job_id(), {}};
      for (int i = 0; i < kTasksPerJob; ++i) job.expected[submitted->task_ids(i)] = want[i];
      {
        std::lock_guard<std::mutex> lock(mu_);
        verdict_.acknowledged += kTasksPerJob;
        last_task_id_ = std::max(last_task_id_, job.expected.rbegin()->first);
      }
      const absl::Status followed = Follow(job);
      std::lock_guard<std::mutex> lock(mu_);
      if (!followed.ok()) {
        ErrorLocked(absl::StrCat("following ", job.id, ": ", followed.ToString()));
        unresolved_.push_back(std::move(job));
        continue;
      }
      latencies_ms_.push_back(
          std::chrono::duration<double, std::milli>(Clock::now() - start).count());
    }
  }

  // Follows `job` to its end and checks each of its results.
  absl::Status Follow(const Job& job) {
    std::map<uint64_t, std::string> got;
    absl::Status status = client_->WatchJob(job.id, [&](const v1::JobEvent& event) {
      for (const v1::TaskInfo& t : event.results()) {
        got[t.id()] = t.state() == v1::SUCCEEDED
                          ? t.output()
                          : absl::StrCat(v1::TaskState_Name(t.state()), ": ", t.error());
      }
    });
    if (!status.ok()) return status;
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, want] : job.expected) {
      auto it = got.find(id);
      if (it == got.end()) {
        verdict_.lost++;
        SampleLocked(absl::StrCat("task ", id, " of ", job.id, " has no result"));
      } else if (it->second != want) {
        verdict_.altered++;
        SampleLocked(absl::StrCat("task ", id, ": '", it->second, "' instead of '", want, "'"));
      } else {
        verdict_.correct++;
      }
    }
    return absl::OkStatus();
  }

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

std::string Bearer(const std::string& token) { return "Bearer " + token; }

// A channel of its own connection (not shared with any other channel), with `tls` (or plaintext
// without a CA), taking messages of any size: an attacker's, made by hand.
std::shared_ptr<grpc::Channel> RawChannel(const ChannelOptions& tls,
                                          grpc::ChannelArguments args = {}) {
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (!tls.tls_ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = ReadFile(tls.tls_ca_file);
    if (!tls.tls_cert_file.empty()) {
      ssl.pem_cert_chain = ReadFile(tls.tls_cert_file);
      ssl.pem_private_key = ReadFile(tls.tls_key_file);
    }
    creds = grpc::SslCredentials(ssl);
  }
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  return grpc::CreateCustomChannel(tls.address, creds, args);
}

void Prepare(grpc::ClientContext& context, const std::string& authorization,
             milliseconds deadline = kCallDeadline) {
  if (!authorization.empty()) context.AddMetadata("authorization", authorization);
  context.set_deadline(std::chrono::system_clock::now() + deadline);
}

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
                     const std::string& authorization = Bearer(kWorkToken)) {
  RawWorker worker(channel, authorization);
  worker.Write(first);
  return worker.End();
}

v1::WorkerMessage Hello(const std::string& worker_id, const std::vector<std::string>& kinds,
                        int32_t slots, int32_t credits) {
  v1::WorkerMessage m;
  v1::Hello* h = m.mutable_hello();
  h->set_worker_id(worker_id);
  h->set_name(worker_id);
  for (const std::string& k : kinds) h->add_kinds(k);
  h->set_slots(slots);
  m.set_credits(credits);
  return m;
}

v1::SubmitRequest Tasks(const std::string& kind, const std::vector<std::string>& payloads) {
  v1::SubmitRequest request;
  for (const std::string& p : payloads) {
    v1::TaskSpec* t = request.add_tasks();
    t->set_kind(kind);
    t->set_payload(p);
  }
  return request;
}

// A TCP connection to the master's port, for bytes no client library would send.
class RawConnection {
 public:
  explicit RawConnection(int port) : fd_(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd_ >= 0 && connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      close(fd_);
      fd_ = -1;
    }
  }
  RawConnection(RawConnection&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  RawConnection& operator=(RawConnection&&) = delete;
  ~RawConnection() {
    if (fd_ >= 0) close(fd_);
  }
  bool connected() const { return fd_ >= 0; }

  void Send(std::string_view bytes) {
    // The master may close before taking it all: that is what is being tested, not an error.
    while (!bytes.empty()) {
      const ssize_t n = send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n <= 0) return;
      bytes.remove_prefix(static_cast<size_t>(n));
    }
  }

  // Whether the master closed the connection within `timeout`; what it sends is dropped.
  bool ClosedByPeer(milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    char buffer[4096];
    while (Clock::now() < deadline) {
      pollfd p{fd_, POLLIN, 0};
      const auto left =
          std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count() + 1;
      if (poll(&p, 1, static_cast<int>(left)) <= 0) continue;
      const ssize_t n = recv(fd_, buffer, sizeof(buffer), 0);
      if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) return true;
    }
    return false;
  }

 private:
  int fd_;
};

constexpr char kHttp2Preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// An HTTP/2 frame header: 24-bit length, type, flags, stream id.
std::string FrameHeader(uint32_t length, uint8_t type, uint8_t flags, uint32_t stream) {
  return {static_cast<char>(length >> 16), static_cast<char>(length >> 8),
          static_cast<char>(length),       static_cast<char>(type),
          static_cast<char>(flags),        static_cast<char>(stream >> 24),
          static_cast<char>(stream >> 16), static_cast<char>(stream >> 8),
          static_cast<char>(stream)};
}

// Bytes of no protocol: random after two zero bytes, which start no TLS record. (A TLS server
// waits, until its handshake deadline, for the rest of a record whose header looks right, and a
// second byte of 3 is enough: random bytes do that one time in 256.)
std::string Garbage(std::mt19937& rng) {
  std::string s(4096, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  s[0] = s[1] = 0;
  return s;
}

// ---- The fixture ----

enum class Security { kPlain, kTls, kMutualTls };

class Hostile : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // The flood needs more descriptors than a default soft limit; the master, started from
    // here, inherits the raised limit too.
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
      limit.rlim_cur = limit.rlim_max;
      setrlimit(RLIMIT_NOFILE, &limit);
    }
    certs_ = new TempDir;
    for (const char* set : {"ours", "rogue"}) {
      CommandResult made = MakeCertificates(certs_->File(set));
      if (made.exit_code != 0) certs_error_ += made.err;
    }
  }
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
  void Start(Security security, const std::vector<std::string>& master_flags = {}) {
    ASSERT_TRUE(certs_error_.empty()) << certs_error_;
    std::vector<std::string> flags = master_flags;
    flags.insert(flags.end(), {"--max-message-bytes", std::to_string(kMaxMessageBytes),
                               "--max-worker-buffer-bytes", std::to_string(kMaxWorkerBufferBytes),
                               "--max-batch", std::to_string(kMaxBatch), "--max-payload-bytes",
                               std::to_string(kMaxPayloadBytes),
                               // Tasks of a worker cut off come back within seconds.
                               "--lease-timeout-ms", "2000", "--reconnect-grace-ms", "500"});
    std::vector<std::string> worker_flags = {"--threads", "2"};
    if (security != Security::kPlain) {
      flags.insert(flags.end(),
                   {"--tls-cert", Ours("server.pem"), "--tls-key", Ours("server.key")});
      worker_flags.insert(worker_flags.end(), {"--tls-ca", Ours("ca.pem")});
    }
    if (security == Security::kMutualTls) {
      flags.insert(flags.end(), {"--tls-client-ca", Ours("ca.pem")});
      worker_flags.insert(worker_flags.end(),
                          {"--tls-cert", Ours("worker.pem"), "--tls-key", Ours("worker.key")});
    }
    cluster_ = std::make_unique<Cluster>(flags);
    if (security == Security::kTls) cluster_->SetClientTls(Tls(Ours("ca.pem"), "", ""));
    if (security == Security::kMutualTls) {
      cluster_->SetClientTls(Tls(Ours("ca.pem"), Ours("client.pem"), Ours("client.key")));
    }
    cluster_->StartMaster();
    cluster_->StartWorker("honest-1", worker_flags);
    cluster_->StartWorker("honest-2", worker_flags);
    ASSERT_TRUE(cluster_->WaitForWorkers(2))
        << cluster_->worker(0).Log() << cluster_->worker(1).Log() << cluster_->master().Log();
    honest_ = std::make_unique<HonestClient>(cluster_->NewClient());
    ASSERT_TRUE(honest_->WaitForJobs(kWarmupJobs, seconds(30)));
    baseline_ = ReadMemory(master_pid());
    peak_rss_kib_ = baseline_.rss_kib;
    baseline_fds_ = OpenFds(master_pid());
  }

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
  void Repeat(int max_rounds, const std::function<void()>& round) {
    for (rounds_ = 0; rounds_ < max_rounds && Clock::now() < attack_start_ + kAttackCap;
         ++rounds_) {
      if (Clock::now() >= attack_start_ + kMinAttack &&
          honest_->completed() >= attack_from_ + kMinHonestJobs) {
        break;
      }
      round();
    }
    SampleMemory();
    EXPECT_TRUE(HonestProgressed()) << "the honest client stalled under the attack";
  }

  // The attack is over: records the honest client's latency during it, and checks that the
  // master still serves (the honest client, and a client that connects now).
  void EndAttack(std::string sent) {
    during_ = honest_->Since(attack_from_);
    attack_ms_ = std::chrono::duration<double, std::milli>(Clock::now() - attack_start_).count();
    sent_ = std::move(sent);
    SampleMemory();
    ASSERT_TRUE(cluster_->master().Running()) << cluster_->master().Log();
    EXPECT_TRUE(honest_->WaitForJobs(honest_->completed() + 5, seconds(30)));
    auto stats = cluster_->NewClient()->Stats();
    EXPECT_TRUE(stats.ok()) << stats.status();
  }

  // Every case ends here: nothing the honest client was told is lost or altered, the master
  // stayed within its memory bound; the case's figures.
  void TearDown() override {
    if (!honest_) return;
    const HonestClient::Verdict v = honest_->Stop();
    EXPECT_EQ(v.lost, 0) << absl::StrJoin(v.samples, "\n");
    EXPECT_EQ(v.altered, 0) << absl::StrJoin(v.samples, "\n");
    EXPECT_EQ(v.errors, 0) << absl::StrJoin(v.samples, "\n");
    EXPECT_EQ(v.correct, v.acknowledged);
    const Memory end = ReadMemory(master_pid());
    EXPECT_LE(end.hwm_kib, baseline_.rss_kib + kMemoryBoundKib)
        << "the master's peak resident memory passed its bound";
    std::cout << "FIGURES " << ::testing::UnitTest::GetInstance()->current_test_info()->name()
              << ": sent=" << sent_ << " outcomes=" << tally_.ToString() << notes_
              << " attack_ms=" << static_cast<int64_t>(attack_ms_)
              << " honest_jobs_during=" << during_.jobs
              << absl::StrFormat(" honest_p50_ms=%.1f honest_p99_ms=%.1f honest_max_ms=%.1f",
                                 during_.p50_ms, during_.p99_ms, during_.max_ms)
              << " honest_tasks_acknowledged=" << v.acknowledged << " correct=" << v.correct
              << " lost=" << v.lost << " altered=" << v.altered << " errors=" << v.errors
              << " master_rss_kib baseline=" << baseline_.rss_kib
              << " peak_sampled=" << peak_rss_kib_ << " hwm=" << end.hwm_kib
              << " after=" << end.rss_kib << " bound=+" << kMemoryBoundKib << std::endl;
  }

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

TempDir* Hostile::certs_ = nullptr;
std::string Hostile::certs_error_;

// ---- The cases ----

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

// A worker that asks for a thousand tasks and never reads its stream: the master cuts it off
// once --max-worker-buffer-bytes wait for it (it sees its stream end), and every task it was
// given, the honest client's included, runs on the honest workers, each with its right result.
TEST_F(Hostile, AWorkerThatNeverReads) {
  Start(Security::kMutualTls);
  if (HasFatalFailure()) return;
  BeginAttack();
  RawWorker attacker(RawChannel(Legit()), Bearer(kWorkToken), seconds(90));
  ASSERT_TRUE(attacker.Write(Hello("never-reads", {"square", "echo"}, 1000, 1000)));
  auto hostile = cluster_->NewClient();
  // 24 MiB of echo tasks, three times the buffer it may hold.
  std::map<uint64_t, std::string> expected;
  std::vector<std::string> jobs;
  for (int b = 0; b < 8; ++b) {
    const std::string payload(512 << 10, static_cast<char>('a' + b));
    auto job = hostile->Submit(Tasks("echo", std::vector<std::string>(6, payload)));
    ASSERT_TRUE(job.ok()) << job.status();
    jobs.push_back(job->job_id());
    for (uint64_t id : job->task_ids()) expected[id] = payload;
  }
  EXPECT_TRUE(WaitFor(
      [&] {
        auto workers = hostile->Workers();
        if (!workers.ok()) return false;
        for (const v1::WorkerInfo& w : workers->workers()) {
          if (w.worker_id() == "never-reads") return !w.connected();
        }
        return false;
      },
      seconds(30)))
      << "the master kept buffering for a worker that does not read";
  EXPECT_NE(cluster_->master().Log().find("cut off worker stream"), std::string::npos);
  SampleMemory();
  // A stream the master cancelled under unread messages ends CANCELLED on this side (its status
  // could never be delivered), once the attacker reads what was left.
  Expect("the worker that never reads", attacker.End(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(HonestProgressed()) << "the honest client stalled under the attack";
  size_t right = 0;
  for (const std::string& job : jobs) {
    absl::Status s = hostile->WatchJob(job, [&](const v1::JobEvent& e) {
      for (const v1::TaskInfo& t : e.results()) {
        EXPECT_EQ(t.state(), v1::SUCCEEDED) << t.error();
        EXPECT_NE(t.worker(), "never-reads");
        right += t.output() == expected.at(t.id()) ? 1 : 0;
      }
    });
    EXPECT_TRUE(s.ok()) << s;
  }
  EXPECT_EQ(right, expected.size());
  Note("its_tasks_right_elsewhere", static_cast<int64_t>(right));
  EndAttack(absl::StrCat("a worker with 1000 credits that never reads; ", expected.size(),
                         " echo tasks of 512 KiB; buffer limit ", kMaxWorkerBufferBytes));
}

// Watchers of a finished 10,000-task job (~6 MB of results) that take its first event and never
// read again, over small receive windows: the master writes one event at a time per stream, so
// what waits for each is bounded by an event (at most 1,000 results or 1 MiB), not by the job. A
// watcher that reads again late still gets every result once.
TEST_F(Hostile, WatchersThatNeverRead) {
  Start(Security::kMutualTls);
  if (HasFatalFailure()) return;
  auto hostile = cluster_->NewClient();
  std::vector<std::string> payloads;
  for (int i = 0; i < kBigJobTasks; ++i) {
    payloads.push_back(std::string(kBigJobOutputBytes, static_cast<char>('a' + i % 26)));
  }
  auto big = hostile->Submit(Tasks("echo", payloads));
  ASSERT_TRUE(big.ok()) << big.status();
  ASSERT_TRUE(WaitFor(
      [&] {
        auto job = hostile->GetJob(big->job_id());
        return job.ok() && job->done() == job->total();
      },
      seconds(60)));
  BeginAttack();
  grpc::ChannelArguments small_window;
  small_window.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 10);
  small_window.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<RawWatch>> watchers;
  int64_t late_reader_results = 0;  // what the first watcher reads
  for (int i = 0; i < kSilentWatchers; ++i) {
    if (i % 4 == 0) channels.push_back(RawChannel(Legit(), small_window));
    watchers.push_back(std::make_unique<RawWatch>(channels.back(), big->job_id(), seconds(90)));
    // The stream is open on the master once its first event arrives; its next write waits.
    v1::JobEvent first;
    ASSERT_TRUE(watchers.back()->Read(&first));
    if (i == 0) late_reader_results = first.results_size();
  }
  SampleMemory();
  EXPECT_TRUE(HonestKeepsUp()) << "the honest client stalled behind watchers that do not read";
  SampleMemory();
  v1::JobEvent event;
  while (watchers.front()->Read(&event)) late_reader_results += event.results_size();
  Expect("a watcher that reads again late", watchers.front()->Finish(), absl::StatusCode::kOk);
  EXPECT_EQ(late_reader_results, kBigJobTasks);
  for (size_t i = 1; i < watchers.size(); ++i) {
    Expect("a watcher that never reads, closed", watchers[i]->Cancel(),
           absl::StatusCode::kCancelled);
  }
  EndAttack(absl::StrCat(kSilentWatchers, " watchers that stop reading after one event, 16 KiB ",
                         "windows, on a job of ", kBigJobTasks, " results of ", kBigJobOutputBytes,
                         " bytes"));
}

// Calls with unknown, missing, malformed and oversized tokens are UNAUTHENTICATED; tokens of the
// wrong role are PERMISSION_DENIED, on unary calls and streams alike; thousands of them from
// four threads leave the honest client unaffected.
TEST_F(Hostile, BadTokensAndWrongRolesAtRate) {
  Start(Security::kTls);
  if (HasFatalFailure()) return;
  BeginAttack();
  constexpr int kThreads = 4;
  auto channel = RawChannel(Legit());
  v1::SubmitRequest submit = Tasks("square", {"1"});
  v1::GetJobRequest get_job;
  get_job.set_job_id("job-0000000000000000");
  const auto unauthenticated = absl::StatusCode::kUnauthenticated;
  const auto denied = absl::StatusCode::kPermissionDenied;
  std::mt19937 rng(3);
  // Each round: 7 calls from each of kThreads threads at once.
  Repeat(2000, [&] {
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      const std::string guess = absl::StrCat(rng(), rng(), rng(), rng());
      threads.emplace_back([&, guess] {
        Expect("an unknown token",
               Unary(&v1::TaskQueue::Stub::Submit, channel, submit, Bearer(guess)),
               unauthenticated);
        Expect("no token", Unary(&v1::TaskQueue::Stub::GetJob, channel, get_job, ""),
               unauthenticated);
        Expect("another scheme",
               Unary(&v1::TaskQueue::Stub::Stats, channel, v1::StatsRequest(),
                     "Basic " + std::string(kSubmitToken)),
               unauthenticated);
        Expect("a token one character off",
               Unary(&v1::TaskQueue::Stub::Stats, channel, v1::StatsRequest(),
                     Bearer(std::string(kSubmitToken) + "x")),
               unauthenticated);
        Expect("a work token submitting",
               Unary(&v1::TaskQueue::Stub::Submit, channel, submit, Bearer(kWorkToken)), denied);
        RawWatch watch(channel, get_job.job_id(), kCallDeadline, Bearer(kWorkToken));
        v1::JobEvent event;
        EXPECT_FALSE(watch.Read(&event));
        Expect("a work token watching a job", watch.Finish(), denied);
        Expect("a submit token opening a worker stream",
               Refusal(channel, Hello("intruder", {"square"}, 1, 1), Bearer(kSubmitToken)), denied);
      });
    }
    for (std::thread& t : threads) t.join();
  });
  // A token past gRPC's metadata limit: refused by gRPC's transport before any handler.
  const std::string huge(64 << 10, 'k');
  Expect("a 64 KiB token",
         Unary(&v1::TaskQueue::Stub::Stats, channel, v1::StatsRequest(), Bearer(huge)),
         absl::StatusCode::kResourceExhausted);
  EndAttack(absl::StrCat(rounds_, " rounds of 7 calls with bad tokens or roles from each of ",
                         kThreads, " threads, and a 64 KiB token"));
}

// Field values no honest client or worker sends, over the API by hand (the C++ client refuses
// some before sending): each gets its status, and nothing changes for anyone else.
TEST_F(Hostile, HostileFieldValues) {
  Start(Security::kMutualTls);
  if (HasFatalFailure()) return;
  BeginAttack();
  auto channel = RawChannel(Legit());
  auto hostile = cluster_->NewClient();
  const auto invalid = absl::StatusCode::kInvalidArgument;
  // A request with a text field that is not UTF-8 cannot be parsed: gRPC answers before the
  // master sees it, with UNIMPLEMENTED (what its callback API says to a request it cannot read).
  const auto unparsable = absl::StatusCode::kUnimplemented;
  constexpr int64_t kCenturyMs = int64_t{100} * 365 * 24 * 3600 * 1000;
  const auto submit = [&](const std::string& what, const v1::SubmitRequest& request,
                          absl::StatusCode want) {
    Expect(what, Unary(&v1::TaskQueue::Stub::Submit, channel, request, Bearer(kSubmitToken)), want);
  };
  using Mutation = std::function<void(v1::TaskSpec&)>;
  const std::vector<std::tuple<std::string, Mutation, absl::StatusCode>> specs = {
      {"a kind that is not UTF-8", [](v1::TaskSpec& t) { t.set_kind("sq\xC3\x28"); }, unparsable},
      {"a label value that is not UTF-8",
       [](v1::TaskSpec& t) { (*t.mutable_labels())["zone"] = "\xFF"; }, unparsable},
      {"65 labels",
       [](v1::TaskSpec& t) {
         for (int i = 0; i < 65; ++i) (*t.mutable_labels())[absl::StrCat("k", i)] = "v";
       },
       invalid},
      {"a label value of 257 bytes",
       [](v1::TaskSpec& t) { (*t.mutable_labels())["zone"] = std::string(257, 'v'); }, invalid},
      {"a label key of 65 bytes",
       [](v1::TaskSpec& t) { (*t.mutable_labels())[std::string(65, 'k')] = "v"; }, invalid},
      {"a payload over --max-payload-bytes",
       [](v1::TaskSpec& t) { t.set_payload(std::string(kMaxPayloadBytes + 1, '7')); }, invalid},
      {"a kind of 65 characters", [](v1::TaskSpec& t) { t.set_kind(std::string(65, 'k')); },
       invalid},
      {"an empty kind", [](v1::TaskSpec& t) { t.clear_kind(); }, invalid},
      {"a queue with a slash", [](v1::TaskSpec& t) { t.set_queue("../etc"); }, invalid},
      {"an idempotency key of 257 bytes",
       [](v1::TaskSpec& t) { t.set_idempotency_key(std::string(257, 'i')); }, invalid},
      {"a delay of -1", [](v1::TaskSpec& t) { t.set_delay_ms(-1); }, invalid},
      {"a delay of INT64_MIN",
       [](v1::TaskSpec& t) { t.set_delay_ms(std::numeric_limits<int64_t>::min()); }, invalid},
      {"a delay of INT64_MAX",
       [](v1::TaskSpec& t) { t.set_delay_ms(std::numeric_limits<int64_t>::max()); }, invalid},
      {"a delay over 100 years", [&](v1::TaskSpec& t) { t.set_delay_ms(kCenturyMs + 1); }, invalid},
      {"a timeout of -1", [](v1::TaskSpec& t) { t.set_timeout_ms(-1); }, invalid},
      {"a timeout of INT64_MAX",
       [](v1::TaskSpec& t) { t.set_timeout_ms(std::numeric_limits<int64_t>::max()); }, invalid},
      {"a timeout of INT64_MIN",
       [](v1::TaskSpec& t) { t.set_timeout_ms(std::numeric_limits<int64_t>::min()); }, invalid},
      {"-1 attempts", [](v1::TaskSpec& t) { t.set_max_attempts(-1); }, invalid},
      {"101 attempts", [](v1::TaskSpec& t) { t.set_max_attempts(101); }, invalid},
      {"INT32_MAX attempts",
       [](v1::TaskSpec& t) { t.set_max_attempts(std::numeric_limits<int32_t>::max()); }, invalid},
      {"INT32_MIN attempts",
       [](v1::TaskSpec& t) { t.set_max_attempts(std::numeric_limits<int32_t>::min()); }, invalid},
  };
  for (const auto& [what, mutate, want] : specs) {
    v1::SubmitRequest request = Tasks("square", {"3"});
    mutate(*request.mutable_tasks(0));
    submit(what, request, want);
  }
  submit("an empty batch", v1::SubmitRequest(), invalid);
  submit("a batch over --max-batch", Tasks("square", std::vector<std::string>(kMaxBatch + 1, "1")),
         invalid);
  submit("a message over --max-message-bytes",
         Tasks("echo", std::vector<std::string>(17, std::string(kMaxPayloadBytes, 'm'))),
         absl::StatusCode::kResourceExhausted);

  // Extremes the API allows run like any task: the highest and lowest priorities, a timeout of
  // 100 years. A delay of 100 years keeps its task waiting.
  v1::SubmitRequest extremes = Tasks("square", {"11", "12", "13", "14"});
  extremes.mutable_tasks(0)->set_priority(std::numeric_limits<int32_t>::max());
  extremes.mutable_tasks(1)->set_priority(std::numeric_limits<int32_t>::min());
  extremes.mutable_tasks(2)->set_timeout_ms(kCenturyMs);
  extremes.mutable_tasks(3)->set_delay_ms(kCenturyMs);
  auto accepted = hostile->Submit(extremes);
  ASSERT_TRUE(accepted.ok()) << accepted.status();
  tally_.Add("OK");
  std::map<uint64_t, std::string> outputs;
  EXPECT_TRUE(WaitFor(
      [&] {
        for (int i = 0; i < 3; ++i) {
          auto task = hostile->GetTask(accepted->task_ids(i));
          if (!task.ok() || task->finished_ms() == 0) return false;
          outputs[task->id()] = task->output() + task->error();
        }
        return true;
      },
      seconds(30)));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(outputs[accepted->task_ids(i)], Square(11 + i));
  auto waiting = hostile->GetTask(accepted->task_ids(3));
  ASSERT_TRUE(waiting.ok()) << waiting.status();
  EXPECT_EQ(waiting->state(), v1::DELAYED);

  // Hellos no worker sends.
  auto workers = hostile->Workers();
  ASSERT_TRUE(workers.ok() && workers->workers_size() >= 1);
  const std::string honest_id = workers->workers(0).worker_id();
  using HelloMutation = std::function<void(v1::Hello&)>;
  const std::vector<std::tuple<std::string, HelloMutation, absl::StatusCode>> hellos = {
      {"an empty worker id", [](v1::Hello& h) { h.clear_worker_id(); }, invalid},
      {"a worker id of 256 bytes", [](v1::Hello& h) { h.set_worker_id(std::string(256, 'w')); },
       invalid},
      {"a name of 256 bytes", [](v1::Hello& h) { h.set_name(std::string(256, 'n')); }, invalid},
      {"a host of 256 bytes", [](v1::Hello& h) { h.set_host(std::string(256, 'h')); }, invalid},
      // Unparsable: the stream ends before the master could read a hello.
      {"a name that is not UTF-8", [](v1::Hello& h) { h.set_name("evil\xC3\x28"); }, invalid},
      {"0 slots", [](v1::Hello& h) { h.set_slots(0); }, invalid},
      {"-1 slots", [](v1::Hello& h) { h.set_slots(-1); }, invalid},
      {"INT32_MAX slots", [](v1::Hello& h) { h.set_slots(std::numeric_limits<int32_t>::max()); },
       invalid},
      {"no kind", [](v1::Hello& h) { h.clear_kinds(); }, invalid},
      {"1,001 kinds",
       [](v1::Hello& h) {
         for (int i = 0; i < 1001; ++i) h.add_kinds(absl::StrCat("k", i));
       },
       invalid},
      {"a malformed kind", [](v1::Hello& h) { h.add_kinds("rm -rf"); }, invalid},
      {"65 labels",
       [](v1::Hello& h) {
         for (int i = 0; i < 65; ++i) (*h.mutable_labels())[absl::StrCat("k", i)] = "v";
       },
       invalid},
      {"an honest worker's id without its secret",
       [&](v1::Hello& h) { h.set_worker_id(honest_id); }, absl::StatusCode::kPermissionDenied},
  };
  for (const auto& [what, mutate, want] : hellos) {
    v1::WorkerMessage m = Hello("hostile-hello", {"square"}, 1, 1);
    mutate(*m.mutable_hello());
    Expect(what, Refusal(channel, m), want);
  }
  v1::WorkerMessage credits_only;
  credits_only.set_credits(1);
  Expect("a first message without a hello", Refusal(channel, credits_only), invalid);

  // Credits near INT32_MAX, twice: capped, not wrapped, so its own tasks still reach it.
  RawWorker greedy(channel, Bearer(kWorkToken), seconds(60));
  ASSERT_TRUE(
      greedy.Write(Hello("hostile-greedy", {"hostile"}, 1, std::numeric_limits<int32_t>::max())));
  v1::MasterMessage in;
  ASSERT_TRUE(greedy.Read(&in) && in.has_welcome());
  v1::WorkerMessage more;
  more.set_credits(std::numeric_limits<int32_t>::max());
  ASSERT_TRUE(greedy.Write(more));
  auto own = hostile->Submit(Tasks("hostile", std::vector<std::string>(10, "x")));
  ASSERT_TRUE(own.ok()) << own.status();
  v1::WorkerMessage done;
  while (done.results_size() < 10 && greedy.Read(&in)) {
    for (const v1::Task& t : in.tasks()) {
      v1::TaskResult* r = done.add_results();
      r->set_task_id(t.task_id());
      r->set_attempt(t.attempt());
      r->set_outcome(v1::TaskResult::SUCCEEDED);
    }
  }
  ASSERT_EQ(done.results_size(), 10) << "credits of INT32_MAX twice left the worker without tasks";
  ASSERT_TRUE(greedy.Write(done));

  // Results for tasks it does not hold (the honest client's among them): acknowledged, counted as
  // duplicates, and dropped: no honest result changes (TearDown checks every one).
  const std::set<uint64_t> its_own(own->task_ids().begin(), own->task_ids().end());
  const uint64_t last = honest_->last_task_id();
  auto before = hostile->Stats();
  ASSERT_TRUE(before.ok());
  v1::WorkerMessage forged;
  for (uint64_t id = last > 400 ? last - 400 : 1; id <= last; ++id) {
    if (its_own.contains(id)) continue;
    for (int attempt = 1; attempt <= 2; ++attempt) {
      v1::TaskResult* r = forged.add_results();
      r->set_task_id(id);
      r->set_attempt(attempt);
      r->set_outcome(v1::TaskResult::SUCCEEDED);
      r->set_output("forged");
    }
  }
  ASSERT_TRUE(greedy.Write(forged));
  int acked = 0;
  const int expected_acks = done.results_size() + forged.results_size();
  while (acked < expected_acks && greedy.Read(&in)) acked += in.acked_size();
  EXPECT_EQ(acked, expected_acks);
  auto after = hostile->Stats();
  ASSERT_TRUE(after.ok());
  EXPECT_GE(after->duplicate_results() - before->duplicate_results(), forged.results_size());
  Note("forged_results", forged.results_size());
  Note("duplicates_counted", after->duplicate_results() - before->duplicate_results());
  Expect("the greedy worker, closed", greedy.Cancel(), absl::StatusCode::kCancelled);

  EXPECT_TRUE(HonestProgressed()) << "the honest client stalled under the attack";
  EndAttack(absl::StrCat(specs.size() + 3, " hostile submits, ", hellos.size() + 1,
                         " hostile hellos, 4 extreme tasks, credits INT32_MAX x2, ",
                         forged.results_size(), " forged results"));
}

// The master's epoch, from the welcome of a worker stream opened for it.
absl::StatusOr<std::string> Epoch(const std::shared_ptr<grpc::Channel>& channel) {
  RawWorker probe(channel, Bearer(kWorkToken));
  v1::MasterMessage welcome;
  if (!probe.Write(Hello("hostile-probe", {"square"}, 1, 0)) || !probe.Read(&welcome)) {
    return probe.End();
  }
  probe.Cancel().IgnoreError();
  return welcome.welcome().master_epoch();
}

// A hello claiming to hold tasks 1..n at attempt 1 (the honest client's among them), of the
// master's `epoch`, so that the master looks up every claim.
v1::WorkerMessage Claiming(const std::string& worker_id, const std::string& epoch, uint64_t n) {
  v1::WorkerMessage m = Hello(worker_id, {"square"}, 1, 0);
  m.mutable_hello()->set_master_epoch(epoch);
  for (uint64_t id = 1; id <= n; ++id) {
    v1::TaskRef* ref = m.mutable_hello()->add_held();
    ref->set_task_id(id);
    ref->set_attempt(1);
  }
  return m;
}

constexpr uint64_t kMaxHeld = 100'000;  // the most a hello may claim (docs/api.md)

// A hello claiming 100,000 tasks, the most a worker may hold, none of which its stream holds:
// accepted, and every claim revoked in the welcome, the honest client's tasks staying where they
// are; one claim more is refused.
TEST_F(Hostile, AHelloHoldingTheMostTasks) {
  Start(Security::kMutualTls);
  if (HasFatalFailure()) return;
  auto channel = RawChannel(Legit());
  absl::StatusOr<std::string> epoch = Epoch(channel);
  ASSERT_TRUE(epoch.ok()) << epoch.status();
  const v1::WorkerMessage most = Claiming("hostile-claimer", *epoch, kMaxHeld);
  BeginAttack();
  Expect("a hello holding 100,001 tasks",
         Refusal(channel, Claiming("hostile-too-many", *epoch, kMaxHeld + 1)),
         absl::StatusCode::kInvalidArgument);
  RawWorker claimer(channel, Bearer(kWorkToken), seconds(60));
  v1::MasterMessage welcome;
  ASSERT_TRUE(claimer.Write(most) && claimer.Read(&welcome) && welcome.has_welcome());
  EXPECT_EQ(welcome.welcome().revoked_size(), static_cast<int>(kMaxHeld));
  SampleMemory();
  Expect("a hello holding 100,000 tasks, closed", claimer.Cancel(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(HonestProgressed()) << "the honest client stalled under the attack";
  EndAttack(absl::StrCat("a hello holding 100,001 tasks and one holding 100,000 (",
                         most.ByteSizeLong(), " bytes)"));
}

// The same hellos, several at once, as any holder of a work token may send them. When a worker
// could claim a million tasks, four at once passed the memory bound and held the honest client up
// for over a second.
TEST_F(Hostile, HellosHoldingTheMostTasksAtOnce) {
  constexpr int kHellos = 8;
  Start(Security::kMutualTls);
  if (HasFatalFailure()) return;
  auto channel = RawChannel(Legit());
  absl::StatusOr<std::string> epoch = Epoch(channel);
  ASSERT_TRUE(epoch.ok()) << epoch.status();
  std::vector<v1::WorkerMessage> hellos;
  for (int i = 0; i < kHellos; ++i) {
    hellos.push_back(Claiming(absl::StrCat("hostile-claimer-", i), *epoch, kMaxHeld));
  }
  BeginAttack();
  std::vector<std::thread> threads;
  for (const v1::WorkerMessage& hello : hellos) {
    threads.emplace_back([&] {
      RawWorker claimer(channel, Bearer(kWorkToken), seconds(60));
      v1::MasterMessage welcome;
      EXPECT_TRUE(claimer.Write(hello) && claimer.Read(&welcome) && welcome.has_welcome());
      EXPECT_EQ(welcome.welcome().revoked_size(), static_cast<int>(kMaxHeld));
      Expect("a hello holding 100,000 tasks, closed", claimer.Cancel(),
             absl::StatusCode::kCancelled);
    });
  }
  for (std::thread& t : threads) t.join();
  SampleMemory();
  EXPECT_TRUE(HonestProgressed()) << "the honest client stalled under the attack";
  EndAttack(absl::StrCat(kHellos, " hellos at once, each holding 100,000 tasks (",
                         hellos.front().ByteSizeLong(), " bytes)"));
}

}  // namespace
}  // namespace taskmaster::testing
