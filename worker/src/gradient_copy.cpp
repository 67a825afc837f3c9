// How a push copies and checks a gradient (gradient_copy.hpp): hand-written vector loops.
#include "gradient_copy.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__SSE__)
#include <immintrin.h>
#endif

#include <shmps/shm/dtype.hpp>

namespace shmps::worker_detail {

namespace {

// Copies `n` gradient values into ring memory (unless kStore is Store::none), and in the same
// pass checks that they are all finite and sums their squares (for clipping by norm on the
// server). Returns the index of the first non-finite value, or n.
//
// Why vectors by hand: a single running float sum is a chain of dependent adds, which held a
// push to a fifth of memcpy's speed; the compiler may not reorder float adds on its own. Two
// 16-float accumulators (GCC vector extensions: native registers on AVX-512, split on smaller
// ones) keep the copy at memory speed. The order of the adds is fixed by the code, so the sum is
// the same on every run.
//
// Why streaming stores for big records: a normal store first reads the destination line into
// the cache (read for ownership), so a copy moves three bytes per byte; a streaming store writes
// the line whole. For a record bigger than kStreamingBytes, which cannot stay in a core's cache
// until the server reads it anyway, that measured 17 GB/s against 6-10 GB/s for cached stores
// and for glibc's memcpy on the 64 MiB push of shmps-bench. Small records keep cached stores:
// the server reads them from the cache moments later (latency).
using Floats16 = float __attribute__((vector_size(64)));
enum class Store { none, cached, streaming };
constexpr std::size_t kStreamingBytes = std::size_t{1} << 20;

inline Floats16 load16(const float* p) noexcept {
  Floats16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <Store kStore>
inline void store16(float* dst, const Floats16& v) noexcept {
  if constexpr (kStore == Store::cached) {
    std::memcpy(dst, &v, sizeof v);
  } else if constexpr (kStore == Store::streaming) {  // dst is 64-byte aligned (ring records are)
#if defined(__AVX512F__)
    _mm512_stream_ps(dst, reinterpret_cast<const __m512&>(v));
#elif defined(__AVX__)
    _mm256_stream_ps(dst, reinterpret_cast<const __m256*>(&v)[0]);
    _mm256_stream_ps(dst + 8, reinterpret_cast<const __m256*>(&v)[1]);
#elif defined(__SSE__)
    for (int q = 0; q < 4; ++q) _mm_stream_ps(dst + 4 * q, reinterpret_cast<const __m128*>(&v)[q]);
#else
    std::memcpy(dst, &v, sizeof v);
#endif
  }
}

// kFence = false: the caller fences once after many calls (a fence per call of a few KiB would
// wait for the write-combining buffers every time).
template <Store kStore, bool kFence = true>
std::size_t scan_gradient(float* __restrict dst, const float* __restrict src, std::size_t n, double& sum_sq) {
  constexpr std::size_t kBlock = 1024;  // floats per block: the sums go into a double per block
  double total = 0.0;
  for (std::size_t b = 0; b < n; b += kBlock) {
    const std::size_t e = std::min(n, b + kBlock);
    Floats16 sq0{}, sq1{}, probe0{}, probe1{};  // x * 0 is NaN exactly when x is NaN or Inf
    std::size_t i = b;
    for (; i + 32 <= e; i += 32) {
      const Floats16 x0 = load16(src + i), x1 = load16(src + i + 16);
      store16<kStore>(dst + i, x0);
      store16<kStore>(dst + i + 16, x1);
      sq0 += x0 * x0;
      sq1 += x1 * x1;
      probe0 += x0 * 0.0f;
      probe1 += x1 * 0.0f;
    }
    float block_sq = 0.0f, probe = 0.0f;
    for (; i < e; ++i) {
      const float x = src[i];
      if constexpr (kStore != Store::none) dst[i] = x;
      block_sq += x * x;
      probe += x * 0.0f;
    }
    const Floats16 sq = sq0 + sq1, pr = probe0 + probe1;
    for (int l = 0; l < 16; ++l) {
      block_sq += sq[l];
      probe += pr[l];
    }
    if (probe != 0.0f) {  // true for NaN too
      for (std::size_t k = b; k < e; ++k)
        if (!std::isfinite(src[k])) return k;
    }
    total += static_cast<double>(block_sq);
  }
#if defined(__SSE__)
  if constexpr (kStore == Store::streaming && kFence) _mm_sfence();  // streaming stores are weakly ordered
#endif
  sum_sq = total;
  return n;
}

}  // namespace

std::size_t check_gradient(const float* src, std::size_t n, double& sum_sq) {
  return scan_gradient<Store::none>(nullptr, src, n, sum_sq);
}

std::size_t copy_gradient(float* dst, const float* src, std::size_t n, double& sum_sq) {
  if (n * sizeof(float) >= kStreamingBytes) return scan_gradient<Store::streaming>(dst, src, n, sum_sq);
  return scan_gradient<Store::cached>(dst, src, n, sum_sq);
}

std::size_t widen_gradient(shm::DType dtype, float* dst, const std::uint16_t* src, std::size_t n, double& sum_sq) {
  // A block at a time through a buffer in L1: widened there, then checked and stored as
  // copy_gradient stores (streaming for a big record), so the ring sees one pass of writes.
  constexpr std::size_t kBlock = 4096;  // a multiple of scan_gradient's block (its float sums line up)
  alignas(64) float block[kBlock];
  const bool streaming = n * sizeof(float) >= kStreamingBytes;
  double total = 0.0;
  for (std::size_t b = 0; b < n; b += kBlock) {
    const std::size_t m = std::min(kBlock, n - b);
    shm::widen(dtype, src + b, block, m);
    double block_sq = 0.0;
    const std::size_t bad = streaming ? scan_gradient<Store::streaming, false>(dst + b, block, m, block_sq)
                                      : scan_gradient<Store::cached>(dst + b, block, m, block_sq);
    if (bad != m) return b + bad;  // (nothing will be published: no fence needed)
    total += block_sq;
  }
#if defined(__SSE__)
  if (streaming) _mm_sfence();  // streaming stores are weakly ordered: before the commit publishes them
#endif
  sum_sq = total;
  return n;
}

}  // namespace shmps::worker_detail
