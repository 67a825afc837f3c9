// The server-side optimizers against numbers worked out by hand, and against an independent
// scalar double-precision transcription of the formulas (written here from the definitions,
// not from the code under test).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "shmps/server/optimizer.hpp"

namespace {

using shmps::OptimizerKind;
using shmps::OptimizerSettings;
using shmps::server::apply_update;
using shmps::server::clip_norm_scale;
using shmps::server::squared_norm;
using shmps::server::validate_optimizer_settings;

// A 64-byte aligned float buffer, with an optional offset in floats to make it unaligned.
class Buffer {
 public:
  explicit Buffer(std::size_t n, std::size_t offset = 0)
      : raw_(static_cast<float*>(
            std::aligned_alloc(64, round_up((n + offset + 16) * sizeof(float))))),
        data_(raw_.get() + offset),
        n_(n) {
    for (std::size_t i = 0; i < n; ++i) data_[i] = 0.0f;
  }
  std::span<float> span() { return {data_, n_}; }
  float& operator[](std::size_t i) { return data_[i]; }
  float* data() { return data_; }

 private:
  static std::size_t round_up(std::size_t bytes) { return (bytes + 63) / 64 * 64; }
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> raw_;
  float* data_;
  std::size_t n_;
};

OptimizerSettings settings(OptimizerKind kind, float lr) {
  OptimizerSettings s;
  s.kind = kind;
  s.lr = lr;
  return s;
}

// One step on a one-element parameter; state kept by the caller.
struct Scalar {
  OptimizerSettings s;
  float p = 0, s0 = 0, s1 = 0;
  std::uint64_t step = 0;
  float update(float g, float scale = 1.0f) {
    ++step;
    const int arrays = shmps::optimizer_state_arrays(s.kind);
    apply_update(s, {&p, 1}, std::span<const float>(&g, 1),
                 arrays >= 1 ? std::span<float>(&s0, 1) : std::span<float>(),
                 arrays >= 2 ? std::span<float>(&s1, 1) : std::span<float>(), step, scale);
    return p;
  }
};

// ---- Hand-computed values --------------------------------------------------------------------

TEST(Optimizer, SgdByHand) {
  // p -= lr * g with lr = 0.5; all numbers are binary fractions, so the results are exact.
  auto s = settings(OptimizerKind::sgd, 0.5f);
  float p[4] = {1.0f, -2.0f, 3.5f, 0.0f};
  const float g1[4] = {1.0f, 2.0f, -3.0f, 0.25f};
  const float g2[4] = {-4.0f, 0.5f, 1.0f, 0.25f};
  apply_update(s, p, g1, {}, {}, 1, 1.0f);
  EXPECT_EQ(p[0], 0.5f);     // 1 - 0.5*1
  EXPECT_EQ(p[1], -3.0f);    // -2 - 0.5*2
  EXPECT_EQ(p[2], 5.0f);     // 3.5 + 0.5*3
  EXPECT_EQ(p[3], -0.125f);  // 0 - 0.5*0.25
  apply_update(s, p, g2, {}, {}, 2, 1.0f);
  EXPECT_EQ(p[0], 2.5f);    // 0.5 + 0.5*4
  EXPECT_EQ(p[1], -3.25f);  // -3 - 0.5*0.5
  EXPECT_EQ(p[2], 4.5f);    // 5 - 0.5*1
  EXPECT_EQ(p[3], -0.25f);  // -0.125 - 0.125
}

TEST(Optimizer, MomentumByHand) {
  // v = mu*v + g; p -= lr*v with lr = 0.5, mu = 0.5, p0 = 1, g = 2, 4, -1.
  Scalar o{settings(OptimizerKind::momentum, 0.5f)};
  o.s.momentum = 0.5f;
  o.p = 1.0f;
  EXPECT_EQ(o.update(2.0f), 0.0f);  // v = 2;             p = 1 - 1
  EXPECT_EQ(o.s0, 2.0f);
  EXPECT_EQ(o.update(4.0f), -2.5f);  // v = 1 + 4 = 5;     p = 0 - 2.5
  EXPECT_EQ(o.s0, 5.0f);
  EXPECT_EQ(o.update(-1.0f), -3.25f);  // v = 2.5 - 1 = 1.5; p = -2.5 - 0.75
  EXPECT_EQ(o.s0, 1.5f);
}

TEST(Optimizer, NesterovByHand) {
  // v = mu*v + g; p -= lr*(g + mu*v) with lr = 0.5, mu = 0.5, p0 = 1, g = 2, 4, -1.
  Scalar o{settings(OptimizerKind::nesterov, 0.5f)};
  o.s.momentum = 0.5f;
  o.p = 1.0f;
  EXPECT_EQ(o.update(2.0f), -0.5f);     // v = 2;   p = 1 - 0.5*(2 + 1)
  EXPECT_EQ(o.update(4.0f), -3.75f);    // v = 5;   p = -0.5 - 0.5*(4 + 2.5)
  EXPECT_EQ(o.update(-1.0f), -3.625f);  // v = 1.5; p = -3.75 - 0.5*(-1 + 0.75)
  EXPECT_EQ(o.s0, 1.5f);
}

TEST(Optimizer, AdagradByHand) {
  // s += g^2; p -= lr*g/(sqrt(s) + eps) with lr = 0.1, eps = 1e-8, p0 = 1, g = 3, 4.
  Scalar o{settings(OptimizerKind::adagrad, 0.1f)};
  o.s.eps = 1e-8f;
  o.p = 1.0f;
  EXPECT_NEAR(o.update(3.0f), 0.9, 1e-6);  // s = 9;  p = 1 - 0.1*3/3
  EXPECT_EQ(o.s0, 9.0f);
  EXPECT_NEAR(o.update(4.0f), 0.82, 1e-6);  // s = 25; p = 0.9 - 0.1*4/5
  EXPECT_EQ(o.s0, 25.0f);
  EXPECT_NEAR(o.update(0.0f), 0.82, 1e-6);  // a zero gradient moves nothing
}

TEST(Optimizer, RmspropByHand) {
  // s = rho*s + (1-rho)*g^2; p -= lr*g/(sqrt(s) + eps), lr = 0.01, rho = 0.75, p0 = 1, g = 2, 4.
  Scalar o{settings(OptimizerKind::rmsprop, 0.01f)};
  o.s.rho = 0.75f;
  o.s.eps = 1e-8f;
  o.p = 1.0f;
  EXPECT_NEAR(o.update(2.0f), 0.98, 1e-6);  // s = 0.25*4 = 1; p = 1 - 0.01*2/1
  EXPECT_EQ(o.s0, 1.0f);
  // s = 0.75*1 + 0.25*16 = 4.75; p = 0.98 - 0.01*4/sqrt(4.75) = 0.98 - 0.0183533...
  const double p2 = 0.98 - 0.01 * 4.0 / (std::sqrt(4.75) + 1e-8);
  EXPECT_NEAR(o.update(4.0f), p2, 1e-6);
  EXPECT_NEAR(p2, 0.9616467, 1e-7);
  EXPECT_EQ(o.s0, 4.75f);
}

TEST(Optimizer, AdamBiasCorrectionStep1And2) {
  // Binary-exact settings: b1 = 0.5, b2 = 0.75, lr = 0.125, eps = 1e-8, p0 = 0, g = 1 then -3.
  Scalar o{settings(OptimizerKind::adam, 0.125f)};
  o.s.beta1 = 0.5f;
  o.s.beta2 = 0.75f;
  o.s.eps = 1e-8f;
  // Step 1: m = 0.5*0 + 0.5*1 = 0.5, v = 0.75*0 + 0.25*1 = 0.25;
  // m_hat = 0.5/(1-0.5) = 1, v_hat = 0.25/(1-0.75) = 1; p = 0 - 0.125 * 1/(1 + 1e-8).
  // (Without the bias correction it would be 0.125 * 0.5/0.5 = 0.125 too, so check step 2.)
  EXPECT_NEAR(o.update(1.0f), -0.125, 3e-8);  // within 2 ulp of float32
  EXPECT_EQ(o.s0, 0.5f);
  EXPECT_EQ(o.s1, 0.25f);
  // Step 2: m = 0.25 - 1.5 = -1.25, v = 0.1875 + 0.25*9 = 2.4375;
  // m_hat = -1.25/(1-0.25) = -1.6666667, v_hat = 2.4375/(1-0.5625) = 5.5714286,
  // sqrt(v_hat) = 2.3603874; p = -0.125 - 0.125 * (-1.6666667)/2.3603874 = -0.125 + 0.0882623
  //   = -0.0367377. (Uncorrected: -0.125 + 0.125 * 1.25/sqrt(2.4375) = -0.0249199.)
  EXPECT_NEAR(o.update(-3.0f), -0.0367377, 1e-7);
  EXPECT_EQ(o.s0, -1.25f);
  EXPECT_EQ(o.s1, 2.4375f);
}

TEST(Optimizer, AdamDefaultsStep1And2) {
  // PyTorch's defaults b1 = 0.9, b2 = 0.999, lr = 0.001, eps = 1e-8, p0 = 0, g = 1 then -3.
  // The betas are float32 (0.9f = 0.899999976..., 0.999f = 0.999000013...), hence the
  // relative tolerances of ~1e-5 against the decimal hand computation.
  Scalar o{settings(OptimizerKind::adam, 0.001f)};
  o.s.beta1 = 0.9f;
  o.s.beta2 = 0.999f;
  o.s.eps = 1e-8f;
  // Step 1: m = 0.1, v = 0.001; m_hat = 1, v_hat = 1: p = -0.001 (an uncorrected step would
  // be 0.001 * 0.1/sqrt(0.001) = 0.00316).
  EXPECT_NEAR(o.update(1.0f), -0.001, 1e-10);
  EXPECT_NEAR(o.s0, 0.1, 1e-7);
  EXPECT_NEAR(o.s1, 0.001, 2e-8);
  // Step 2: m = 0.09 - 0.3 = -0.21, v = 0.000999 + 0.009 = 0.009999;
  // m_hat = -0.21/(1-0.81) = -1.1052632, v_hat = 0.009999/(1-0.998001) = 5.0020010,
  // p = -0.001 - 0.001 * (-1.1052632)/(2.2365154 + 1e-8) = -0.001 + 0.00049419 = -0.00050581
  EXPECT_NEAR(o.update(-3.0f), -0.00050581017, 5e-9);
  EXPECT_NEAR(o.s0, -0.21, 1e-7);
  EXPECT_NEAR(o.s1, 0.009999, 2e-7);
}

TEST(Optimizer, AdamStepOneMovesByLrWhateverTheGradient) {
  for (float g : {1e-3f, 0.5f, -7.0f, 123.0f}) {
    Scalar o{settings(OptimizerKind::adam, 0.01f)};
    o.p = 1.0f;
    EXPECT_NEAR(o.update(g), g > 0 ? 0.99 : 1.01, 1e-6) << g;
  }
}

TEST(Optimizer, AdamUsesTheStepItIsGiven) {
  // The state after one step with g = 1 (b1 = 0.5, b2 = 0.75): m = 0.5, v = 0.25. Another g = 1
  // gives m = 0.75, v = 0.4375 whatever the step, but the update depends on the step given.
  auto s = settings(OptimizerKind::adam, 0.125f);
  s.beta1 = 0.5f;
  s.beta2 = 0.75f;
  s.eps = 1e-8f;
  float p1 = 0, m1 = 0.5f, v1 = 0.25f, p2 = 0, m2 = 0.5f, v2 = 0.25f;
  const float g = 1.0f;
  apply_update(s, {&p1, 1}, std::span<const float>(&g, 1), {&m1, 1}, {&v1, 1}, 2, 1.0f);
  apply_update(s, {&p2, 1}, std::span<const float>(&g, 1), {&m2, 1}, {&v2, 1}, 1000, 1.0f);
  EXPECT_EQ(m1, 0.75f);
  EXPECT_EQ(v1, 0.4375f);
  EXPECT_EQ(m2, 0.75f);
  EXPECT_EQ(v2, 0.4375f);
  // step 2: m_hat = 0.75/0.75 = 1, v_hat = 0.4375/0.4375 = 1 -> p = -0.125
  EXPECT_NEAR(p1, -0.125, 3e-8);  // within 2 ulp of float32
  // step 1000: no correction left -> p = -0.125 * 0.75/sqrt(0.4375) = -0.1417367
  EXPECT_NEAR(p2, -0.1417367, 1e-7);
}

TEST(Optimizer, WeightDecayIsL2AddedToTheGradient) {
  // g' = g + wd*p; p -= lr*g' with lr = 0.5, wd = 0.25, p0 = 2, g = 1, 1.
  Scalar o{settings(OptimizerKind::sgd, 0.5f)};
  o.s.weight_decay = 0.25f;
  o.p = 2.0f;
  EXPECT_EQ(o.update(1.0f), 1.25f);     // g' = 1 + 0.5 = 1.5;       p = 2 - 0.75
  EXPECT_EQ(o.update(1.0f), 0.59375f);  // g' = 1 + 0.3125 = 1.3125; p = 1.25 - 0.65625
  // With momentum the decayed gradient goes into the buffer: lr = 0.5, mu = 0.5, wd = 0.25.
  Scalar m{settings(OptimizerKind::momentum, 0.5f)};
  m.s.momentum = 0.5f;
  m.s.weight_decay = 0.25f;
  m.p = 2.0f;
  EXPECT_EQ(m.update(1.0f), 1.25f);  // v = 1.5; p = 2 - 0.75
  EXPECT_EQ(m.s0, 1.5f);
  // g' = 1 + 0.3125 = 1.3125; v = 0.75 + 1.3125 = 2.0625; p = 1.25 - 1.03125
  EXPECT_EQ(m.update(1.0f), 0.21875f);
  EXPECT_EQ(m.s0, 2.0625f);
}

TEST(Optimizer, ClipByValue) {
  auto s = settings(OptimizerKind::sgd, 1.0f);
  s.clip_value = 1.0f;
  float p[5] = {0, 0, 0, 0, 0};
  const float g[5] = {-5.0f, -0.5f, 0.5f, 5.0f, 1.0f};
  apply_update(s, p, g, {}, {}, 1, 1.0f);
  EXPECT_EQ(p[0], 1.0f);
  EXPECT_EQ(p[1], 0.5f);
  EXPECT_EQ(p[2], -0.5f);
  EXPECT_EQ(p[3], -1.0f);
  EXPECT_EQ(p[4], -1.0f);
}

TEST(Optimizer, OrderIsScaleThenClipThenDecay) {
  // lr = 1, scale 0.5, clip 1, wd 0.5, p0 = 4, g = 10:
  // g*0.5 = 5 -> clipped to 1 -> + 0.5*4 = 3 -> p = 4 - 3 = 1 (the decay term is not clipped).
  auto s = settings(OptimizerKind::sgd, 1.0f);
  s.clip_value = 1.0f;
  s.weight_decay = 0.5f;
  float p = 4.0f;
  const float g = 10.0f;
  apply_update(s, {&p, 1}, std::span<const float>(&g, 1), {}, {}, 1, 0.5f);
  EXPECT_EQ(p, 1.0f);
  // Scale before clip: 10 * 0.0625 = 0.625 is inside the clip.
  p = 4.0f;
  s.weight_decay = 0.0f;
  apply_update(s, {&p, 1}, std::span<const float>(&g, 1), {}, {}, 1, 0.0625f);
  EXPECT_EQ(p, 3.375f);
}

TEST(Optimizer, GradScaleAloneOnSgd) {
  auto s = settings(OptimizerKind::sgd, 0.5f);
  float p[3] = {1, 1, 1};
  const float g[3] = {2, -4, 8};
  apply_update(s, p, g, {}, {}, 1, 0.25f);  // p -= 0.5 * (g/4)
  EXPECT_EQ(p[0], 0.75f);
  EXPECT_EQ(p[1], 1.5f);
  EXPECT_EQ(p[2], 0.0f);
}

TEST(Optimizer, ClipNormScale) {
  auto s = settings(OptimizerKind::sgd, 1.0f);
  EXPECT_EQ(clip_norm_scale(s, 1e12), 1.0);  // off
  s.clip_norm = 5.0f;
  EXPECT_EQ(clip_norm_scale(s, 9.0), 1.0);    // norm 3 <= 5
  EXPECT_EQ(clip_norm_scale(s, 25.0), 1.0);   // norm 5 == 5
  EXPECT_EQ(clip_norm_scale(s, 100.0), 0.5);  // norm 10 -> 5/10
  EXPECT_EQ(clip_norm_scale(s, 0.0), 1.0);
  s.clip_norm = 1.0f;
  EXPECT_DOUBLE_EQ(clip_norm_scale(s, 2.0), 1.0 / std::sqrt(2.0));
  const float g[2] = {3.0f, 4.0f};
  EXPECT_EQ(squared_norm(g), 25.0);
  EXPECT_EQ(squared_norm({}), 0.0);
  // Summed in double: 2^24 + 1 is not representable in float.
  std::vector<float> ones(std::size_t{1} << 24 | 1, 1.0f);
  EXPECT_EQ(squared_norm(ones), static_cast<double>((1 << 24) + 1));
}

// ---- Exactness: SGD, lr = 1, small-integer gradients (the project's end-to-end invariant) ----

TEST(Optimizer, SgdLrOneIsExactOnIntegerGradients) {
  const std::size_t n = 16384 + 37;
  for (std::size_t offset : {std::size_t{0}, std::size_t{1}, std::size_t{3}}) {
    Buffer p(n, offset);
    Buffer g(n, (offset * 5) % 16);
    std::vector<std::int64_t> expect(n, 0);
    std::mt19937 rng(42);
    std::uniform_int_distribution<int> dist(-50, 50);
    auto s = settings(OptimizerKind::sgd, 1.0f);
    for (int push = 0; push < 200; ++push) {
      for (std::size_t i = 0; i < n; ++i) {
        const int v = dist(rng);
        g[i] = static_cast<float>(v);
        expect[i] -= v;
      }
      apply_update(s, p.span(), std::span<const float>(g.data(), n), {}, {},
                   static_cast<std::uint64_t>(push + 1), 1.0f);
    }
    for (std::size_t i = 0; i < n; ++i) {
      ASSERT_EQ(p[i], static_cast<float>(expect[i])) << "offset " << offset << " element " << i;
    }
  }
}

TEST(Optimizer, LrOneTimesGradientEqualsGradient) {
  // p - 1.0f*g must equal p - g bit for bit, also where p - g rounds.
  auto s = settings(OptimizerKind::sgd, 1.0f);
  const std::size_t n = 4096;
  Buffer p(n), g(n);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1000.0f, 1000.0f);
  std::vector<float> expect(n);
  for (std::size_t i = 0; i < n; ++i) {
    p[i] = dist(rng);
    g[i] = dist(rng) * 1e-3f;
    volatile float diff = p[i] - g[i];
    expect[i] = diff;
  }
  apply_update(s, p.span(), std::span<const float>(g.data(), n), {}, {}, 1, 1.0f);
  for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(p[i], expect[i]) << i;
}

// ---- Every optimizer against a scalar double transcription, aligned and unaligned -----------

struct Reference {  // the formulas of optimizer.hpp, element by element, in double
  OptimizerSettings s;
  std::vector<double> p, a, b;
  void step(const std::vector<float>& grad, std::uint64_t t, double scale) {
    const double lr = s.lr, mu = s.momentum, rho = s.rho, b1 = s.beta1, b2 = s.beta2, eps = s.eps;
    for (std::size_t i = 0; i < p.size(); ++i) {
      double g = grad[i] * scale;
      if (s.clip_value > 0)
        g = std::fmin(std::fmax(g, -double{s.clip_value}), double{s.clip_value});
      g += double{s.weight_decay} * p[i];
      switch (s.kind) {
        case OptimizerKind::sgd:
          p[i] -= lr * g;
          break;
        case OptimizerKind::momentum:
          a[i] = mu * a[i] + g;
          p[i] -= lr * a[i];
          break;
        case OptimizerKind::nesterov:
          a[i] = mu * a[i] + g;
          p[i] -= lr * (g + mu * a[i]);
          break;
        case OptimizerKind::adagrad:
          a[i] += g * g;
          p[i] -= lr * g / (std::sqrt(a[i]) + eps);
          break;
        case OptimizerKind::rmsprop:
          a[i] = rho * a[i] + (1 - rho) * g * g;
          p[i] -= lr * g / (std::sqrt(a[i]) + eps);
          break;
        case OptimizerKind::adam: {
          a[i] = b1 * a[i] + (1 - b1) * g;
          b[i] = b2 * b[i] + (1 - b2) * g * g;
          const double m_hat = a[i] / (1 - std::pow(b1, static_cast<double>(t)));
          const double v_hat = b[i] / (1 - std::pow(b2, static_cast<double>(t)));
          p[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
          break;
        }
        case OptimizerKind::rowwise_adagrad:  // a row at a time: RowwiseAdagrad tests below
          ADD_FAILURE() << "the element-wise reference has no row-wise AdaGrad";
          break;
      }
    }
  }
};

struct Case {
  OptimizerKind kind;
  float weight_decay, clip_value, scale;
};

class AllOptimizers : public ::testing::TestWithParam<Case> {};

TEST_P(AllOptimizers, MatchDoubleReferenceAlignedAndUnaligned) {
  const Case c = GetParam();
  OptimizerSettings s = settings(c.kind, c.kind == OptimizerKind::adam ? 0.01f : 0.05f);
  s.momentum = 0.9f;
  s.rho = 0.9f;
  s.eps = 1e-6f;
  s.weight_decay = c.weight_decay;
  s.clip_value = c.clip_value;
  for (std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{1024}, std::size_t{2500}}) {
    for (std::size_t offset : {std::size_t{0}, std::size_t{1}}) {
      Buffer p(n, offset), s0(n, offset), s1(n, offset), g(n, offset);
      Reference ref{s, std::vector<double>(n), std::vector<double>(n), std::vector<double>(n)};
      std::mt19937 rng(static_cast<unsigned>(n * 3 + offset));
      std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
      for (std::size_t i = 0; i < n; ++i) {
        p[i] = dist(rng);
        ref.p[i] = p[i];
      }
      const int arrays = shmps::optimizer_state_arrays(c.kind);
      for (std::uint64_t t = 1; t <= 3; ++t) {
        std::vector<float> grad(n);
        for (std::size_t i = 0; i < n; ++i) grad[i] = g[i] = 2.0f * dist(rng);
        apply_update(s, p.span(), std::span<const float>(g.data(), n),
                     arrays >= 1 ? s0.span() : std::span<float>(),
                     arrays >= 2 ? s1.span() : std::span<float>(), t, c.scale);
        ref.step(grad, t, c.scale);
      }
      for (std::size_t i = 0; i < n; ++i) {
        ASSERT_NEAR(p[i], ref.p[i], 2e-6 * (1 + std::fabs(ref.p[i])))
            << to_string(c.kind) << " n=" << n << " offset=" << offset << " i=" << i;
        if (arrays >= 1) {
          ASSERT_NEAR(s0[i], ref.a[i], 2e-6 * (1 + std::fabs(ref.a[i])));
        }
        if (arrays >= 2) {
          ASSERT_NEAR(s1[i], ref.b[i], 2e-6 * (1 + std::fabs(ref.b[i])));
        }
      }
    }
  }
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (auto k : {OptimizerKind::sgd, OptimizerKind::momentum, OptimizerKind::nesterov,
                 OptimizerKind::adagrad, OptimizerKind::rmsprop, OptimizerKind::adam}) {
    cases.push_back({k, 0.0f, 0.0f, 1.0f});
    cases.push_back({k, 0.0f, 0.0f, 0.5f});
    cases.push_back({k, 0.01f, 0.0f, 1.0f});
    cases.push_back({k, 0.0f, 0.7f, 1.0f});
    cases.push_back({k, 0.01f, 0.7f, 0.75f});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Optimizer, AllOptimizers, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<Case>& param_info) {
                           const Case& c = param_info.param;
                           return std::string(to_string(c.kind)) +
                                  (c.weight_decay > 0 ? "_decay" : "") +
                                  (c.clip_value > 0 ? "_clip" : "") +
                                  (c.scale != 1.0f ? "_scaled" : "");
                         });

// ---- Argument checks and validation ---------------------------------------------------------

TEST(Optimizer, RejectsMismatchedSpans) {
  float p[4] = {}, g[4] = {}, v[4] = {};
  auto sgd = settings(OptimizerKind::sgd, 0.1f);
  EXPECT_THROW(apply_update(sgd, p, std::span<const float>(g, 3), {}, {}, 1, 1.0f),
               std::invalid_argument);
  EXPECT_THROW(apply_update(sgd, p, g, v, {}, 1, 1.0f), std::invalid_argument);  // sgd has none
  auto mom = settings(OptimizerKind::momentum, 0.1f);
  EXPECT_THROW(apply_update(mom, p, g, {}, {}, 1, 1.0f), std::invalid_argument);
  EXPECT_THROW(apply_update(mom, p, g, std::span<float>(v, 2), {}, 1, 1.0f), std::invalid_argument);
  auto adam = settings(OptimizerKind::adam, 0.1f);
  float m[4] = {};
  EXPECT_THROW(apply_update(adam, p, g, m, {}, 1, 1.0f), std::invalid_argument);
  EXPECT_THROW(apply_update(adam, p, g, m, v, 0, 1.0f), std::invalid_argument);  // step is 1-based
  EXPECT_NO_THROW(apply_update(adam, p, g, m, v, 1, 1.0f));
  EXPECT_NO_THROW(apply_update(sgd, {}, {}, {}, {}, 1, 1.0f));
  OptimizerSettings bad = sgd;
  bad.kind = static_cast<OptimizerKind>(17);
  EXPECT_THROW(apply_update(bad, p, g, {}, {}, 1, 1.0f), std::invalid_argument);
}

void expect_problem(const OptimizerSettings& s, const std::string& field, const std::string& what) {
  const std::string e = validate_optimizer_settings(s);
  EXPECT_EQ(e.rfind(field + ": ", 0), 0u) << e;
  EXPECT_NE(e.find(what), std::string::npos) << e;
}

TEST(Optimizer, Validation) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  OptimizerSettings s;
  EXPECT_EQ(validate_optimizer_settings(s), "");
  s.beta1 = 0.0f;
  s.momentum = 0.0f;
  s.rho = 0.0f;
  EXPECT_EQ(validate_optimizer_settings(s), "");  // 0 is inside [0, 1)

  auto with = [](auto change) {
    OptimizerSettings t;
    change(t);
    return t;
  };
  expect_problem(with([](auto& t) { t.lr = 0.0f; }), "lr", "must be a positive number, got 0");
  expect_problem(with([](auto& t) { t.lr = -0.1f; }), "lr", "got -0.1");
  expect_problem(with([&](auto& t) { t.lr = nan; }), "lr", "positive number");
  expect_problem(with([&](auto& t) { t.lr = inf; }), "lr", "positive number");
  expect_problem(with([](auto& t) { t.beta1 = 1.0f; }), "beta1", "must be in [0, 1), got 1");
  expect_problem(with([](auto& t) { t.beta2 = -0.5f; }), "beta2", "must be in [0, 1), got -0.5");
  expect_problem(with([](auto& t) { t.rho = 1.5f; }), "rho", "[0, 1)");
  expect_problem(with([](auto& t) { t.momentum = 1.0f; }), "momentum", "[0, 1)");
  expect_problem(with([&](auto& t) { t.momentum = nan; }), "momentum", "[0, 1)");
  expect_problem(with([](auto& t) { t.eps = 0.0f; }), "eps", "positive number");
  expect_problem(with([](auto& t) { t.weight_decay = -1.0f; }), "weight_decay", "non-negative");
  expect_problem(with([](auto& t) { t.clip_value = -2.0f; }), "clip_value", "got -2");
  expect_problem(with([&](auto& t) { t.clip_norm = inf; }), "clip_norm", "non-negative");
  expect_problem(with([](auto& t) { t.kind = static_cast<OptimizerKind>(9); }), "kind",
                 "valid kinds: sgd, momentum, nesterov, adagrad, rmsprop, adam");

  EXPECT_EQ(shmps::server::optimizer_field_problem("lr", 0.05), "");
  EXPECT_EQ(shmps::server::optimizer_field_problem("lr", -0.1),
            "must be a positive number, got -0.1");
  EXPECT_EQ(shmps::server::optimizer_field_problem("rho", 0.99), "");
}

}  // namespace

// Row-wise AdaGrad: one accumulator for the row, the mean of the squared (clamped, decayed)
// gradient added to it; every element steps by lr / (sqrt(s) + eps) times its own gradient.
TEST(RowwiseAdagrad, StepsTheRowWithOneAccumulatorAgainstHandComputedValues) {
  OptimizerSettings s;
  s.kind = OptimizerKind::rowwise_adagrad;
  s.lr = 0.5f;
  s.eps = 1e-6f;
  std::vector<float> row{1.0f, -2.0f, 0.5f, 4.0f};
  const std::vector<float> g1{3.0f, 0.0f, -1.0f, 2.0f}, g2{1.0f, 1.0f, 1.0f, 1.0f};
  double acc = 0;
  shmps::server::apply_rowwise_adagrad(s, row, g1, acc);
  EXPECT_DOUBLE_EQ(acc, (9.0 + 0.0 + 1.0 + 4.0) / 4);  // 3.5
  const double f1 = 0.5 / (std::sqrt(3.5) + 1e-6);
  EXPECT_FLOAT_EQ(row[0], static_cast<float>(1.0 - f1 * 3.0));
  EXPECT_FLOAT_EQ(row[1], -2.0f) << "a zero gradient element does not move, though the row's accumulator grew";
  EXPECT_FLOAT_EQ(row[2], static_cast<float>(0.5 + f1 * 1.0));
  EXPECT_FLOAT_EQ(row[3], static_cast<float>(4.0 - f1 * 2.0));
  const std::vector<float> before = row;
  shmps::server::apply_rowwise_adagrad(s, row, g2, acc);
  EXPECT_DOUBLE_EQ(acc, 4.5);
  const double f2 = 0.5 / (std::sqrt(4.5) + 1e-6);
  for (std::size_t i = 0; i < row.size(); ++i) EXPECT_FLOAT_EQ(row[i], static_cast<float>(before[i] - f2)) << i;

  // clip_value and weight_decay shape the gradient first, as for the element-wise kinds.
  s.clip_value = 1.0f;
  s.weight_decay = 0.1f;
  std::vector<float> r2{2.0f, 0.0f};
  double acc2 = 0;
  shmps::server::apply_rowwise_adagrad(s, r2, std::vector<float>{5.0f, -5.0f}, acc2);
  const double ga = 1.0 + 0.1 * 2.0, gb = -1.0;  // clamped to +-1, then + wd * p
  EXPECT_NEAR(acc2, (ga * ga + gb * gb) / 2, 1e-6);
  const double f = 0.5 / (std::sqrt((ga * ga + gb * gb) / 2) + 1e-6);
  EXPECT_FLOAT_EQ(r2[0], static_cast<float>(2.0 - f * ga));
  EXPECT_FLOAT_EQ(r2[1], static_cast<float>(0.0 - f * gb));

  // Misuse is refused: a row of another width, another kind, and the element-wise entry point.
  EXPECT_THROW(shmps::server::apply_rowwise_adagrad(s, r2, std::vector<float>{1.0f}, acc2), std::invalid_argument);
  OptimizerSettings sgd;
  EXPECT_THROW(shmps::server::apply_rowwise_adagrad(sgd, r2, std::vector<float>{1.0f, 1.0f}, acc2), std::invalid_argument);
  std::vector<float> none;
  EXPECT_THROW(shmps::server::apply_update(s, r2, std::vector<float>{1.0f, 1.0f}, none, none, 1, 1.0f),
               std::invalid_argument);
}
