// How every message, file header and table writes a tensor shape: "[256, 784]" ("[]" for a
// 0-d tensor).
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace shmps {

inline std::string shape_text(std::span<const std::uint64_t> shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i != 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

}  // namespace shmps
