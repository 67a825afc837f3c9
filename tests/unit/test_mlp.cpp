// The reference MLP: its initialisation (docs/workloads.md §2), its gradients against
// central finite differences of a float64 reference, an SGD step, and a short training run.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include <shmps/splitmix.hpp>

#include "mlp.hpp"
#include "synthetic_data.hpp"

namespace {

using namespace shmps;
using namespace shmps::mlp;

struct Batch {
  std::vector<float> x;
  std::vector<std::int32_t> y;
};

Batch make_batch(std::uint64_t first, std::size_t n) {
  Batch b{std::vector<float>(n * kIn), std::vector<std::int32_t>(n)};
  data::fill_feature_range(first, n, b.x);
  data::Labeler().label_range(first, b.x, b.y);
  return b;
}

// The float64 reference: mean cross-entropy of the MLP with parameters p (as doubles).
double reference_loss(const std::vector<std::vector<double>>& p, const Batch& b) {
  const std::size_t n = b.y.size();
  double total = 0.0;
  std::vector<double> h(kHidden);
  for (std::size_t r = 0; r < n; ++r) {
    for (std::size_t o = 0; o < kHidden; ++o) {
      double a = p[kFc1Bias][o];
      for (std::size_t i = 0; i < kIn; ++i) a += p[kFc1Weight][o * kIn + i] * static_cast<double>(b.x[r * kIn + i]);
      h[o] = a > 0.0 ? a : 0.0;
    }
    double z[kOut];
    double zmax = -1e300;
    for (std::size_t k = 0; k < kOut; ++k) {
      double a = p[kFc2Bias][k];
      for (std::size_t o = 0; o < kHidden; ++o) a += p[kFc2Weight][k * kHidden + o] * h[o];
      z[k] = a;
      zmax = std::max(zmax, a);
    }
    double s = 0.0;
    for (double v : z) s += std::exp(v - zmax);
    total += std::log(s) + zmax - z[b.y[r]];
  }
  return total / static_cast<double>(n);
}

std::vector<std::vector<double>> to_double(const Tensors& t) {
  std::vector<std::vector<double>> d(kParamCount);
  for (std::size_t i = 0; i < kParamCount; ++i) d[i].assign(t[i].begin(), t[i].end());
  return d;
}

TEST(Mlp, ParameterLayout) {
  const Tensors t;
  EXPECT_EQ(kParams[0].name, "fc1.weight");
  EXPECT_EQ(kParams[1].name, "fc1.bias");
  EXPECT_EQ(kParams[2].name, "fc2.weight");
  EXPECT_EQ(kParams[3].name, "fc2.bias");
  EXPECT_EQ(t[kFc1Weight].size(), 256u * 784u);
  EXPECT_EQ(t[kFc1Bias].size(), 256u);
  EXPECT_EQ(t[kFc2Weight].size(), 10u * 256u);
  EXPECT_EQ(t[kFc2Bias].size(), 10u);
  EXPECT_EQ(t.total_size(), 203530u);
  EXPECT_EQ(t.get("fc2.weight").data(), t[kFc2Weight].data());
  EXPECT_THROW(param_index("fc3.weight"), std::invalid_argument);
  for (std::size_t i = 0; i < kParamCount; ++i) {
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t[i].data()) % 64, 0u);
  }
}

TEST(Mlp, ReferenceInitMatchesTheFormula) {
  const Tensors p = reference_init();
  const float s1 = static_cast<float>(1.0 / 28.0);
  const float s2 = static_cast<float>(1.0 / 16.0);
  EXPECT_EQ(s2, 0.0625f);
  for (std::size_t o : {0u, 1u, 17u, 255u}) {
    for (std::size_t i : {0u, 1u, 400u, 783u}) {
      EXPECT_EQ(p[kFc1Weight][o * 784 + i], u24(splitmix_draw(11, o * 784 + i)) * s1) << o << "," << i;
    }
  }
  for (std::size_t o : {0u, 5u, 9u}) {
    for (std::size_t i : {0u, 128u, 255u}) {
      EXPECT_EQ(p[kFc2Weight][o * 256 + i], u24(splitmix_draw(12, o * 256 + i)) * s2) << o << "," << i;
    }
  }
  // The whole of fc2.weight against the sequential stream 12.
  SplitMix64 g(12);
  for (float w : p[kFc2Weight]) ASSERT_EQ(w, u24(g.next()) * s2);
  for (float b : p[kFc1Bias]) EXPECT_EQ(b, 0.0f);
  for (float b : p[kFc2Bias]) EXPECT_EQ(b, 0.0f);
}

TEST(Mlp, GradientsMatchFiniteDifferences) {
  const Batch b = make_batch(1000, 8);
  Tensors p = reference_init();
  // Non-zero biases, so that their effect is exercised too.
  SplitMix64 g(99);
  for (std::size_t i : {kFc1Bias, kFc2Bias}) {
    for (float& v : p[i]) v = 0.05f * u24(g.next());
  }
  Net net(8);
  Tensors grads;
  const BatchResult r = net.forward_backward(p, b.x, b.y, grads);
  auto pd = to_double(p);
  EXPECT_NEAR(r.loss, reference_loss(pd, b), 1e-5);
  EXPECT_EQ(r.rows, 8u);

  const double eps = 1e-5;
  for (std::size_t which = 0; which < kParamCount; ++which) {
    const std::size_t n = p[which].size();
    // A handful of random coordinates and the one with the largest gradient.
    std::vector<std::size_t> coords;
    for (int c = 0; c < 6; ++c) coords.push_back(static_cast<std::size_t>(g.next() % n));
    std::size_t big = 0;
    for (std::size_t i = 1; i < n; ++i) {
      if (std::fabs(grads[which][i]) > std::fabs(grads[which][big])) big = i;
    }
    coords.push_back(big);
    EXPECT_GT(std::fabs(grads[which][big]), 1e-4f) << kParams[which].name;
    for (std::size_t c : coords) {
      const double saved = pd[which][c];
      pd[which][c] = saved + eps;
      const double lp = reference_loss(pd, b);
      pd[which][c] = saved - eps;
      const double lm = reference_loss(pd, b);
      pd[which][c] = saved;
      const double fd = (lp - lm) / (2 * eps);
      const double an = static_cast<double>(grads[which][c]);
      EXPECT_NEAR(an, fd, 1e-7 + 1e-4 * std::fabs(fd)) << kParams[which].name << "[" << c << "]";
    }
  }
}

TEST(Mlp, ForwardAgreesWithForwardBackwardAndIsAlignmentIndependent) {
  const Batch b = make_batch(50, 64);
  const Tensors p = reference_init();
  Net net(64);
  Tensors g1, g2;
  const BatchResult r1 = net.forward_backward(p, b.x, b.y, g1);
  const BatchResult f = net.forward(p, b.x, b.y);
  EXPECT_EQ(r1.loss, f.loss);
  EXPECT_EQ(r1.correct, f.correct);
  // The same features at a misaligned address give bit-identical results.
  std::vector<float> shifted(b.x.size() + 3);
  std::copy(b.x.begin(), b.x.end(), shifted.begin() + 3);
  const BatchResult r2 = net.forward_backward(p, std::span<const float>(shifted).subspan(3), b.y, g2);
  EXPECT_EQ(r1.loss, r2.loss);
  for (std::size_t i = 0; i < kParamCount; ++i) {
    EXPECT_EQ(std::memcmp(g1[i].data(), g2[i].data(), g1[i].size_bytes()), 0) << kParams[i].name;
  }
  // A short batch in the same workspace.
  Batch small = make_batch(50, 5);
  const BatchResult rs = net.forward(p, small.x, small.y);
  EXPECT_EQ(rs.rows, 5u);
  EXPECT_NEAR(rs.loss, reference_loss(to_double(p), small), 1e-5);
  // Too large a batch is refused.
  Net tiny(4);
  EXPECT_THROW(tiny.forward(p, small.x, small.y), std::invalid_argument);
}

// Parameters given as views of other 64-byte aligned memory (a shmps segment, Worker::view) give
// bit-identical results: the trainer reads a BSP model in place and must still match a pull.
TEST(Mlp, ParameterViewsOfOtherAlignedMemoryGiveBitIdenticalResults) {
  const Batch b = make_batch(51, 64);
  const Tensors p = reference_init();
  Tensors elsewhere;  // another 64-byte aligned copy, as the segment's values are
  ParamViews views;
  for (std::size_t i = 0; i < kParamCount; ++i) {
    std::span<float> dst = elsewhere[i];
    std::copy(p[i].begin(), p[i].end(), dst.begin());
    views[i] = dst;
  }
  Net net(64);
  Tensors g1, g2;
  const BatchResult r1 = net.forward_backward(p, b.x, b.y, g1);
  const BatchResult r2 = net.forward_backward(views, b.x, b.y, g2);
  EXPECT_EQ(r1.loss, r2.loss);
  EXPECT_EQ(r1.correct, r2.correct);
  for (std::size_t i = 0; i < kParamCount; ++i)
    EXPECT_EQ(std::memcmp(g1[i].data(), g2[i].data(), g1[i].size_bytes()), 0) << kParams[i].name;
  views[kFc1Bias] = views[kFc1Bias].first(10);  // a view of the wrong size is refused
  EXPECT_THROW(net.forward(views, b.x, b.y), std::invalid_argument);
}

TEST(Mlp, SgdStepDecreasesTheLoss) {
  const Batch b = make_batch(0, 64);
  Tensors p = reference_init();
  Net net(64);
  Tensors grads;
  const double before = net.forward_backward(p, b.x, b.y, grads).loss;
  const Tensors p0 = p;
  sgd_update(p, grads, 0.05f);
  EXPECT_EQ(p[kFc2Bias][3], p0[kFc2Bias][3] - 0.05f * grads[kFc2Bias][3]);
  const double after = net.forward(p, b.x, b.y).loss;
  EXPECT_LT(after, before);
}

TEST(Mlp, WeightsHashIsFnv1aOfTheBuffersInOrder) {
  Tensors p = reference_init();
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::size_t i = 0; i < kParamCount; ++i) {
    std::vector<unsigned char> bytes(p[i].size_bytes());
    std::memcpy(bytes.data(), p[i].data(), bytes.size());
    for (unsigned char c : bytes) h = (h ^ c) * 0x100000001b3ULL;
  }
  EXPECT_EQ(weights_hash(p), h);
  p[kFc2Bias][9] = 1.0f;
  EXPECT_NE(weights_hash(p), h);
}

TEST(Mlp, ShortLocalTrainingLearns) {
  constexpr std::uint64_t kBatches = 600;
  Tensors p = reference_init();
  const EvalResult before = evaluate(p, data::kTestFirstRow, data::kTestRows);
  data::Schedule s;
  const auto order = data::epoch_order(0);
  const data::Labeler lab;
  Net net(64);
  Tensors grads;
  std::vector<float> x(64 * kIn);
  std::vector<std::int32_t> y(64);
  for (std::uint64_t j = 0; j < kBatches; ++j) {
    const auto rows = data::global_batch(order, s.batch, j);
    data::fill_features(rows, x);
    lab.label(rows, x, y);
    net.forward_backward(p, x, y, grads);
    sgd_update(p, grads, 0.05f);
  }
  const EvalResult after = evaluate(p, data::kTestFirstRow, data::kTestRows);
  std::printf("test before: loss %.4f acc %.4f; after %llu batches: loss %.4f acc %.4f\n", before.loss,
              before.accuracy, static_cast<unsigned long long>(kBatches), after.loss, after.accuracy);
  EXPECT_EQ(after.rows, data::kTestRows);
  EXPECT_LT(after.loss, before.loss);
  EXPECT_GT(after.accuracy, 0.35);  // chance is 0.1; 0.46 here
  // Chunking does not change the figures beyond float summation.
  const EvalResult small_chunks = evaluate(p, data::kTestFirstRow, 1000, 64);
  const EvalResult big_chunk = evaluate(p, data::kTestFirstRow, 1000, 1000);
  EXPECT_EQ(small_chunks.accuracy, big_chunk.accuracy);
  EXPECT_NEAR(small_chunks.loss, big_chunk.loss, 1e-9);
}

}  // namespace
