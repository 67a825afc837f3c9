// SplitMix64 streams and the exact uniform mappings of the reference workloads
// (docs/workloads.md §1). Shared by the server's parameter initialisers and the
// example trainer's synthetic data, so both sides produce the same bytes in any language.
#pragma once

#include <cstdint>

namespace shmps {

inline constexpr std::uint64_t kSplitMixGamma = 0x9E3779B97F4A7C15ULL;

// The SplitMix64 output function applied to a state value.
constexpr std::uint64_t splitmix_mix(std::uint64_t z) noexcept {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Draw number i (0-based) of stream s, computed directly: mix(s + (i+1) * gamma).
constexpr std::uint64_t splitmix_draw(std::uint64_t stream, std::uint64_t i) noexcept {
  return splitmix_mix(stream + (i + 1) * kSplitMixGamma);
}

// float32 in [-1, 1): (int64(z >> 40) - 2^23) * 2^-23. Exact, no rounding.
constexpr float u24(std::uint64_t z) noexcept {
  return static_cast<float>(static_cast<std::int64_t>(z >> 40) - (std::int64_t{1} << 23)) *
         (1.0f / static_cast<float>(1 << 23));
}

// float64 in [-1, 1): (int64(z >> 48) - 2^15) * 2^-15. Exact.
constexpr double u16(std::uint64_t z) noexcept {
  return static_cast<double>(static_cast<std::int64_t>(z >> 48) - (std::int64_t{1} << 15)) *
         (1.0 / static_cast<double>(1 << 15));
}

// A sequential stream, for code that walks draws in order.
class SplitMix64 {
 public:
  explicit constexpr SplitMix64(std::uint64_t seed) noexcept : state_(seed) {}
  constexpr std::uint64_t next() noexcept {
    state_ += kSplitMixGamma;
    return splitmix_mix(state_);
  }
  constexpr std::uint64_t state() const noexcept { return state_; }

 private:
  std::uint64_t state_;
};

static_assert(splitmix_draw(1, 0) == 0x910a2dec89025cc1ULL, "workloads fingerprint: first draw of stream 1");

}  // namespace shmps
