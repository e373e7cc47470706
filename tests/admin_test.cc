// The master's admin listener in process: what it answers in each state of the master, the cap
// on queue labels, and the histogram arithmetic behind the status page's quantiles.
#include "master/admin/admin.h"

#include <gtest/gtest.h>

#include <atomic>
#include <optional>
#include <string>

#include "common/clock.h"
#include "common/histogram.h"
#include "common/logging.h"
#include "httplib.h"
#include "master/store/memory_store.h"
#include "tests/expect.h"
#include "tests/fakes.h"

namespace taskmaster::testing {
namespace {

class AdminTest : public ::testing::Test {
 protected:
  // With `partitions`, the broker serves partition 0 and another master the rest.
  void Start(size_t max_metric_queues = 100, int32_t partitions = 1) {
    brokers_.emplace(partitions, [](int32_t) { return std::string("127.0.0.1:7080"); });
    brokers_->Add(0, std::shared_ptr<Broker>(&broker_, [](Broker*) {}));
    MasterAdminOptions options;
    options.http.listen = "127.0.0.1:0";
    options.max_metric_queues = max_metric_queues;
    AdminSources sources{&*brokers_,
                         [this] { return store_->Metrics(); },
                         [this] {
                           return MasterHealth{state_.load(), "why"};
                         },
                         [] { return AuthFailures{}; },
                         [this] { return ticking_.load(); },
                         "127.0.0.1:7070",
                         15'000};
    auto admin = MasterAdmin::Start(options, sources, GetLogger("admin-test"));
    ASSERT_TRUE(admin.ok()) << admin.status();
    admin_ = std::move(*admin);
  }

  httplib::Result Get(const char* path) {
    httplib::Client client("127.0.0.1", admin_->port());
    return client.Get(path);
  }

  FakeClock clock_;
  std::unique_ptr<Store> store_ = NewMemoryStore();
  Broker broker_{BrokerOptions{}, &clock_, store_.get(), GetLogger("broker-test")};
  // The admin reads the broker through the set, which does not own it here.
  std::optional<BrokerSet> brokers_;
  std::atomic<MasterState> state_{MasterState::kRecovering};
  std::atomic<bool> ticking_{false};
  std::unique_ptr<MasterAdmin> admin_;
};

TEST_F(AdminTest, WhileRecoveringItIsAliveButNotReadyAndReadsNothingOfTheBroker) {
  Start();
  httplib::Result ready = Get("/readyz");
  ASSERT_TRUE(ready);
  EXPECT_EQ(ready->status, 503);
  EXPECT_EQ(ready->body, "not serving: recovering\n");
  httplib::Result alive = Get("/healthz");
  ASSERT_TRUE(alive);
  EXPECT_EQ(alive->status, 200);
  const std::string metrics = admin_->Metrics();
  EXPECT_CONTAINS(metrics, "taskmaster_state{state=\"recovering\"} 1\n");
  EXPECT_EQ(metrics.find("taskmaster_tasks"), std::string::npos);
  EXPECT_CONTAINS(admin_->StatusJson(), "\"state\":\"recovering\"");
}

TEST_F(AdminTest, ReadyWhileServingAndNotAliveWhenTheTimersStall) {
  ASSERT_TRUE(broker_.Recover().ok());
  state_ = MasterState::kServing;
  Start();
  EXPECT_EQ(Get("/readyz")->status, 200);
  EXPECT_EQ(Get("/healthz")->status, 503);
  ticking_ = true;
  EXPECT_EQ(Get("/healthz")->status, 200);
  state_ = MasterState::kStoreFailing;
  EXPECT_EQ(Get("/readyz")->status, 503);
  EXPECT_CONTAINS(admin_->Metrics(), "taskmaster_state{state=\"store_failing\"} 1\n");
}

TEST_F(AdminTest, TheStatusNamesThePartitionsServedHereAndWhoServesTheOthers) {
  ASSERT_TRUE(broker_.Recover().ok());
  state_ = MasterState::kServing;
  Start(100, /*partitions=*/4);
  const std::string status = admin_->StatusJson();
  EXPECT_CONTAINS(status, "\"partitions\":[0]");
  EXPECT_CONTAINS(status, "\"partition_count\":4");
  EXPECT_CONTAINS(status, "\"other_masters\":[\"127.0.0.1:7080\"]");
}

TEST_F(AdminTest, QueuesPastTheCapShareOneLabel) {
  ASSERT_TRUE(broker_.Recover().ok());
  state_ = MasterState::kServing;
  Start(/*max_metric_queues=*/2);
  for (const char* queue : {"a", "b", "c", "d"}) {
    TaskSpec spec = Spec("square", "1");
    spec.queue = queue;
    broker_.Submit(kClient, {spec}, [](absl::StatusOr<SubmitOutcome>) {});
  }
  const std::string metrics = admin_->Metrics();
  EXPECT_CONTAINS(metrics, "taskmaster_tasks_submitted_total{queue=\"a\"} 1\n");
  EXPECT_CONTAINS(metrics, "taskmaster_tasks_submitted_total{queue=\"b\"} 1\n");
  EXPECT_CONTAINS(metrics, "taskmaster_tasks_submitted_total{queue=\"(other)\"} 2\n");
  EXPECT_EQ(metrics.find("queue=\"c\""), std::string::npos);
  // The page shows every queue.
  EXPECT_CONTAINS(admin_->StatusJson(), "\"queue\":\"d\"");
}

TEST(HistogramTest, QuantilesInterpolateWithinTheirBucket) {
  const double bounds[] = {1, 2, 4};
  Histogram h(bounds);
  EXPECT_EQ(Quantile(h.bounds(), h.counts(), 0.5), -1);
  for (double v : {0.5, 1.5, 1.5, 3.0}) h.Observe(v);
  EXPECT_EQ(h.count(), 4u);
  EXPECT_DOUBLE_EQ(h.sum(), 6.5);
  EXPECT_EQ(h.counts(), (std::vector<uint64_t>{1, 2, 1, 0}));
  EXPECT_DOUBLE_EQ(Quantile(h.bounds(), h.counts(), 0.25), 1.0);  // the first bucket's top
  EXPECT_DOUBLE_EQ(Quantile(h.bounds(), h.counts(), 0.5), 1.5);   // halfway into (1, 2]
  EXPECT_DOUBLE_EQ(Quantile(h.bounds(), h.counts(), 1.0), 4.0);
  h.Observe(100);  // above every bound: the top bucket answers its lower bound
  EXPECT_DOUBLE_EQ(Quantile(h.bounds(), h.counts(), 1.0), 4.0);
  Histogram other(bounds);
  other.Merge(h);
  EXPECT_EQ(other.counts(), h.counts());
}

}  // namespace
}  // namespace taskmaster::testing
