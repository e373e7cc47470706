// The store that keeps nothing: every change is "durable" at once, and a restart loses all.
#include "master/store/memory_store.h"

#include "common/util.h"

namespace taskmaster {
namespace {

class MemoryStore final : public Store {
 public:
  std::string Epoch() const override { return epoch_; }
  bool persistent() const override { return false; }
  absl::Status Load(RecoveryVisitor*) override { return absl::OkStatus(); }
  absl::Status Writable() const override { return absl::OkStatus(); }
  void Submit(SubmitRows, std::function<void(absl::Status)> done) override {
    done(absl::OkStatus());
  }
  void UpdateTask(TaskId, TaskStatusRow) override {}
  void DeleteTask(TaskId) override {}
  void DeleteJob(const std::string&) override {}
  void PutWorker(const WorkerRow&) override {}
  void DeleteWorker(const std::string&) override {}
  void Flush(std::function<void(absl::Status)> done) override { done(absl::OkStatus()); }
  void Close() override {}

 private:
  const std::string epoch_ = "mem-" + RandomHex(8);
};

}  // namespace

std::unique_ptr<Store> NewMemoryStore() { return std::make_unique<MemoryStore>(); }

}  // namespace taskmaster
