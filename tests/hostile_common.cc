// The hostile tests' shared tools and fixture, declared in hostile_common.h: the master's
// memory from /proc, the honest client, hand-made attackers' calls, and the Hostile fixture.
#include "tests/hostile_common.h"

#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace taskmaster::testing::hostile {

// ---- The master's memory and descriptors, from /proc ----

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

Latency HonestClient::Since(int64_t from) const {
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

HonestClient::Verdict HonestClient::Stop() {
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

void HonestClient::Run() {
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

absl::Status HonestClient::Follow(const Job& job) {
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

// ---- Attackers' tools ----

std::shared_ptr<grpc::Channel> RawChannel(const ChannelOptions& tls, grpc::ChannelArguments args) {
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
             milliseconds deadline) {
  if (!authorization.empty()) context.AddMetadata("authorization", authorization);
  context.set_deadline(std::chrono::system_clock::now() + deadline);
}

absl::Status Refusal(const std::shared_ptr<grpc::Channel>& channel, const v1::WorkerMessage& first,
                     const std::string& authorization) {
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

RawConnection::RawConnection(int port) : fd_(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd_ >= 0 && connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd_);
    fd_ = -1;
  }
}

void RawConnection::Send(std::string_view bytes) {
  // The master may close before taking it all: that is what is being tested, not an error.
  while (!bytes.empty()) {
    const ssize_t n = send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n <= 0) return;
    bytes.remove_prefix(static_cast<size_t>(n));
  }
}

bool RawConnection::ClosedByPeer(milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  char buffer[4096];
  while (Clock::now() < deadline) {
    pollfd p{fd_, POLLIN, 0};
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count() + 1;
    if (poll(&p, 1, static_cast<int>(left)) <= 0) continue;
    const ssize_t n = recv(fd_, buffer, sizeof(buffer), 0);
    if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) return true;
  }
  return false;
}

std::string FrameHeader(uint32_t length, uint8_t type, uint8_t flags, uint32_t stream) {
  return {static_cast<char>(length >> 16), static_cast<char>(length >> 8),
          static_cast<char>(length),       static_cast<char>(type),
          static_cast<char>(flags),        static_cast<char>(stream >> 24),
          static_cast<char>(stream >> 16), static_cast<char>(stream >> 8),
          static_cast<char>(stream)};
}

std::string Garbage(std::mt19937& rng) {
  std::string s(4096, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  s[0] = s[1] = 0;
  return s;
}

// ---- The fixture ----

void Hostile::SetUpTestSuite() {
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

void Hostile::Start(Security security, const std::vector<std::string>& master_flags) {
  ASSERT_TRUE(certs_error_.empty()) << certs_error_;
  std::vector<std::string> flags = master_flags;
  flags.insert(flags.end(),
               {"--max-message-bytes", std::to_string(kMaxMessageBytes),
                "--max-worker-buffer-bytes", std::to_string(kMaxWorkerBufferBytes), "--max-batch",
                std::to_string(kMaxBatch), "--max-payload-bytes", std::to_string(kMaxPayloadBytes),
                // Tasks of a worker cut off come back within seconds.
                "--lease-timeout-ms", "2000", "--reconnect-grace-ms", "500"});
  std::vector<std::string> worker_flags = {"--threads", "2"};
  if (security != Security::kPlain) {
    flags.insert(flags.end(), {"--tls-cert", Ours("server.pem"), "--tls-key", Ours("server.key")});
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

void Hostile::Repeat(int max_rounds, const std::function<void()>& round) {
  for (rounds_ = 0; rounds_ < max_rounds && Clock::now() < attack_start_ + kAttackCap; ++rounds_) {
    if (Clock::now() >= attack_start_ + kMinAttack &&
        honest_->completed() >= attack_from_ + kMinHonestJobs) {
      break;
    }
    round();
  }
  SampleMemory();
  EXPECT_TRUE(HonestProgressed()) << "the honest client stalled under the attack";
}

void Hostile::EndAttack(std::string sent) {
  during_ = honest_->Since(attack_from_);
  attack_ms_ = std::chrono::duration<double, std::milli>(Clock::now() - attack_start_).count();
  sent_ = std::move(sent);
  SampleMemory();
  ASSERT_TRUE(cluster_->master().Running()) << cluster_->master().Log();
  EXPECT_TRUE(honest_->WaitForJobs(honest_->completed() + 5, seconds(30)));
  auto stats = cluster_->NewClient()->Stats();
  EXPECT_TRUE(stats.ok()) << stats.status();
}

void Hostile::TearDown() {
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
            << " master_rss_kib baseline=" << baseline_.rss_kib << " peak_sampled=" << peak_rss_kib_
            << " hwm=" << end.hwm_kib << " after=" << end.rss_kib << " bound=+" << kMemoryBoundKib
            << std::endl;
}

TempDir* Hostile::certs_ = nullptr;
std::string Hostile::certs_error_;

}  // namespace taskmaster::testing::hostile
