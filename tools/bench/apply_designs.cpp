// apply.design: what each way of making the apply crash safe costs on this machine, before any of
// the server's code runs. Four loops over the model's floats on private memory, one thread, timed
// in turns (each rep runs all four), each reported as the in-place loop's median time over its own:
//   in place         p -= lr * g                        the plain loop, not crash safe
//   out of place     q = p - lr * g                     two buffers per slice (copy-on-write): the
//                                                      new values go to the other buffer
//   out of place, streaming stores                      the same with non-temporal stores, which
//                                                      skip reading q's lines before writing them
//   chunk and copy   1024 floats into an L1 buffer,     what the server's chunked redo does
//                    then copied into p                 (apply_chunks.hpp)
// A ratio near 1 means that design could run the apply at the plain loop's speed here.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "workloads.hpp"

namespace shmps::bench {
namespace {

constexpr float kLr = 1e-6f;
constexpr std::size_t kChunk = 1024;  // as the server's kApplyChunkFloats

void in_place(float* __restrict p, const float* __restrict g, std::size_t n) {
  for (std::size_t k = 0; k < n; ++k) p[k] -= kLr * g[k];
}

void out_of_place(const float* __restrict p, const float* __restrict g, float* __restrict q, std::size_t n) {
  for (std::size_t k = 0; k < n; ++k) q[k] = p[k] - kLr * g[k];
}

// Non-temporal stores where the compiler targets x86 (SSE is part of x86-64); false elsewhere
// (the figure is then left out).
bool out_of_place_streaming(const float* __restrict p, const float* __restrict g, float* __restrict q, std::size_t n) {
#if defined(__AVX512F__)
  const __m512 lr = _mm512_set1_ps(kLr);
  for (std::size_t k = 0; k + 16 <= n; k += 16)
    _mm512_stream_ps(q + k, _mm512_sub_ps(_mm512_load_ps(p + k), _mm512_mul_ps(lr, _mm512_load_ps(g + k))));
#elif defined(__AVX__)
  const __m256 lr = _mm256_set1_ps(kLr);
  for (std::size_t k = 0; k + 8 <= n; k += 8)
    _mm256_stream_ps(q + k, _mm256_sub_ps(_mm256_load_ps(p + k), _mm256_mul_ps(lr, _mm256_load_ps(g + k))));
#elif defined(__SSE__)
  const __m128 lr = _mm_set1_ps(kLr);
  for (std::size_t k = 0; k + 4 <= n; k += 4)
    _mm_stream_ps(q + k, _mm_sub_ps(_mm_load_ps(p + k), _mm_mul_ps(lr, _mm_load_ps(g + k))));
#else
  (void)p, (void)g, (void)q, (void)n;
  return false;
#endif
#if defined(__SSE__)
  _mm_sfence();
  return true;
#endif
}

void chunk_and_copy(float* __restrict p, const float* __restrict g, float* __restrict buffer, std::size_t n) {
  for (std::size_t lo = 0; lo < n; lo += kChunk) {
    const std::size_t m = std::min(kChunk, n - lo);
    for (std::size_t k = 0; k < m; ++k) buffer[k] = p[lo + k] - kLr * g[lo + k];
    std::atomic_signal_fence(std::memory_order_seq_cst);  // the buffer is whole before the copy, as in the server
    std::memcpy(p + lo, buffer, m * sizeof(float));
  }
}

}  // namespace

void run_apply_designs(const Config& cfg, Report& r) {
  const std::size_t n = cfg.floats() / 64 * 64;  // whole vectors, 64-byte aligned arrays
  Floats p(n, 1.0f), g(n, 0.5f), q(n, 0.0f), buffer(kChunk, 0.0f);
  std::vector<double> t_in, t_out, t_stream, t_chunk;
  bool streaming = true;
  for (int rep = -1; rep < cfg.reps; ++rep) {  // rep -1 warms up
    const double t0 = now_s();
    in_place(p.data(), g.data(), n);
    const double t1 = now_s();
    out_of_place(p.data(), g.data(), q.data(), n);
    const double t2 = now_s();
    streaming = out_of_place_streaming(p.data(), g.data(), q.data(), n);
    const double t3 = now_s();
    chunk_and_copy(p.data(), g.data(), buffer.data(), n);
    const double t4 = now_s();
    if (rep < 0) continue;
    t_in.push_back(t1 - t0);
    t_out.push_back(t2 - t1);
    t_stream.push_back(t3 - t2);
    t_chunk.push_back(t4 - t3);
  }
  keep(p.data()[n / 2] + q.data()[n / 3]);
  const double in = median(t_in);
  r.add("apply.design.out_of_place.ratio", in / median(t_out), "x",
        "q = p - lr*g (two buffers) / the in-place loop, timed in turns, one thread");
  if (streaming)
    r.add("apply.design.out_of_place_streaming.ratio", in / median(t_stream), "x",
          "the same with non-temporal stores / the in-place loop");
  r.add("apply.design.chunk_copy.ratio", in / median(t_chunk), "x",
        "1024 floats into an L1 buffer, then copied in (the server's chunked redo) / the in-place loop");
}

}  // namespace shmps::bench
