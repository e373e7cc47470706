#include "common/checksum.h"

#include <array>
#include <cstring>

namespace taskmaster {
namespace {

constexpr uint32_t kPolynomial = 0x82F63B78;  // CRC-32C, reflected

constexpr std::array<uint32_t, 256> MakeTable() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPolynomial : c >> 1;
    table[i] = c;
  }
  return table;
}

constexpr std::array<uint32_t, 256> kTable = MakeTable();

uint32_t SoftwareCrc(const unsigned char* p, size_t n, uint32_t crc) {
  for (size_t i = 0; i < n; ++i) crc = kTable[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
// SSE 4.2 has an instruction for exactly this polynomial: payloads of a megabyte cost
// microseconds instead of a millisecond on the writer thread.
__attribute__((target("sse4.2"))) uint32_t HardwareCrc(const unsigned char* p, size_t n,
                                                       uint32_t crc) {
  uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    c = __builtin_ia32_crc32di(c, word);
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  for (; n > 0; --n, ++p) c32 = __builtin_ia32_crc32qi(c32, *p);
  return c32;
}

__attribute__((target("sse4.2"))) uint32_t HardwareCrc64(uint32_t crc, uint64_t word) {
  return static_cast<uint32_t>(__builtin_ia32_crc32di(crc, word));
}

const bool kHasSse42 = __builtin_cpu_supports("sse4.2");
#endif

// The CRC register before its final inversion: records chain many short fields, so the
// inversions happen once per record rather than once per field.
uint32_t Continue(std::string_view data, uint32_t reg) {
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
#if defined(__x86_64__)
  return kHasSse42 ? HardwareCrc(p, data.size(), reg) : SoftwareCrc(p, data.size(), reg);
#else
  return SoftwareCrc(p, data.size(), reg);
#endif
}

}  // namespace

uint32_t Crc32c(std::string_view data, uint32_t crc) { return ~Continue(data, ~crc); }

RecordChecksum& RecordChecksum::Add(int64_t value) {
#if defined(__x86_64__)
  // Little-endian already: one instruction, where a record's many numbers add up at recovery.
  if (kHasSse42) {
    reg_ = HardwareCrc64(reg_, static_cast<uint64_t>(value));
    return *this;
  }
#endif
  char bytes[8];  // little-endian, whatever the host
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(static_cast<uint64_t>(value) >> (8 * i));
  reg_ = Continue(std::string_view(bytes, 8), reg_);
  return *this;
}

RecordChecksum& RecordChecksum::Add(std::string_view value) {
  Add(static_cast<int64_t>(value.size()));
  reg_ = Continue(value, reg_);
  return *this;
}

}  // namespace taskmaster
