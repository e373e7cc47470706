#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>

namespace taskmaster {

// Bytes kept inside their owner when short. std::string keeps 15 bytes inside its 32 and
// allocates beyond: a pending task's small payload (a number, an id, a short path) then costs a
// heap block of 32 bytes more. This keeps up to kInline bytes inside the same 32.
class InlineBytes {
 public:
  static constexpr size_t kInline = 28;

  InlineBytes() = default;
  explicit InlineBytes(std::string_view s) { Assign(s); }
  InlineBytes(const InlineBytes& o) : InlineBytes(o.view()) {}
  InlineBytes(InlineBytes&& o) noexcept { Take(o); }
  InlineBytes& operator=(const InlineBytes& o) { return *this = o.view(); }
  InlineBytes& operator=(InlineBytes&& o) noexcept {
    if (this != &o) {
      Release();
      Take(o);
    }
    return *this;
  }
  InlineBytes& operator=(std::string_view s) {
    InlineBytes copy(s);  // `s` may lie within this one's bytes
    return *this = std::move(copy);
  }
  ~InlineBytes() { Release(); }

  std::string_view view() const { return {data(), size_}; }
  std::string str() const { return std::string(view()); }
  size_t size() const { return size_; }
  bool operator==(std::string_view s) const { return view() == s; }

 private:
  bool on_heap() const { return size_ > kInline; }
  char* heap() const {
    char* p;
    std::memcpy(&p, buf_, sizeof p);
    return p;
  }
  const char* data() const { return on_heap() ? heap() : buf_; }
  void Assign(std::string_view s) {
    if (s.size() > UINT32_MAX) throw std::length_error("InlineBytes over 4 GiB");
    if (s.size() > kInline) {
      char* p = new char[s.size()];
      std::memcpy(p, s.data(), s.size());
      std::memcpy(buf_, &p, sizeof p);
    } else if (!s.empty()) {
      std::memcpy(buf_, s.data(), s.size());
    }
    size_ = static_cast<uint32_t>(s.size());
  }
  void Take(InlineBytes& o) {
    std::memcpy(buf_, o.buf_, sizeof buf_);
    size_ = o.size_;
    o.size_ = 0;
  }
  void Release() {
    if (on_heap()) delete[] heap();
    size_ = 0;
  }

  // The bytes themselves, or (past kInline) the address of a heap block holding them.
  char buf_[kInline];
  uint32_t size_ = 0;
};

static_assert(sizeof(InlineBytes) == 32);

}  // namespace taskmaster
