#pragma once

#include <cstdint>
#include <string_view>

namespace taskmaster {

// CRC-32C (Castagnoli) of `data`, continuing from `crc` (0 to start).
uint32_t Crc32c(std::string_view data, uint32_t crc = 0);

// A checksum over a record's fields: each field is framed (strings by their length), so moving
// bytes from one field to the next changes the result.
class RecordChecksum {
 public:
  RecordChecksum& Add(int64_t value);
  RecordChecksum& Add(std::string_view value);
  uint32_t value() const { return ~reg_; }

 private:
  uint32_t reg_ = ~uint32_t{0};  // the CRC register: Crc32c's running value, inverted
};

}  // namespace taskmaster
