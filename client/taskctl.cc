// taskctl: submit tasks and follow them. Flags → a command of client/commands.h.
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "CLI/CLI.hpp"
#include "client/commands.h"
#include "client/top.h"
#include "common/auth.h"
#include "common/logging.h"

namespace {

// The next payload of `in`, one per line; blank lines are skipped.
bool NextLine(std::istream& in, std::string* payload) {
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    *payload = std::move(line);
    return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  taskmaster::ClientOptions options;
  std::string token_file, format = "text", log_format = "text", file, delay = "0", timeout = "0";
  taskmaster::SubmitArgs submit;
  std::vector<std::string> payloads;
  std::string id;

  CLI::App app{"taskctl: submit tasks to a taskmaster master and follow them"};
  app.require_subcommand(1);
  app.add_option("--master", options.master.address,
                 "host:port of the master, or several comma-separated (masters sharing a "
                 "PostgreSQL store: the one that serves is found and followed)")
      ->envname("TASKMASTER_ADDR");
  app.add_option("--token-file", token_file, "file holding a token (or set TASKMASTER_TOKEN)");
  app.add_option("--format", format, "text or json")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  app.add_option("--log-format", log_format,
                 "warnings on stderr: text, or json (one object a line, as the daemons' logs)")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  app.add_option("--max-message-bytes", options.master.max_message_bytes,
                 "largest gRPC message either way (as the master's)")
      ->capture_default_str();
  app.add_option("--tls-ca", options.master.tls_ca_file, "PEM CA bundle: connect with TLS");
  app.add_option("--tls-cert", options.master.tls_cert_file, "PEM client certificate (mutual TLS)");
  app.add_option("--tls-key", options.master.tls_key_file, "PEM key of --tls-cert");

  CLI::App* sub = app.add_subcommand("submit", "submit tasks; prints the job id first");
  sub->add_option("--kind", submit.kind, "handler name, e.g. square")->required();
  sub->add_option("payloads", payloads, "payloads (default: one per line of --file/stdin)");
  sub->add_option("--file", file, "read payloads one per line from this file ('-': stdin)");
  sub->add_option("--queue", submit.queue, "queue name (default: default)");
  sub->add_option("--priority", submit.priority, "higher runs first");
  sub->add_option("--delay", delay, "run no sooner than this (e.g. 500ms, 10s, 5m)");
  sub->add_option("--timeout", timeout, "execution timeout (default: the master's)");
  sub->add_option("--max-attempts", submit.max_attempts,
                  "attempts before DEAD (default: master's)");
  sub->add_option("--key", submit.key, "idempotency key: resubmitting it returns the first task");
  sub->add_option("--label", submit.labels, "required worker labels: k=v,k2=v2");
  sub->add_flag("--wait", submit.wait, "follow the job and print each result");
  sub->add_option("--batch-size", submit.batch_size,
                  "payloads per submit call; more input makes one job of several calls")
      ->check(CLI::Range(size_t{1}, size_t{100'000}))
      ->capture_default_str();
  int64_t batch_wait_ms = submit.batch_wait.count();
  sub->add_option("--batch-wait-ms", batch_wait_ms,
                  "send a batch this long after its first payload, full or not (slow input)")
      ->check(CLI::Range(int64_t{1}, int64_t{3'600'000}))
      ->capture_default_str();

  CLI::App* wait = app.add_subcommand("wait", "follow a job, printing each result as it completes");
  wait->add_option("job", id, "job id")->required();
  CLI::App* status = app.add_subcommand("status", "show a task or a job");
  status->add_option("id", id, "task id or job id")->required();
  CLI::App* cancel =
      app.add_subcommand("cancel", "cancel a task, or every unfinished task of a job");
  cancel->add_option("id", id, "task id or job id")->required();
  CLI::App* stats = app.add_subcommand("stats", "queue counts and connected workers");
  CLI::App* workers = app.add_subcommand("workers", "connected workers");
  CLI::App* health = app.add_subcommand(
      "health", "whether the master serves (exit 0), or not (1: draining, store cannot write)");
  int64_t timeout_ms = options.rpc_timeout.count();
  health->add_option("--timeout-ms", timeout_ms, "give up after this long (exit 2)")
      ->check(CLI::Range(int64_t{1}, int64_t{3'600'000}))
      ->capture_default_str();
  CLI::App* top = app.add_subcommand(
      "top", "a live view of queues and workers, q quits (not on a terminal: plain snapshots)");
  taskmaster::TopArgs top_args;
  int64_t interval_ms = top_args.interval.count();
  top->add_option("--interval-ms", interval_ms, "refresh this often")
      ->check(CLI::Range(int64_t{100}, int64_t{60'000}))
      ->capture_default_str();
  top->add_option("--count", top_args.count,
                  "stop after this many refreshes (0: until q; plain output: until killed)")
      ->check(CLI::Range(int64_t{0}, int64_t{1'000'000'000}))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  taskmaster::Console console{
      std::cout, std::cerr,
      format == "json" ? taskmaster::OutputFormat::kJson : taskmaster::OutputFormat::kText,
      isatty(STDERR_FILENO) == 1};
  auto fail = [&](const absl::Status& s) {
    std::cerr << "taskctl: " << s.message() << "\n";
    return taskmaster::kExitError;
  };
  if (absl::Status s = taskmaster::SetupLogging("info", log_format); !s.ok()) return fail(s);
  const std::shared_ptr<spdlog::logger> log = taskmaster::GetLogger("taskctl");
  absl::StatusOr<taskmaster::PresentedToken> token = taskmaster::LoadPresentedToken(token_file);
  if (!token.ok()) return fail(token.status());
  if (!token->warning.empty()) log->warn("{}", token->warning);
  options.token = std::move(token->token);
  if (std::string warning =
          taskmaster::CleartextTokenWarning(options.master, !options.token.empty());
      !warning.empty()) {
    log->warn("{}", warning);
  }
  if (*health) options.rpc_timeout = std::chrono::milliseconds(timeout_ms);
  if (*top) {
    if (console.format == taskmaster::OutputFormat::kJson) {
      return fail(absl::InvalidArgumentError(
          "top draws text only: poll `taskctl --format json stats` for JSON"));
    }
    top_args.interval = std::chrono::milliseconds(interval_ms);
    // A master that does not answer holds up q (and Ctrl-C) no longer than this.
    options.rpc_timeout = std::clamp(top_args.interval, std::chrono::milliseconds(1'000),
                                     std::chrono::milliseconds(5'000));
  }
  auto client = taskmaster::Client::Connect(options);
  if (!client.ok()) return fail(client.status());

  if (*sub) {
    auto delay_ms = taskmaster::ParseDurationMs(delay);
    if (!delay_ms.ok()) return fail(delay_ms.status());
    auto timeout_ms = taskmaster::ParseDurationMs(timeout);
    if (!timeout_ms.ok()) return fail(timeout_ms.status());
    submit.delay_ms = *delay_ms;
    submit.batch_wait = std::chrono::milliseconds(batch_wait_ms);
    submit.timeout_ms = *timeout_ms;
    if (!file.empty() && !payloads.empty()) {
      return fail(absl::InvalidArgumentError("give payloads as arguments or --file, not both"));
    }
    // Read as they are submitted: input of any size streams through in batches.
    std::ifstream in;
    size_t given = 0;
    if (!payloads.empty()) {
      submit.input_may_block = false;
      submit.next_payload = [&](std::string* payload) {
        if (given == payloads.size()) return false;
        *payload = std::move(payloads[given++]);
        return true;
      };
    } else if (file.empty() || file == "-") {
      submit.next_payload = [](std::string* payload) { return NextLine(std::cin, payload); };
    } else {
      in.open(file);
      if (!in) return fail(absl::NotFoundError("cannot read " + file));
      std::error_code ec;
      submit.input_may_block = !std::filesystem::is_regular_file(file, ec);
      submit.next_payload = [&](std::string* payload) { return NextLine(in, payload); };
    }
    return taskmaster::RunSubmit(**client, submit, console);
  }
  if (*wait) return taskmaster::RunWait(**client, id, console);
  if (*status) return taskmaster::RunStatus(**client, id, console);
  if (*cancel) return taskmaster::RunCancel(**client, id, console);
  if (*stats) return taskmaster::RunStats(**client, console);
  if (*workers) return taskmaster::RunWorkers(**client, console);
  if (*health) return taskmaster::RunHealth(**client, console);
  if (*top) return taskmaster::RunTop(**client, top_args, console);
  return taskmaster::kExitError;
}
