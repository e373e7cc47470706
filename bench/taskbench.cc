// taskbench: the load side of bench/run.sh. Each subcommand drives a running master and prints
// one JSON line with what it measured.
//
//   throughput  submit every number of --numbers in batches, collect and check every result
//   latency     sequential round trips: submit one task, wait for its result
//   fill        submit --count pending tasks of a kind no worker runs (memory, recovery)
//   streams     hold --count simulated worker streams that run `square`, until SIGTERM
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <iostream>
#include <mutex>
#include <thread>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "common/auth.h"
#include "common/signals.h"
#include "nlohmann/json.hpp"

namespace taskmaster::bench {
namespace {

using Clock = std::chrono::steady_clock;

std::string Square(int64_t n) { return absl::StrCat(n, "*", n, "=", n * n); }

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

[[noreturn]] void Die(const std::string& message) {
  std::cerr << "taskbench: " << message << std::endl;
  std::exit(1);
}

std::vector<int64_t> ReadNumbers(const std::string& path) {
  std::ifstream in(path);
  if (!in) Die("cannot read " + path);
  std::vector<int64_t> numbers;
  for (int64_t n; in >> n;) numbers.push_back(n);
  if (numbers.empty()) Die(path + " holds no numbers");
  return numbers;
}

// What `kind` answers for n: `square` its n*n line; any other kind of the benchmark (echo, an exec
// kind running cat) its payload.
std::string Expected(const std::string& kind, int64_t n) {
  return kind == "square" ? Square(n) : std::to_string(n);
}

v1::SubmitRequest SquareBatch(const std::vector<int64_t>& numbers, size_t from, size_t to,
                              const std::string& kind = "square") {
  v1::SubmitRequest request;
  request.mutable_tasks()->Reserve(static_cast<int>(to - from));
  for (size_t i = from; i < to; ++i) {
    v1::TaskSpec* t = request.add_tasks();
    t->set_kind(kind);
    t->set_payload(std::to_string(numbers[i]));
  }
  return request;
}

// Submits in batches while a second thread follows each job as soon as it exists; the clock
// runs from the first submit to the last result.
int Throughput(const Client& client, const std::vector<int64_t>& numbers, size_t batch,
               const std::string& kind) {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<std::string, size_t>> jobs;  // job id, index of its first number
  bool submitted_all = false;
  size_t checked = 0;
  const auto start = Clock::now();
  std::thread collector([&] {
    while (true) {
      std::pair<std::string, size_t> job;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return !jobs.empty() || submitted_all; });
        if (jobs.empty()) return;
        job = jobs.front();
        jobs.pop_front();
      }
      // Task ids of a batch are consecutive: the result of task id `first + k` answers number
      // job.second + k.
      absl::Status status = client.WatchJob(job.first, [&](const v1::JobEvent& event) {
        for (const v1::TaskInfo& t : event.results()) {
          if (t.state() != v1::SUCCEEDED) Die("task " + std::to_string(t.id()) + " " + t.error());
          ++checked;
        }
      });
      if (!status.ok()) Die(std::string(status.message()));
    }
  });
  std::vector<std::pair<std::string, std::pair<uint64_t, size_t>>> firsts;
  for (size_t from = 0; from < numbers.size(); from += batch) {
    const size_t to = std::min(numbers.size(), from + batch);
    auto response = client.Submit(SquareBatch(numbers, from, to, kind));
    if (!response.ok()) Die(std::string(response.status().message()));
    firsts.push_back({response->job_id(), {response->task_ids(0), from}});
    std::lock_guard<std::mutex> lock(mu);
    jobs.push_back({response->job_id(), from});
    cv.notify_one();
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    submitted_all = true;
    cv.notify_one();
  }
  collector.join();
  const double seconds = Seconds(Clock::now() - start);
  if (checked != numbers.size()) Die("missing results");
  // Check every output (outside the timed part).
  size_t wrong = 0;
  for (const auto& [job_id, first] : firsts) {
    // `first` by copy: clang 14 cannot capture a structured binding.
    absl::Status status = client.WatchJob(job_id, [&, first = first](const v1::JobEvent& event) {
      for (const v1::TaskInfo& t : event.results()) {
        const size_t index = first.second + (t.id() - first.first);
        if (index >= numbers.size() || t.output() != Expected(kind, numbers[index])) ++wrong;
      }
    });
    if (!status.ok()) Die(std::string(status.message()));
  }
  if (wrong > 0) Die(std::to_string(wrong) + " wrong results");
  nlohmann::json out = {
      {"tasks", numbers.size()}, {"seconds", seconds}, {"tasks_per_s", numbers.size() / seconds}};
  std::cout << out.dump() << std::endl;
  return 0;
}

double Percentile(std::vector<double> sorted, double p) {
  const size_t k = static_cast<size_t>(
      std::clamp<double>(std::ceil(p / 100.0 * sorted.size()) - 1, 0, sorted.size() - 1));
  return sorted[k];
}

int Latency(const Client& client, const std::vector<int64_t>& numbers, int count, int warmup) {
  std::vector<double> micros;
  for (int k = 0; k < warmup + count; ++k) {
    const int64_t n = numbers[k % numbers.size()];
    const auto start = Clock::now();
    std::string output;
    auto job =
        client.SubmitAndWatch(SquareBatch(numbers, k % numbers.size(), k % numbers.size() + 1),
                              [&](const v1::JobEvent& event) {
                                for (const v1::TaskInfo& t : event.results()) {
                                  output = t.output();
                                }
                              });
    if (!job.ok()) Die(std::string(job.status().message()));
    if (output != Square(n)) Die("wrong latency result: " + output);
    if (k >= warmup) {
      micros.push_back(std::chrono::duration<double, std::micro>(Clock::now() - start).count());
    }
  }
  std::sort(micros.begin(), micros.end());
  nlohmann::json out = {{"round_trips", count},
                        {"p50_us", Percentile(micros, 50)},
                        {"p99_us", Percentile(micros, 99)}};
  std::cout << out.dump() << std::endl;
  return 0;
}

int Fill(const Client& client, int64_t count, int payload_bytes, size_t batch) {
  const auto start = Clock::now();
  for (int64_t from = 0; from < count; from += static_cast<int64_t>(batch)) {
    const int64_t to = std::min<int64_t>(count, from + static_cast<int64_t>(batch));
    v1::SubmitRequest request;
    for (int64_t i = from; i < to; ++i) {
      v1::TaskSpec* t = request.add_tasks();
      t->set_kind("idle");
      std::string payload = std::to_string(i);
      payload.resize(payload_bytes, '.');
      t->set_payload(std::move(payload));
    }
    auto response = client.Submit(request);
    if (!response.ok()) Die(std::string(response.status().message()));
  }
  nlohmann::json out = {{"filled", count}, {"seconds", Seconds(Clock::now() - start)}};
  std::cout << out.dump() << std::endl;
  return 0;
}

// One simulated worker: a callback stream that runs `square` on every task it gets and returns
// the result with one more credit.
class SimulatedWorker final : public grpc::ClientBidiReactor<v1::WorkerMessage, v1::MasterMessage> {
 public:
  SimulatedWorker(v1::WorkerService::Stub* stub, const std::string& token, int index, int slots,
                  int credits, std::atomic<int>* welcomed)
      : welcomed_(welcomed) {
    AddBearerToken(context_, token);
    stub->async()->Connect(&context_, this);
    v1::Hello* hello = first_.mutable_hello();
    hello->set_worker_id(absl::StrCat("sim-", index, "-", getpid()));
    hello->set_name(absl::StrCat("sim-", index));
    hello->set_host("taskbench");
    hello->add_kinds("square");
    hello->set_slots(slots);
    if (credits > 0) first_.set_credits(credits);
    outbox_.push_back(std::move(first_));
    writing_ = true;
    StartWrite(&outbox_.front());
    StartRead(&in_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;
    if (in_.has_welcome()) welcomed_->fetch_add(1);
    if (in_.tasks_size() > 0) {
      const auto started = Clock::now();
      v1::WorkerMessage m;
      for (const v1::Task& t : in_.tasks()) {
        v1::TaskResult* r = m.add_results();
        r->set_task_id(t.task_id());
        r->set_attempt(t.attempt());
        r->set_outcome(v1::TaskResult::SUCCEEDED);
        const int64_t n = std::stoll(t.payload());
        r->set_output(Square(n));
      }
      m.set_credits(in_.tasks_size());
      // As a worker says how long its tasks take (at least 1 µs: 0 is "not measured").
      const double us = std::chrono::duration<double, std::micro>(Clock::now() - started).count() /
                        in_.tasks_size();
      m.set_task_us(std::max<int64_t>(1, std::llround(us)));
      Send(std::move(m));
    }
    StartRead(&in_);
  }

  void Heartbeat() {
    v1::WorkerMessage m;
    m.set_heartbeat(true);
    Send(std::move(m));
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    outbox_.pop_front();
    writing_ = false;
    if (ok && !outbox_.empty()) {
      writing_ = true;
      StartWrite(&outbox_.front());
    }
  }

  void OnDone(const grpc::Status&) override {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    done_cv_.notify_all();
  }

  void Stop() {
    context_.TryCancel();
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait_for(lock, std::chrono::seconds(5), [&] { return done_; });
  }

 private:
  void Send(v1::WorkerMessage m) {
    std::lock_guard<std::mutex> lock(mu_);
    outbox_.push_back(std::move(m));
    if (!writing_) {
      writing_ = true;
      StartWrite(&outbox_.front());
    }
  }

  grpc::ClientContext context_;
  std::atomic<int>* welcomed_;
  v1::WorkerMessage first_;
  v1::MasterMessage in_;
  std::mutex mu_;
  std::deque<v1::WorkerMessage> outbox_;  // front is being written while writing_
  bool writing_ = false;
  bool done_ = false;
  std::condition_variable done_cv_;
};

int Streams(const ChannelOptions& channel_options, const std::string& token, int count, int slots,
            int credits) {
  BlockDaemonSignals();
  auto channel = MakeChannel(channel_options);
  if (!channel.ok()) Die(std::string(channel.status().message()));
  auto stub = v1::WorkerService::NewStub(*channel);
  std::atomic<int> welcomed{0};
  std::vector<std::unique_ptr<SimulatedWorker>> workers;
  for (int i = 0; i < count; ++i) {
    workers.push_back(
        std::make_unique<SimulatedWorker>(stub.get(), token, i, slots, credits, &welcomed));
  }
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (welcomed.load() < count && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (welcomed.load() < count) Die("only " + std::to_string(welcomed.load()) + " streams welcomed");
  std::cout << nlohmann::json({{"streams", count}}).dump() << std::endl;
  // Heartbeats keep their (empty) leases alive until told to stop; bounded to an hour.
  for (int beat = 0; beat < 3600 && WaitForSignal(std::chrono::seconds(1)) == 0; ++beat) {
    for (auto& w : workers) w->Heartbeat();
  }
  for (auto& w : workers) w->Stop();
  return 0;
}

}  // namespace
}  // namespace taskmaster::bench

int main(int argc, char** argv) {
  using namespace taskmaster::bench;
  taskmaster::ClientOptions options;
  std::string token_file, numbers_file;
  size_t batch = 10'000;
  int count = 1000, warmup = 50, payload_bytes = 16;
  int64_t fill_count = 1'000'000;

  CLI::App app{"taskbench: load for bench/run.sh"};
  app.require_subcommand(1);
  app.add_option("--master", options.master.address, "host:port")->required();
  app.add_option("--token-file", token_file, "token file (none: an --insecure master)");
  CLI::App* throughput = app.add_subcommand("throughput", "submit and collect every number");
  throughput->add_option("--numbers", numbers_file, "one integer per line")->required();
  throughput->add_option("--batch", batch, "tasks per submit")->capture_default_str();
  std::string kind = "square";
  throughput->add_option("--kind", kind, "square, or a kind answering its payload (echo, cat)")
      ->capture_default_str();
  CLI::App* latency = app.add_subcommand("latency", "sequential round trips");
  latency->add_option("--numbers", numbers_file, "one integer per line")->required();
  latency->add_option("--count", count, "measured round trips")->capture_default_str();
  latency->add_option("--warmup", warmup, "unmeasured round trips first")->capture_default_str();
  CLI::App* fill = app.add_subcommand("fill", "submit pending tasks no worker runs");
  fill->add_option("--count", fill_count, "tasks")->capture_default_str();
  fill->add_option("--payload-bytes", payload_bytes, "payload size")->capture_default_str();
  fill->add_option("--batch", batch, "tasks per submit")->capture_default_str();
  CLI::App* streams = app.add_subcommand("streams", "simulated worker streams until SIGTERM");
  streams->add_option("--count", count, "streams")->capture_default_str();
  int slots = 2, credits = 64;
  streams->add_option("--slots", slots, "threads each stream claims")->capture_default_str();
  streams->add_option("--credits", credits, "tasks each stream holds at most (0: idle)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  if (!token_file.empty()) {
    auto token = taskmaster::ReadTokenFile(token_file);
    if (!token.ok()) Die(std::string(token.status().message()));
    options.token = *token;
  }
  options.rpc_timeout = std::chrono::seconds(120);
  if (*streams) return Streams(options.master, options.token, count, slots, credits);
  auto client = taskmaster::Client::Connect(options);
  if (!client.ok()) Die(std::string(client.status().message()));
  if (*throughput) return Throughput(**client, ReadNumbers(numbers_file), batch, kind);
  if (*latency) return Latency(**client, ReadNumbers(numbers_file), count, warmup);
  if (*fill) return Fill(**client, fill_count, payload_bytes, batch);
  return 1;
}
