// The value dtypes of a parameter (DType, layout.hpp): names, and the conversions between the
// stored 2-byte types and float32.
//
//   bf16   bfloat16: the upper 16 bits of an IEEE float32 (bf16.hpp: to_bf16 / from_bf16).
//   fp16   IEEE 754 binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
//
// Narrowing rounds to nearest, ties to even, as PyTorch's .to(torch.bfloat16) / .half() and
// numpy's astype(float16) do: a finite value past the largest finite value of the type (bf16
// ~3.39e38, fp16 65504) by half an ulp or more becomes an infinity, an infinity stays one, values
// below the smallest normal round into the subnormals like any other value (fp16: multiples of
// 2^-24), and a NaN stays a NaN (made quiet, sign kept). Widening is exact: every bf16 and fp16
// value is a float32. Plain bit manipulation, no intrinsics (any x86-64, any -march); the loops
// have no branch in their bodies, so GCC vectorises them with whatever -march the build uses.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include <shmps/shm/bf16.hpp>
#include <shmps/shm/layout.hpp>

namespace shmps::shm {

constexpr std::string_view to_string(DType d) noexcept {
  switch (d) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::fp16: return "fp16";
  }
  return "?";
}

// "f32" | "bf16" | "fp16" (the spec's spelling); nullopt for anything else.
constexpr std::optional<DType> dtype_from_string(std::string_view s) noexcept {
  if (s == "f32") return DType::f32;
  if (s == "bf16") return DType::bf16;
  if (s == "fp16") return DType::fp16;
  return std::nullopt;
}

// The safetensors dtype of a tensor of values of dtype d: "F32", "BF16", "F16".
constexpr std::string_view safetensors_dtype(DType d) noexcept {
  switch (d) {
    case DType::f32: return "F32";
    case DType::bf16: return "BF16";
    case DType::fp16: return "F16";
  }
  return "?";
}

// float32 -> IEEE binary16, round to nearest even (see above).
constexpr std::uint16_t to_fp16(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (u >> 16) & 0x8000U;
  const std::uint32_t a = u & 0x7fffffffU;
  // Normal results: rebias the exponent (127 -> 15: minus 112 << 23) and round the 13 dropped bits
  // to nearest even; a carry out of the mantissa goes into the exponent, and past the largest
  // exponent into the infinity's bit pattern. Only meaningful for 2^-14 <= |f| < 65520.
  const std::uint32_t normal = (a - 0x38000000U + 0xfffU + ((a >> 13) & 1U)) >> 13;
  // Subnormal results (|f| < 2^-14): adding 0.5f aligns the value so that the FPU's own rounding
  // (to nearest even) keeps exactly the 10 bits of a binary16 subnormal in the low mantissa bits
  // (0.5f is 2^-1 = 2^-24 x 2^23). The subtraction leaves them.
  const std::uint32_t subnormal =
      std::bit_cast<std::uint32_t>(std::bit_cast<float>(a) + 0.5f) - std::bit_cast<std::uint32_t>(0.5f);
  const std::uint32_t nan = 0x7e00U | ((a >> 13) & 0x3ffU);  // quiet, the top of the payload kept
  const std::uint32_t r = a > 0x7f800000U   ? nan
                          : a >= 0x477ff000U ? 0x7c00U  // 65520 and up (a tie rounds to the even infinity), inf
                          : a >= 0x38800000U ? normal
                                             : subnormal;
  return static_cast<std::uint16_t>(sign | r);
}

// IEEE binary16 -> float32, exact.
constexpr float from_fp16(std::uint16_t h) noexcept {
  const std::uint32_t sign = std::uint32_t{h & 0x8000U} << 16;
  const std::uint32_t e = (h >> 10) & 0x1fU;
  const std::uint32_t m = h & 0x3ffU;
  // A subnormal is m x 2^-24: exact in float32 arithmetic (m < 2^10).
  const std::uint32_t sub = std::bit_cast<std::uint32_t>(static_cast<float>(m) * 0x1p-24f);
  const std::uint32_t bits = e == 0x1fU ? (0x7f800000U | (m << 13))  // inf, NaN (payload kept)
                             : e == 0    ? sub
                                         : ((e + 112U) << 23) | (m << 13);
  return std::bit_cast<float>(sign | bits);
}

// n elements; in and out do not overlap.
inline void to_fp16(const float* __restrict in, std::uint16_t* __restrict out, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = to_fp16(in[i]);
}
inline void from_fp16(const std::uint16_t* __restrict in, float* __restrict out, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = from_fp16(in[i]);
}

// The stored form of n float32 values in a 2-byte dtype (bf16 or fp16), rounded to nearest even.
inline void narrow(DType d, const float* __restrict in, std::uint16_t* __restrict out, std::size_t n) noexcept {
  if (d == DType::fp16)
    to_fp16(in, out, n);
  else
    to_bf16(in, out, n);
}
// n stored 2-byte values (bf16 or fp16) as float32, exactly.
inline void widen(DType d, const std::uint16_t* __restrict in, float* __restrict out, std::size_t n) noexcept {
  if (d == DType::fp16)
    from_fp16(in, out, n);
  else
    from_bf16(in, out, n);
}
// Rounds n float32 values in place to the nearest value dtype d holds (f32: nothing to do), so
// that narrowing them afterwards is exact. What the server does to new values once per update.
inline void round_to(DType d, float* v, std::size_t n) noexcept {
  if (d == DType::bf16)
    for (std::size_t i = 0; i < n; ++i) v[i] = from_bf16(to_bf16(v[i]));
  else if (d == DType::fp16)
    for (std::size_t i = 0; i < n; ++i) v[i] = from_fp16(to_fp16(v[i]));
}

}  // namespace shmps::shm
