#include "common/util.h"
#include "master/store.h"

namespace taskmaster {
namespace {

class MemoryStore final : public Store {
 public:
  std::string Epoch() const override { return epoch_; }
  void Flush(std::function<void(absl::Status)> done) override { done(absl::OkStatus()); }

 private:
  const std::string epoch_ = "mem-" + RandomHex(8);
};

}  // namespace

std::unique_ptr<Store> NewMemoryStore() { return std::make_unique<MemoryStore>(); }

}  // namespace taskmaster
