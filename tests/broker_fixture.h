#pragma once

// The fixture of the broker unit tests (broker_*_test.cc): a broker in memory, with a fake clock
// and fake worker channels, and short ways to submit, attach workers and report.

#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "common/logging.h"
#include "master/core/broker.h"
#include "master/store/memory_store.h"
#include "tests/fakes.h"

namespace taskmaster::testing {

class BrokerTest : public ::testing::Test {
 protected:
  BrokerTest() {
    options_.lease_timeout_ms = 10'000;
    options_.reconnect_grace_ms = 5'000;
    options_.retry_backoff_ms = 1'000;
    options_.retry_backoff_max_ms = 4'000;
    options_.result_retention_ms = 60'000;
    options_.max_queue_length = 100;
    options_.max_payload_bytes = 64;
    options_.max_batch = 50;
    Reset();
  }

  void Reset() {
    broker_ = std::make_unique<Broker>(options_, &clock_, store_.get(), GetLogger("broker-test"));
  }

  absl::StatusOr<SubmitOutcome> Submit(std::vector<TaskSpec> specs,
                                       const Caller& caller = kClient) {
    absl::StatusOr<SubmitOutcome> result = absl::UnknownError("not called");
    broker_->Submit(caller, std::move(specs), [&](absl::StatusOr<SubmitOutcome> r) { result = r; });
    return result;
  }

  // A batch into `target`: a new job left open, or the next batch of an open one.
  absl::StatusOr<SubmitOutcome> SubmitTo(const SubmitTarget& target, std::vector<TaskSpec> specs,
                                         const Caller& caller = kClient) {
    absl::StatusOr<SubmitOutcome> result = absl::UnknownError("not called");
    broker_->Submit(caller, target, std::move(specs),
                    [&](absl::StatusOr<SubmitOutcome> r) { result = r; });
    return result;
  }

  TaskId SubmitOne(TaskSpec spec) {
    auto out = Submit({std::move(spec)});
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? out->task_ids.at(0) : 0;
  }

  struct Attached {
    Broker::WorkerHandle handle;
    std::shared_ptr<FakeChannel> channel;
  };

  Attached Attach(const std::string& id, int32_t slots, int32_t credits,
                  std::vector<std::string> kinds = {"square", "sleep", "echo"}, Labels labels = {},
                  std::vector<TaskRef> held = {}) {
    WorkerHello hello;
    hello.worker_id = id;
    hello.name = id;
    hello.kinds = std::move(kinds);
    hello.slots = slots;
    hello.labels = std::move(labels);
    hello.held = std::move(held);
    hello.master_epoch = broker_->epoch();
    hello.secret = secrets_[id];  // as a worker that reconnects shows its welcome's
    auto channel = std::make_shared<FakeChannel>();
    auto handle = broker_->Attach(hello, channel);
    EXPECT_TRUE(handle.ok()) << handle.status();
    if (channel->welcome) secrets_[id] = channel->welcome->secret;
    if (credits > 0) broker_->AddCredits(*handle, credits);
    return {*handle, channel};
  }

  std::map<std::string, std::string> secrets_;  // worker id → the secret of its last welcome

  void Report(const Attached& w, const LeasedTask& t, Outcome outcome, std::string out = "") {
    TaskReport r;
    r.id = t.id;
    r.attempt = t.attempt;
    r.outcome = outcome;
    if (outcome == Outcome::kSucceeded) {
      r.output = std::move(out);
    } else {
      r.error = std::move(out);
    }
    broker_->Report(w.handle, {r});
  }

  TaskState State(TaskId id) { return broker_->GetTask(kClient, id)->state; }

  void Pass(int64_t ms) { testing::PassTime(clock_, *broker_, ms); }

  BrokerOptions options_;
  FakeClock clock_;
  std::unique_ptr<Store> store_ = NewMemoryStore();
  std::unique_ptr<Broker> broker_;
};

}  // namespace taskmaster::testing
