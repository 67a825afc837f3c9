// bfloat16 storage (StateDType::bf16): the upper 16 bits of an IEEE float32. Plain bit
// manipulation, no intrinsics, so it builds for any x86-64; the loops are written so that GCC
// vectorises them (a select, no branch), with whatever -march the build uses.
//
//   to_bf16     rounds to nearest, ties to even (as _mm512_cvtneps_pbh and PyTorch's
//               .to(torch.bfloat16) do). Infinities stay infinities, a finite value past the
//               largest bf16 (0x7f7f, ~3.39e38) rounds to infinity, subnormals round like any
//               other value, and a NaN stays a NaN (made quiet, sign kept) instead of rounding
//               into an infinity.
//   from_bf16   widens exactly: every bf16 is a float32.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

namespace shmps::shm {

constexpr std::uint16_t to_bf16(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t rounded = (u + 0x7fffU + ((u >> 16) & 1U)) >> 16;
  const std::uint32_t quiet_nan = (u >> 16) | 0x0040U;
  return static_cast<std::uint16_t>((u & 0x7fffffffU) > 0x7f800000U ? quiet_nan : rounded);
}

constexpr float from_bf16(std::uint16_t b) noexcept { return std::bit_cast<float>(std::uint32_t{b} << 16); }

// n elements; in and out do not overlap.
inline void to_bf16(const float* __restrict in, std::uint16_t* __restrict out, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = to_bf16(in[i]);
}
inline void from_bf16(const std::uint16_t* __restrict in, float* __restrict out, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = from_bf16(in[i]);
}

}  // namespace shmps::shm
