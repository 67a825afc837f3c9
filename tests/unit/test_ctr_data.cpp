// The sparse click-through workload (docs/workloads.md §4): its ids and labels against the
// definition and the fingerprints, a batch's distinct rows, the model's gradients against
// central finite differences of a float64 reference, the SGD step, and a short training run.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <shmps/splitmix.hpp>

#include "ctr.hpp"
#include "ctr_data.hpp"

namespace {

using namespace shmps;
using namespace shmps::ctr;

// Built once: the teacher is 2^20 draws.
const Labeler& labeler() {
  static const Labeler l;
  return l;
}

struct Samples {
  std::vector<std::uint64_t> ids;
  std::vector<std::int32_t> y;
};

Samples make_samples(std::uint64_t first, std::size_t n) {
  Samples s{std::vector<std::uint64_t>(n * kFields), std::vector<std::int32_t>(n)};
  fill_samples(labeler(), first, s.ids, s.y);
  return s;
}

TEST(CtrData, IdsFollowTheDefinition) {
  // The definition spelled out on the sequential stream 20: draw n*8 + f is the (n*8 + f)-th.
  SplitMix64 g(kIdStream);
  std::vector<std::uint64_t> ids(3 * kFields);
  fill_ids(0, 3, ids);
  for (std::uint64_t n = 0; n < 3; ++n) {
    for (std::size_t f = 0; f < kFields; ++f) {
      const std::uint64_t z = g.next();
      const std::uint64_t e = (z >> 32) % 20;
      const std::uint64_t m = (z & 0xFFFFFFFFULL) & ((std::uint64_t{1} << e) - 1);
      EXPECT_EQ(ids[n * kFields + f], (std::uint64_t{1} << e) - 1 + m) << n << "," << f;
      EXPECT_EQ(row_id(n, f), ids[n * kFields + f]);
    }
  }
  // The ends of the range: band 0 is row 0 alone, the last band ends at 2^20 - 2.
  EXPECT_EQ(row_of_draw(std::uint64_t{20} << 32 | 0xFFFFFFFFULL), 0u);
  EXPECT_EQ(row_of_draw(std::uint64_t{19} << 32 | 0xFFFFFFFFULL), kRows - 2);
  EXPECT_EQ(row_of_draw(std::uint64_t{19} << 32), (kRows >> 1) - 1);
  // A range that does not start at 0 gives the same ids.
  std::vector<std::uint64_t> later(2 * kFields);
  fill_ids(1, 2, later);
  EXPECT_TRUE(std::equal(later.begin(), later.end(), ids.begin() + kFields));
  EXPECT_THROW(fill_ids(0, 2, std::span(ids).first(15)), std::invalid_argument);
}

TEST(CtrData, LabelsFollowTheDefinition) {
  const Samples s = make_samples(12345, 64);
  for (std::size_t i = 0; i < s.y.size(); ++i) {
    double clean = 0.0;
    for (std::size_t f = 0; f < kFields; ++f) clean += u16(splitmix_draw(kTeacherStream, s.ids[i * kFields + f]));
    const double noise = u16(splitmix_draw(kNoiseStream, 12345 + i));
    EXPECT_EQ(s.y[i], clean + 0.5 * noise > 0.0 ? 1 : 0) << i;
  }
  EXPECT_EQ(labeler().teacher_weights().size(), kRows);
  EXPECT_EQ(labeler().teacher_weights()[7], u16(splitmix_draw(21, 7)));
}

// The fingerprints of docs/workloads.md §4 over the first 1,000,000 training rows, and every id
// of those rows in [0, R-2].
TEST(CtrData, FingerprintsOfTheFirstMillionRows) {
  const Fingerprints fp = fingerprints(labeler(), 0, 1000000);
  EXPECT_EQ(fp.samples, 1000000u);
  EXPECT_NEAR(fp.positive_share, 0.4275, 0.00005);
  EXPECT_NEAR(fp.teacher_agreement, 0.9425, 0.00005);
  EXPECT_EQ(fp.distinct_rows, 740840u);

  std::vector<std::uint64_t> ids(100000 * kFields);
  std::uint64_t max_id = 0, zeros = 0;
  for (std::uint64_t first = 0; first < 1000000; first += 100000) {
    fill_ids(first, 100000, ids);
    for (const std::uint64_t id : ids) {
      max_id = std::max(max_id, id);
      zeros += static_cast<std::uint64_t>(id == 0);
    }
  }
  EXPECT_LE(max_id, kRows - 2);
  EXPECT_GE(max_id, kRows - 100);  // the top band is reached
  // Row 0 takes 1/20 of the draws.
  EXPECT_NEAR(static_cast<double>(zeros) / 8e6, 0.05, 0.001);
}

// "One batch touches about 1,350 distinct rows": batch 0, and the mean of the first 200 batches
// against its expectation, sum over the bands e of 2^e (1 - (1 - 1/(20 * 2^e))^2048) = 1374.5
// (the docs' "about 1,350" is that, rounded down).
TEST(CtrData, DistinctRowsOfABatch) {
  double expected = 0.0;
  for (int e = 0; e < 20; ++e) {
    const double rows = std::ldexp(1.0, e);
    expected += rows * (1.0 - std::pow(1.0 - 1.0 / (20.0 * rows), static_cast<double>(kBatch * kFields)));
  }
  EXPECT_NEAR(expected, 1374.47, 0.01);
  std::vector<std::uint64_t> ids(kBatch * kFields);
  fill_ids(0, kBatch, ids);
  const std::uint64_t first = distinct_rows(ids);
  std::printf("batch 0 touches %llu distinct rows\n", static_cast<unsigned long long>(first));
  EXPECT_NEAR(static_cast<double>(first), expected, 60.0);  // a few standard deviations (about 13)
  std::uint64_t total = 0;
  for (std::uint64_t j = 0; j < 200; ++j) {
    fill_ids(j * kBatch, kBatch, ids);
    total += distinct_rows(ids);
  }
  const double mean = static_cast<double>(total) / 200.0;
  EXPECT_NEAR(mean, expected, 5.0);
  EXPECT_NEAR(mean, 1350.0, 0.03 * 1350.0);
  const std::uint64_t bad[] = {kRows};
  EXPECT_THROW(distinct_rows(bad), std::out_of_range);
}

TEST(CtrModel, BatchHasTheSortedDistinctIdsAndEachIdsRow) {
  const Samples s = make_samples(0, kBatch);
  Batch b;
  b.assign(s.ids, s.y);
  EXPECT_EQ(b.samples(), kBatch);
  const std::set<std::uint64_t> want(s.ids.begin(), s.ids.end());
  ASSERT_EQ(b.unique().size(), want.size());
  EXPECT_TRUE(std::equal(want.begin(), want.end(), b.unique().begin()));
  EXPECT_EQ(b.unique().size(), distinct_rows(s.ids));
  for (std::size_t k = 0; k < s.ids.size(); ++k) ASSERT_EQ(b.unique()[b.slots()[k]], s.ids[k]) << k;

  // Reused for a smaller batch with repeats, the state of the first one is gone.
  const std::uint64_t ids[] = {5, 3, 5, 5, 9, 0, 3, 1, 9, 9, 9, 9, 9, 9, 9, 9};
  const std::int32_t y[] = {1, 0};
  b.assign(ids, y);
  const std::vector<std::uint64_t> distinct{0, 1, 3, 5, 9};
  EXPECT_TRUE(std::ranges::equal(b.unique(), distinct));
  for (std::size_t k = 0; k < 16; ++k) EXPECT_EQ(b.unique()[b.slots()[k]], ids[k]);

  const std::int32_t not_a_label[] = {1, 2};
  EXPECT_THROW(b.assign(ids, not_a_label), std::invalid_argument);
  EXPECT_THROW(b.assign(std::span(ids).first(15), y), std::invalid_argument);
  const std::uint64_t too_big[] = {kRows, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_THROW(b.assign(too_big, std::span(y).first(1)), std::out_of_range);
}

TEST(CtrModel, ReferenceInitMatchesTheFormula) {
  const Model m = reference_init();
  ASSERT_EQ(m.emb.size(), kRows * kDim);
  const float s_emb = static_cast<float>(1.0 / 64.0);
  for (const std::uint64_t r : std::initializer_list<std::uint64_t>{0, 1, 4095, kRows - 1}) {
    for (std::size_t d : {0u, 7u, 15u}) {
      EXPECT_EQ(m.emb[r * kDim + d], u24(splitmix_draw(24, r * kDim + d)) * s_emb) << r << "," << d;
    }
  }
  SplitMix64 g(25);
  for (float w : m.head.weight) EXPECT_EQ(w, u24(g.next()) * 0.25f);
  EXPECT_EQ(m.head.bias, 0.0f);
}

// The parameters a test batch touches, in float64: its distinct rows and the head.
struct DoubleParams {
  std::vector<double> rows;  // unique x 16
  std::vector<double> weight;
  double bias = 0.0;
};

// The float64 reference: mean binary cross-entropy with logits, straight from the definition.
double reference_loss(const DoubleParams& p, const Batch& b) {
  double total = 0.0;
  for (std::size_t i = 0; i < b.samples(); ++i) {
    double logit = p.bias;
    for (std::size_t d = 0; d < kDim; ++d) {
      double bag = 0.0;
      for (std::size_t f = 0; f < kFields; ++f) bag += p.rows[b.slots()[i * kFields + f] * kDim + d];
      logit += bag * p.weight[d];
    }
    const double y = b.labels()[i];
    // -y log(sigmoid) - (1 - y) log(1 - sigmoid)
    total += y * std::log1p(std::exp(-logit)) + (1.0 - y) * std::log1p(std::exp(logit));
  }
  return total / static_cast<double>(b.samples());
}

TEST(CtrModel, GradientsMatchFiniteDifferences) {
  // Six samples whose ids repeat within a sample and across samples (row 0 and 3 above all),
  // so that the summing of a distinct row's occurrences is exercised.
  Samples s = make_samples(777, 6);
  s.ids[0 * kFields + 1] = s.ids[0 * kFields + 0];
  s.ids[2 * kFields + 5] = s.ids[0 * kFields + 0];
  for (std::size_t i = 0; i < 6; ++i) s.ids[i * kFields + 7] = 3;
  s.y = {1, 0, 1, 1, 0, 0};
  Batch b;
  b.assign(s.ids, s.y);

  // Rows and head at the scale of a trained model (the initial rows are small), and a non-zero
  // bias, so that every term matters.
  const std::size_t u = b.unique().size();
  std::vector<float> rows(u * kDim);
  SplitMix64 g(99);
  for (float& v : rows) v = 0.3f * u24(g.next());
  Head head;
  for (float& w : head.weight) w = u24(g.next());
  head.bias = 0.2f;

  Grads grads;
  const BatchResult r = forward_backward(b, rows, head, grads);
  EXPECT_EQ(r.rows, 6u);
  ASSERT_EQ(grads.rows.size(), u * kDim);
  DoubleParams pd{std::vector<double>(rows.begin(), rows.end()),
                  std::vector<double>(head.weight.begin(), head.weight.end()), head.bias};
  EXPECT_NEAR(r.loss, reference_loss(pd, b), 1e-6);
  const BatchResult f = forward(b, rows, head);
  EXPECT_EQ(f.loss, r.loss);
  EXPECT_EQ(f.correct, r.correct);

  const double eps = 1e-6;
  const auto check = [&](double& param, float analytic, const std::string& what) {
    const double saved = param;
    param = saved + eps;
    const double lp = reference_loss(pd, b);
    param = saved - eps;
    const double lm = reference_loss(pd, b);
    param = saved;
    const double fd = (lp - lm) / (2 * eps);
    EXPECT_NEAR(static_cast<double>(analytic), fd, 1e-6 + 1e-4 * std::fabs(fd)) << what;
  };
  for (std::size_t i = 0; i < pd.rows.size(); ++i) check(pd.rows[i], grads.rows[i], "row value " + std::to_string(i));
  for (std::size_t d = 0; d < kDim; ++d) check(pd.weight[d], grads.head.weight[d], "head.weight " + std::to_string(d));
  check(pd.bias, grads.head.bias, "head.bias");
  // Row 3 appears in every sample: its gradient is the largest of all.
  const std::size_t slot3 = static_cast<std::size_t>(std::ranges::find(b.unique(), 3u) - b.unique().begin());
  EXPECT_GT(std::fabs(grads.rows[slot3 * kDim]), 1e-3f);

  EXPECT_THROW(forward(b, std::span(rows).first(rows.size() - 1), head), std::invalid_argument);
}

TEST(CtrModel, SgdChangesOnlyTheTouchedRows) {
  Model m = reference_init();
  const Model before = m;
  const Samples s = make_samples(0, kBatch);
  Batch b;
  b.assign(s.ids, s.y);
  std::vector<float> rows(b.unique().size() * kDim);
  gather_rows(m.emb, b.unique(), rows);
  for (std::size_t k = 0; k < b.unique().size(); ++k)
    ASSERT_EQ(std::memcmp(&rows[k * kDim], &m.emb[b.unique()[k] * kDim], kDim * sizeof(float)), 0);
  Grads g;
  const BatchResult r0 = forward_backward(b, rows, m.head, g);
  sgd_rows(m.emb, b.unique(), g.rows, 1.0f);
  sgd_head(m.head, g.head, 1.0f);
  std::vector<bool> touched(kRows);
  for (std::uint64_t id : b.unique()) touched[id] = true;
  std::uint64_t changed = 0;
  for (std::uint64_t r = 0; r < kRows; ++r) {
    const bool same = std::memcmp(&m.emb[r * kDim], &before.emb[r * kDim], kDim * sizeof(float)) == 0;
    if (!touched[r]) {
      ASSERT_TRUE(same) << "row " << r;
    }
    changed += static_cast<std::uint64_t>(!same);
  }
  EXPECT_EQ(changed, b.unique().size());
  EXPECT_EQ(m.head.weight[0], before.head.weight[0] - g.head.weight[0]);
  EXPECT_EQ(m.head.bias, -g.head.bias);
  // The step lowers the batch's loss.
  gather_rows(m.emb, b.unique(), rows);
  EXPECT_LT(forward(b, rows, m.head).loss, r0.loss);
  EXPECT_NE(weights_hash(m), weights_hash(before));
}

// A short local run of the reference schedule (lr 1.0) learns: the test accuracy on the first
// 20,000 test rows rises well above the share of the majority class.
TEST(CtrModel, ShortTrainingRunLearns) {
  Model m = reference_init();
  const EvalResult start = evaluate(m, labeler(), kTestFirstRow, 20000);
  Batch b;
  Grads g;
  std::vector<float> rows;
  std::vector<std::uint64_t> ids(kBatch * kFields);
  std::vector<std::int32_t> y(kBatch);
  for (std::uint64_t j = 0; j < 800; ++j) {  // 204,800 samples
    fill_samples(labeler(), j * kBatch, ids, y);
    b.assign(ids, y);
    rows.resize(b.unique().size() * kDim);
    gather_rows(m.emb, b.unique(), rows);
    forward_backward(b, rows, m.head, g);
    sgd_rows(m.emb, b.unique(), g.rows, 1.0f);
    sgd_head(m.head, g.head, 1.0f);
  }
  const EvalResult end = evaluate(m, labeler(), kTestFirstRow, 20000);
  EXPECT_EQ(end.rows, 20000u);
  std::printf("start: loss %.4f acc %.4f; after 204,800 samples: loss %.4f acc %.4f\n", start.loss, start.accuracy,
              end.loss, end.accuracy);
  EXPECT_LT(end.loss, start.loss);
  EXPECT_GT(end.accuracy, 0.65);
}

}  // namespace
