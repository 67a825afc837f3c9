// The server-side optimizers (see optimizer.hpp for the formulas).
//
// Layout of the work: plain SGD is one Eigen expression over the whole slice (a single
// streaming pass, as tight as a hand-written `p -= lr * g` loop). Everything else walks the
// slice in chunks of kChunk floats: per chunk the gradient is preprocessed into a small
// L1-resident buffer (scale, clip, weight decay) when needed, then the optimizer's statements
// run on the chunk while it is in L1, so values, gradient and state are each read from and
// written to memory once. Every path exists in an aligned (Aligned64 maps, taken when all
// pointers are 64-byte aligned, as the segment's slices are) and an unaligned flavour.
//
// Square roots go through ExactSqrt (the hardware's correctly rounded sqrt on every packet
// size): Eigen 3.4's AVX-512 psqrt under its default EIGEN_FAST_MATH is an rsqrt14 + Newton
// approximation that flushes denormals, which would make an element's result depend on whether
// it falls in a vector body or a scalar tail.

// GCC 12.2's AVX-512 intrinsics trip -Wmaybe-uninitialized on _mm512_undefined_ps (GCC bug
// 105593, fixed in 12.3); the warning points into <avx512fintrin.h>, so it must be silenced
// before anything includes <immintrin.h>.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same false positive at -O2 with sanitizers
#endif

#include "shmps/server/optimizer.hpp"

#include <immintrin.h>

#include <shmps/shm/bf16.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace shmps::server {
namespace {

using Eigen::ArrayXf;
using Eigen::Index;
template <int A>
using Vec = Eigen::Map<ArrayXf, A>;
template <int A>
using CVec = Eigen::Map<const ArrayXf, A>;

constexpr int kAligned = Eigen::Aligned64;
constexpr int kUnaligned = Eigen::Unaligned;
constexpr Index kChunk = 1024;  // floats: 4 KiB per array, 16 KiB for adam's four

// sqrt, correctly rounded, vectorised on every packet type Eigen may use here. Only the packet
// type Eigen picks for this CPU is called: [[maybe_unused]] for clang's -Wunused-function.
inline float exact_sqrt(float x) { return std::sqrt(x); }
#if defined(__SSE__)
[[maybe_unused]] inline __m128 exact_sqrt(__m128 x) { return _mm_sqrt_ps(x); }
#endif
#if defined(__AVX__)
[[maybe_unused]] inline __m256 exact_sqrt(__m256 x) { return _mm256_sqrt_ps(x); }
#endif
#if defined(__AVX512F__)
[[maybe_unused]] inline __m512 exact_sqrt(__m512 x) { return _mm512_sqrt_ps(x); }
#endif

struct ExactSqrt {
  float operator()(float x) const { return exact_sqrt(x); }
  template <typename Packet>
  Packet packetOp(const Packet& x) const {
    return exact_sqrt(x);
  }
};

}  // namespace
}  // namespace shmps::server

template <>
struct Eigen::internal::functor_traits<shmps::server::ExactSqrt> {
#if defined(__SSE__)
  enum {Cost = 4 * Eigen::NumTraits<float>::MulCost, PacketAccess = 1};
#else
  enum { Cost = 4 * Eigen::NumTraits<float>::MulCost, PacketAccess = 0 };
#endif
};

namespace shmps::server {
namespace {

template <class Expr>
auto sqrt_of(const Expr& e) {
  return e.unaryExpr(ExactSqrt{});
}

// Scalars of one update, computed once per call.
struct Coeffs {
  float lr = 0;
  float mu = 0;  // momentum
  float rho = 0, one_minus_rho = 0;
  float b1 = 0, one_minus_b1 = 0, b2 = 0, one_minus_b2 = 0;
  float step_size = 0;     // adam: lr / (1 - b1^t)
  float inv_bc2_sqrt = 0;  // adam: 1 / sqrt(1 - b2^t)
  float eps = 0;
  // gradient preprocessing
  float scale = 1, clip = 0, wd = 0;
  bool scale_on = false, clip_on = false, wd_on = false;
  bool pre() const { return scale_on || clip_on || wd_on; }
};

// g = clamp(grad * scale, -clip, clip) + wd * p, into buf (each step only when on).
template <int A>
void preprocess(const Coeffs& c, float* buf, const float* grad, const float* p, Index n) {
  Vec<kAligned> out(buf, n);
  CVec<A> g(grad, n);
  if (c.scale_on) {
    out = g * c.scale;
  } else {
    out = g;
  }
  if (c.clip_on) out = out.max(-c.clip).min(c.clip);
  if (c.wd_on) out += c.wd * CVec<A>(p, n);
}

// The arrays of one update: new values and state are written to p, s0, s1, computed from the
// old ones in p_old, s0_old, s1_old (the same pointers for an update in place). Element-wise
// statements only, so writing over the inputs is safe.
struct Arrays {
  float* p;
  const float* p_old;
  float* s0;
  const float* s0_old;
  float* s1;
  const float* s1_old;
  Arrays at(Index i) const {
    auto plus = [i](auto* q) { return q != nullptr ? q + i : q; };
    return {plus(p), plus(p_old), plus(s0), plus(s0_old), plus(s1), plus(s1_old)};
  }
};

// The optimizer's statements on one chunk; g is the (preprocessed) gradient of the chunk.
// GA is the alignment of g (the buffer is always aligned; the raw gradient follows A).
template <OptimizerKind K, int A, int GA>
void update_chunk(const Coeffs& c, const Arrays& x, const float* gp, Index n) {
  Vec<A> p(x.p, n);
  CVec<A> p_old(x.p_old, n);
  CVec<GA> g(gp, n);
  if constexpr (K == OptimizerKind::sgd) {
    p = p_old - c.lr * g;
  } else if constexpr (K == OptimizerKind::momentum) {
    Vec<A> v(x.s0, n);
    v = c.mu * CVec<A>(x.s0_old, n) + g;
    p = p_old - c.lr * v;
  } else if constexpr (K == OptimizerKind::nesterov) {
    Vec<A> v(x.s0, n);
    v = c.mu * CVec<A>(x.s0_old, n) + g;
    p = p_old - c.lr * (g + c.mu * v);
  } else if constexpr (K == OptimizerKind::adagrad) {
    Vec<A> s(x.s0, n);
    s = CVec<A>(x.s0_old, n) + g.square();
    p = p_old - c.lr * g / (sqrt_of(s) + c.eps);
  } else if constexpr (K == OptimizerKind::rmsprop) {
    Vec<A> s(x.s0, n);
    s = c.rho * CVec<A>(x.s0_old, n) + c.one_minus_rho * g.square();
    p = p_old - c.lr * g / (sqrt_of(s) + c.eps);
  } else if constexpr (K == OptimizerKind::adam) {
    Vec<A> m(x.s0, n);
    Vec<A> v(x.s1, n);
    m = c.b1 * CVec<A>(x.s0_old, n) + c.one_minus_b1 * g;
    v = c.b2 * CVec<A>(x.s1_old, n) + c.one_minus_b2 * g.square();
    // lr * m_hat / (sqrt(v_hat) + eps) with m_hat = m / bc1, sqrt(v_hat) = sqrt(v) / sqrt(bc2)
    // (the division by sqrt(bc2) is a multiplication by its reciprocal: one divide per element)
    p = p_old - c.step_size * m / (sqrt_of(v) * c.inv_bc2_sqrt + c.eps);
  }
}

template <OptimizerKind K, int A>
void run(const Coeffs& c, const Arrays& x, const float* g, Index n) {
  if constexpr (K == OptimizerKind::sgd) {
    // The hot path: one streaming pass, no buffer.
    if (!c.pre()) {
      Vec<A>(x.p, n) = CVec<A>(x.p_old, n) - c.lr * CVec<A>(g, n);
      return;
    }
    if (!c.clip_on && !c.wd_on) {
      Vec<A>(x.p, n) = CVec<A>(x.p_old, n) - c.lr * (CVec<A>(g, n) * c.scale);
      return;
    }
  }
  alignas(64) float buf[kChunk];
  for (Index i = 0; i < n; i += kChunk) {
    const Index m = std::min(kChunk, n - i);
    if (c.pre()) {
      preprocess<A>(c, buf, g + i, x.p_old + i, m);
      update_chunk<K, A, kAligned>(c, x.at(i), buf, m);
    } else {
      update_chunk<K, A, A>(c, x.at(i), g + i, m);
    }
  }
}

// bf16 state (StateDType::bf16): per chunk the state is widened into an L1 buffer, the float32
// statements above run on it in place, and the new state is rounded back into bf16 (Adam has a
// fused loop of its own, below). The values and the gradient stay float32, and the new values
// are computed from the unrounded new state, as the float32 path computes them.
struct Bf16Arrays {
  float* p;
  const float* p_old;
  std::uint16_t* s0;
  const std::uint16_t* s0_old;
  std::uint16_t* s1;
  const std::uint16_t* s1_old;
};

// Adam with bf16 state, fused: one pass per chunk that widens m and v, updates them and the
// values, and rounds m and v back (plain C++, which GCC vectorises: optimizer.cpp is built with
// -fno-math-errno so that std::sqrt becomes the packed, correctly rounded sqrt). Written out
// twice, out of place (every array distinct: __restrict) and in place (one pointer per array),
// so that neither needs a run-time overlap check that an update in place would fail.
inline void adam_bf16_out_of_place(const Coeffs& c, float* __restrict p, const float* __restrict p_old,
                                   const float* __restrict g, std::uint16_t* __restrict m_out,
                                   const std::uint16_t* __restrict m_old, std::uint16_t* __restrict v_out,
                                   const std::uint16_t* __restrict v_old, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float m = c.b1 * shm::from_bf16(m_old[i]) + c.one_minus_b1 * gi;
    const float v = c.b2 * shm::from_bf16(v_old[i]) + c.one_minus_b2 * (gi * gi);
    p[i] = p_old[i] - c.step_size * m / (std::sqrt(v) * c.inv_bc2_sqrt + c.eps);
    m_out[i] = shm::to_bf16(m);
    v_out[i] = shm::to_bf16(v);
  }
}
inline void adam_bf16_in_place(const Coeffs& c, float* __restrict p, const float* __restrict g,
                               std::uint16_t* __restrict ms, std::uint16_t* __restrict vs, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float m = c.b1 * shm::from_bf16(ms[i]) + c.one_minus_b1 * gi;
    const float v = c.b2 * shm::from_bf16(vs[i]) + c.one_minus_b2 * (gi * gi);
    p[i] = p[i] - c.step_size * m / (std::sqrt(v) * c.inv_bc2_sqrt + c.eps);
    ms[i] = shm::to_bf16(m);
    vs[i] = shm::to_bf16(v);
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SHMPS_BF16_INSTRUCTIONS 1
// Where the build's -march has AVX-512 BF16 (SHMPS_NATIVE on such a CPU), Adam's bf16 loop uses
// its rounding instruction, vcvtneps2bf16: the portable rounding costs about a third of the
// loop. The instruction flushes subnormal inputs to zero, so a vector that holds one has those
// lanes rounded as shm::to_bf16 does: the bytes are the portable loop's, whichever runs
// (Bf16Optimizer.InstructionsAndPortableLoopAgree). Every element, the tail too, goes through
// the same masked vector code, so no element's result depends on where it falls.
bool g_bf16_instructions = true;

// Full vectors load and store unmasked (masked stores are slow on some CPUs, AMD's Zen 4 among
// them); the tail takes the same arithmetic with masks.
template <bool Full>
inline __m512 load16(const float* in, __mmask16 k) {
  if constexpr (Full) return _mm512_loadu_ps(in);
  return _mm512_maskz_loadu_ps(k, in);
}

template <bool Full>
inline __m512 widen16(const std::uint16_t* in, __mmask16 k) {
  __m256i b;
  if constexpr (Full)
    b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in));
  else
    b = _mm256_maskz_loadu_epi16(k, in);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

template <bool Full>
inline void narrow16(std::uint16_t* out, __m512 x, __mmask16 k) {
  const __m512i u = _mm512_castps_si512(x);
  const __mmask16 zero_exponent = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000));
  const __mmask16 subnormal = _mm512_mask_test_epi32_mask(zero_exponent, u, _mm512_set1_epi32(0x007fffff));
  __m256i b = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
  if (subnormal != 0) [[unlikely]] {
    // shm::to_bf16's rounding for those lanes, in vector form (a subnormal is never a NaN):
    // (u + 0x7fff + ((u >> 16) & 1)) >> 16. Inline, so that the loop calls nothing.
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
    b = _mm256_mask_blend_epi16(subnormal, b, _mm512_cvtepi32_epi16(r));
  }
  if constexpr (Full)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), b);
  else
    _mm256_mask_storeu_epi16(out, k, b);
}

struct AdamVectors {
  __m512 b1, one_minus_b1, b2, one_minus_b2, step_size, inv_bc2_sqrt, eps;
};

// 16 elements (or the k of them), in place or out of place (each is loaded before it is stored).
template <bool Full>
inline void adam16(const AdamVectors& c, float* p, const float* p_old, const float* g, std::uint16_t* m_out,
                   const std::uint16_t* m_old, std::uint16_t* v_out, const std::uint16_t* v_old, __mmask16 k) {
  const __m512 gi = load16<Full>(g, k);
  const __m512 m = _mm512_add_ps(_mm512_mul_ps(c.b1, widen16<Full>(m_old, k)), _mm512_mul_ps(c.one_minus_b1, gi));
  const __m512 v =
      _mm512_add_ps(_mm512_mul_ps(c.b2, widen16<Full>(v_old, k)), _mm512_mul_ps(c.one_minus_b2, _mm512_mul_ps(gi, gi)));
  const __m512 den = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(v), c.inv_bc2_sqrt), c.eps);
  const __m512 p_new = _mm512_sub_ps(load16<Full>(p_old, k), _mm512_div_ps(_mm512_mul_ps(c.step_size, m), den));
  if constexpr (Full)
    _mm512_storeu_ps(p, p_new);
  else
    _mm512_mask_storeu_ps(p, k, p_new);
  narrow16<Full>(m_out, m, k);
  narrow16<Full>(v_out, v, k);
}

inline void adam_bf16_instructions(const Coeffs& c, float* p, const float* p_old, const float* g, std::uint16_t* m_out,
                                   const std::uint16_t* m_old, std::uint16_t* v_out, const std::uint16_t* v_old,
                                   std::size_t n) {
  const AdamVectors cv{_mm512_set1_ps(c.b1),        _mm512_set1_ps(c.one_minus_b1), _mm512_set1_ps(c.b2),
                       _mm512_set1_ps(c.one_minus_b2), _mm512_set1_ps(c.step_size), _mm512_set1_ps(c.inv_bc2_sqrt),
                       _mm512_set1_ps(c.eps)};
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16)
    adam16<true>(cv, p + i, p_old + i, g + i, m_out + i, m_old + i, v_out + i, v_old + i, 0xffff);
  if (i < n) {
    const auto k = static_cast<__mmask16>((1U << (n - i)) - 1);
    adam16<false>(cv, p + i, p_old + i, g + i, m_out + i, m_old + i, v_out + i, v_old + i, k);
  }
}
#endif

template <OptimizerKind K, int A>
void run_bf16(const Coeffs& c, const Bf16Arrays& x, const float* g, Index n) {
  alignas(64) float buf[kChunk];
  if constexpr (K == OptimizerKind::adam) {
    const bool in_place = x.p == x.p_old;
    for (Index i = 0; i < n; i += kChunk) {
      const Index m = std::min(kChunk, n - i);
      const float* gp = g + i;
      if (c.pre()) {
        preprocess<A>(c, buf, g + i, x.p_old + i, m);
        gp = buf;
      }
      const auto um = static_cast<std::size_t>(m);
#if defined(SHMPS_BF16_INSTRUCTIONS)
      if (g_bf16_instructions) {
        adam_bf16_instructions(c, x.p + i, x.p_old + i, gp, x.s0 + i, x.s0_old + i, x.s1 + i, x.s1_old + i, um);
        continue;
      }
#endif
      if (in_place)
        adam_bf16_in_place(c, x.p + i, gp, x.s0 + i, x.s1 + i, um);
      else
        adam_bf16_out_of_place(c, x.p + i, x.p_old + i, gp, x.s0 + i, x.s0_old + i, x.s1 + i, x.s1_old + i, um);
    }
    return;
  }
  alignas(64) float st0[kChunk];
  for (Index i = 0; i < n; i += kChunk) {
    const Index m = std::min(kChunk, n - i);
    const auto um = static_cast<std::size_t>(m);
    shm::from_bf16(x.s0_old + i, st0, um);
    const Arrays a{x.p + i, x.p_old + i, st0, st0, nullptr, nullptr};
    if (c.pre()) {
      preprocess<A>(c, buf, g + i, x.p_old + i, m);
      update_chunk<K, A, kAligned>(c, a, buf, m);
    } else {
      update_chunk<K, A, A>(c, a, g + i, m);
    }
    shm::to_bf16(st0, x.s0 + i, um);
  }
}

template <int A>
void dispatch_bf16(OptimizerKind kind, const Coeffs& c, const Bf16Arrays& x, const float* g, Index n) {
  switch (kind) {
    case OptimizerKind::sgd:
      return run<OptimizerKind::sgd, A>(c, Arrays{x.p, x.p_old, nullptr, nullptr, nullptr, nullptr}, g, n);
    case OptimizerKind::momentum:
      return run_bf16<OptimizerKind::momentum, A>(c, x, g, n);
    case OptimizerKind::nesterov:
      return run_bf16<OptimizerKind::nesterov, A>(c, x, g, n);
    case OptimizerKind::adagrad:
      return run_bf16<OptimizerKind::adagrad, A>(c, x, g, n);
    case OptimizerKind::rmsprop:
      return run_bf16<OptimizerKind::rmsprop, A>(c, x, g, n);
    case OptimizerKind::adam:
      return run_bf16<OptimizerKind::adam, A>(c, x, g, n);
    case OptimizerKind::rowwise_adagrad:  // a row at a time (apply_rowwise_adagrad); checked_coeffs refuses it
      return;
  }
}

template <int A>
void dispatch(OptimizerKind kind, const Coeffs& c, const Arrays& x, const float* g, Index n) {
  switch (kind) {
    case OptimizerKind::sgd:
      return run<OptimizerKind::sgd, A>(c, x, g, n);
    case OptimizerKind::momentum:
      return run<OptimizerKind::momentum, A>(c, x, g, n);
    case OptimizerKind::nesterov:
      return run<OptimizerKind::nesterov, A>(c, x, g, n);
    case OptimizerKind::adagrad:
      return run<OptimizerKind::adagrad, A>(c, x, g, n);
    case OptimizerKind::rmsprop:
      return run<OptimizerKind::rmsprop, A>(c, x, g, n);
    case OptimizerKind::adam:
      return run<OptimizerKind::adam, A>(c, x, g, n);
    case OptimizerKind::rowwise_adagrad:  // a row at a time (apply_rowwise_adagrad); checked_coeffs refuses it
      return;
  }
}

bool aligned64(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<std::uintptr_t>(ptr) % 64 == 0;
}

}  // namespace

bool use_bf16_instructions(bool on) noexcept {
#if defined(SHMPS_BF16_INSTRUCTIONS)
  g_bf16_instructions = on;
  return true;
#else
  (void)on;
  return false;
#endif
}

double clip_norm_scale(const OptimizerSettings& s, double grad_squared_norm) {
  if (!(s.clip_norm > 0)) return 1.0;
  const double norm = std::sqrt(grad_squared_norm);
  const double limit = static_cast<double>(s.clip_norm);
  if (!(norm > limit)) return 1.0;
  return limit / norm;
}

double squared_norm(std::span<const float> grad) {
  // Float sums of blocks (Eigen's vectorised reduction), added up in double: much cheaper than
  // converting every element to double, and precise enough for a norm.
  constexpr std::size_t kBlock = 1024;
  double total = 0.0;
  for (std::size_t i = 0; i < grad.size(); i += kBlock) {
    const auto n = static_cast<Index>(std::min(kBlock, grad.size() - i));
    total += static_cast<double>(CVec<kUnaligned>(grad.data() + i, n).square().sum());
  }
  return total;
}

void apply_update(const OptimizerSettings& s, std::span<float> values, std::span<const float> grad,
                  std::span<float> state0, std::span<float> state1, std::uint64_t step,
                  float grad_scale) {
  apply_update(s, values, grad, state0, state1, step, grad_scale, UpdateInputs{values, state0, state1});
}

namespace {

// The checks shared by both state types, and the scalars of the update.
Coeffs checked_coeffs(const OptimizerSettings& s, std::size_t n, std::size_t grad_n, std::size_t state0_n,
                      std::size_t state1_n, std::size_t old_values_n, std::size_t old0_n, std::size_t old1_n,
                      std::uint64_t step, float grad_scale) {
  if (s.kind == OptimizerKind::rowwise_adagrad)
    throw std::invalid_argument("apply_update: rowwise_adagrad steps a table row (apply_rowwise_adagrad)");
  if (static_cast<std::uint32_t>(s.kind) > static_cast<std::uint32_t>(OptimizerKind::adam)) {
    throw std::invalid_argument("apply_update: unknown optimizer kind " +
                                std::to_string(static_cast<std::uint32_t>(s.kind)));
  }
  if (grad_n != n) {
    throw std::invalid_argument("apply_update: gradient has " + std::to_string(grad_n) +
                                " elements, values " + std::to_string(n));
  }
  const int arrays = optimizer_state_arrays(s.kind);
  const std::size_t want0 = arrays >= 1 ? n : 0;
  const std::size_t want1 = arrays >= 2 ? n : 0;
  if (state0_n != want0 || state1_n != want1) {
    throw std::invalid_argument(
        "apply_update: optimizer " + std::string(to_string(s.kind)) + " needs state arrays of " +
        std::to_string(want0) + " and " + std::to_string(want1) + " elements, got " +
        std::to_string(state0_n) + " and " + std::to_string(state1_n));
  }
  if (old_values_n != n || old0_n != state0_n || old1_n != state1_n) {
    throw std::invalid_argument("apply_update: the old values and state must have the sizes of the new ones");
  }
  if (s.kind == OptimizerKind::adam && step == 0) {
    throw std::invalid_argument("apply_update: adam needs a 1-based step, got 0");
  }

  Coeffs c;
  c.lr = s.lr;
  c.mu = s.momentum;
  c.rho = s.rho;
  c.one_minus_rho = 1.0f - s.rho;
  c.b1 = s.beta1;
  c.one_minus_b1 = 1.0f - s.beta1;
  c.b2 = s.beta2;
  c.one_minus_b2 = 1.0f - s.beta2;
  c.eps = s.eps;
  if (s.kind == OptimizerKind::adam) {
    const double t = static_cast<double>(step);
    const double bc1 = 1.0 - std::pow(static_cast<double>(s.beta1), t);
    const double bc2 = 1.0 - std::pow(static_cast<double>(s.beta2), t);
    c.step_size = static_cast<float>(static_cast<double>(s.lr) / bc1);
    c.inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(bc2));
  }
  c.scale = grad_scale;
  c.scale_on = grad_scale != 1.0f;
  c.clip = s.clip_value;
  c.clip_on = s.clip_value > 0.0f;
  c.wd = s.weight_decay;
  c.wd_on = s.weight_decay > 0.0f;
  return c;
}

template <class T>
T* ptr_of(std::span<T> span) {
  return span.empty() ? nullptr : span.data();
}

}  // namespace

void apply_update(const OptimizerSettings& s, std::span<float> values, std::span<const float> grad,
                  std::span<float> state0, std::span<float> state1, std::uint64_t step,
                  float grad_scale, const UpdateInputs& old) {
  const std::size_t n = values.size();
  const Coeffs c = checked_coeffs(s, n, grad.size(), state0.size(), state1.size(), old.values.size(),
                                  old.state0.size(), old.state1.size(), step, grad_scale);
  if (n == 0) return;
  const Arrays x{values.data(), old.values.data(), ptr_of(state0), ptr_of(old.state0), ptr_of(state1), ptr_of(old.state1)};
  const float* g = grad.data();
  const auto len = static_cast<Index>(n);
  if (aligned64(x.p) && aligned64(x.p_old) && aligned64(g) && aligned64(x.s0) && aligned64(x.s0_old) &&
      aligned64(x.s1) && aligned64(x.s1_old)) {
    dispatch<kAligned>(s.kind, c, x, g, len);
  } else {
    dispatch<kUnaligned>(s.kind, c, x, g, len);
  }
}

void apply_update_bf16(const OptimizerSettings& s, std::span<float> values, std::span<const float> grad,
                       std::span<std::uint16_t> state0, std::span<std::uint16_t> state1, std::uint64_t step,
                       float grad_scale) {
  apply_update_bf16(s, values, grad, state0, state1, step, grad_scale, UpdateInputsBf16{values, state0, state1});
}

void apply_update_bf16(const OptimizerSettings& s, std::span<float> values, std::span<const float> grad,
                       std::span<std::uint16_t> state0, std::span<std::uint16_t> state1, std::uint64_t step,
                       float grad_scale, const UpdateInputsBf16& old) {
  const std::size_t n = values.size();
  const Coeffs c = checked_coeffs(s, n, grad.size(), state0.size(), state1.size(), old.values.size(),
                                  old.state0.size(), old.state1.size(), step, grad_scale);
  if (n == 0) return;
  const Bf16Arrays x{values.data(), old.values.data(), ptr_of(state0), ptr_of(old.state0), ptr_of(state1), ptr_of(old.state1)};
  // The fused loops assume an update wholly in place or wholly out of place.
  const bool in_place = x.p == x.p_old;
  const auto mixed = [in_place](const void* now, const void* before) {
    return now != nullptr && (now == before) != in_place;
  };
  if (mixed(x.s0, x.s0_old) || mixed(x.s1, x.s1_old)) {
    throw std::invalid_argument(
        "apply_update_bf16: the old values and state must be the new arrays themselves, all of them, or none");
  }
  const float* g = grad.data();
  const auto len = static_cast<Index>(n);
  // The state is widened into aligned buffers: only the float32 arrays' alignment matters.
  if (aligned64(x.p) && aligned64(x.p_old) && aligned64(g)) {
    dispatch_bf16<kAligned>(s.kind, c, x, g, len);
  } else {
    dispatch_bf16<kUnaligned>(s.kind, c, x, g, len);
  }
}

void apply_rowwise_adagrad(const OptimizerSettings& s, std::span<float> row, std::span<const float> grad,
                           double& accumulator) {
  if (s.kind != OptimizerKind::rowwise_adagrad)
    throw std::invalid_argument("apply_rowwise_adagrad: the optimizer is " + std::string(to_string(s.kind)));
  if (grad.size() != row.size())
    throw std::invalid_argument("apply_rowwise_adagrad: gradient has " + std::to_string(grad.size()) +
                                " elements, the row " + std::to_string(row.size()));
  if (row.empty()) return;
  const auto n = static_cast<Index>(row.size());
  Eigen::Map<ArrayXf> p(row.data(), n);
  CVec<kUnaligned> g_in(grad.data(), n);
  // The gradient clamped and weight-decayed (a row is a few dozen floats: a per-thread buffer,
  // only when either is on), then one vectorised sum of squares and one vectorised step.
  const bool shaped = s.clip_value > 0.0f || s.weight_decay > 0.0f;
  thread_local ArrayXf shaped_g;
  if (shaped) {
    shaped_g = s.clip_value > 0.0f ? g_in.max(-s.clip_value).min(s.clip_value).eval() : g_in.eval();
    if (s.weight_decay > 0.0f) shaped_g += s.weight_decay * p;
  }
  const auto step = [&](const auto& g) {
    accumulator += static_cast<double>(g.square().sum()) / static_cast<double>(n);
    const auto factor = static_cast<float>(static_cast<double>(s.lr) / (std::sqrt(accumulator) + static_cast<double>(s.eps)));
    p -= factor * g;
  };
  if (shaped)
    step(shaped_g);
  else
    step(g_in);
}

}  // namespace shmps::server
