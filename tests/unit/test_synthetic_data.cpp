// The reference synthetic data against the fingerprints of docs/workloads.md §1, the
// epoch shuffle and the worker batch split.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <shmps/splitmix.hpp>

#include "synthetic_data.hpp"

namespace {

using namespace shmps;
using namespace shmps::data;

static_assert(std::endian::native == std::endian::little, "the fingerprints hash little-endian bytes");

class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new(), &EVP_MD_CTX_free) {
    if (!ctx_ || EVP_DigestInit_ex(ctx_.get(), EVP_sha256(), nullptr) != 1) throw std::runtime_error("EVP init");
  }
  void update(const void* p, std::size_t n) {
    if (EVP_DigestUpdate(ctx_.get(), p, n) != 1) throw std::runtime_error("EVP update");
  }
  std::string hex() {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (EVP_DigestFinal_ex(ctx_.get(), md, &len) != 1) throw std::runtime_error("EVP final");
    std::string s;
    char buf[3];
    for (unsigned int i = 0; i < len; ++i) {
      std::snprintf(buf, sizeof buf, "%02x", md[i]);
      s += buf;
    }
    return s;
  }

 private:
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx_;
};

TEST(SyntheticData, FirstDrawOfStream1) {
  EXPECT_EQ(splitmix_draw(1, 0), 0x910a2dec89025cc1ULL);
  SplitMix64 g(1);
  EXPECT_EQ(g.next(), 0x910a2dec89025cc1ULL);
}

TEST(SyntheticData, RowsMatchTheSequentialStream) {
  // X[n, d] is draw n*784 + d of stream 1: walk the stream sequentially over rows 0..2.
  SplitMix64 g(kFeatureStream);
  std::vector<float> x(3 * kFeatures);
  fill_feature_range(0, 3, x);
  for (std::size_t i = 0; i < x.size(); ++i) ASSERT_EQ(x[i], u24(g.next())) << "element " << i;
  // Arbitrary rows, by index list and one at a time.
  const std::vector<std::uint64_t> rows{123456, 7, 219999};
  std::vector<float> xr(rows.size() * kFeatures);
  fill_features(rows, xr);
  std::vector<float> one(kFeatures);
  for (std::size_t r = 0; r < rows.size(); ++r) {
    fill_row(rows[r], one);
    for (std::size_t d = 0; d < kFeatures; ++d) {
      ASSERT_EQ(xr[r * kFeatures + d], one[d]);
      ASSERT_EQ(one[d], u24(splitmix_draw(1, rows[r] * kFeatures + d)));
    }
  }
  // u24 is in [-1, 1).
  for (float v : x) {
    EXPECT_GE(v, -1.0f);
    EXPECT_LT(v, 1.0f);
  }
}

TEST(SyntheticData, TeacherIsStream2) {
  const Labeler lab;
  const auto t = lab.teacher_weights();
  ASSERT_EQ(t.size(), kFeatures * kClasses);
  SplitMix64 g(kTeacherStream);
  for (std::size_t i = 0; i < t.size(); ++i) ASSERT_EQ(t[i], u16(g.next()));
}

TEST(SyntheticData, LabelsByIndexListMatchRange) {
  const Labeler lab;
  const std::uint64_t first = 4242;
  const std::size_t n = 100;
  std::vector<float> x(n * kFeatures);
  fill_feature_range(first, n, x);
  std::vector<std::int32_t> y1(n), t1(n), y2(n), t2(n);
  lab.label_range(first, x, y1, t1);
  std::vector<std::uint64_t> rows(n);
  std::iota(rows.begin(), rows.end(), first);
  lab.label(rows, x, y2, t2);
  EXPECT_EQ(y1, y2);
  EXPECT_EQ(t1, t2);
  // Directly from the definition, for one row.
  for (std::size_t i = 0; i < 3; ++i) {
    double best = -1e300;
    int arg = -1;
    for (std::size_t k = 0; k < kClasses; ++k) {
      double clean = 0.0;
      for (std::size_t d = 0; d < kFeatures; ++d) {
        clean += static_cast<double>(x[i * kFeatures + d]) * lab.teacher_weights()[d * kClasses + k];
      }
      const double score = clean + 8.0 * u16(splitmix_draw(3, (first + i) * kClasses + k));
      if (score > best) {
        best = score;
        arg = static_cast<int>(k);
      }
    }
    EXPECT_EQ(y1[i], arg);
  }
}

// One streamed pass over the training set: sha256 of X and y, the histogram, the agreement with the
// noise-free teacher. Then the agreement on the test set.
TEST(SyntheticData, Fingerprints) {
  const Labeler lab;
  constexpr std::size_t kChunk = 2000;
  std::vector<float> x(kChunk * kFeatures);
  std::vector<std::int32_t> y(kChunk), teacher(kChunk);
  std::vector<std::int64_t> y64(kChunk);
  Sha256 sha_x, sha_y;
  std::vector<std::uint64_t> hist(kClasses, 0);
  std::uint64_t agree = 0;
  static_assert(kTrainRows % kChunk == 0 && kTestRows % kChunk == 0);
  for (std::uint64_t first = 0; first < kTrainRows; first += kChunk) {
    fill_feature_range(first, kChunk, x);
    lab.label_range(first, x, y, teacher);
    sha_x.update(x.data(), x.size() * sizeof(float));
    for (std::size_t i = 0; i < kChunk; ++i) {
      y64[i] = y[i];
      ++hist[static_cast<std::size_t>(y[i])];
      agree += y[i] == teacher[i] ? 1 : 0;
    }
    sha_y.update(y64.data(), y64.size() * sizeof(std::int64_t));
  }
  EXPECT_EQ(sha_x.hex().substr(0, 16), "1eb002bc9907fb76");
  EXPECT_EQ(sha_y.hex().substr(0, 16), "ab2c5ec595b6e2b1");
  EXPECT_EQ(hist, (std::vector<std::uint64_t>{19287, 20133, 20611, 20436, 19002, 19388, 20835, 20509, 20509, 19290}));
  const double train_agree = static_cast<double>(agree) / static_cast<double>(kTrainRows);
  EXPECT_EQ(std::lround(train_agree * 1e4), 6342) << "agreement " << train_agree;

  std::uint64_t test_agree = 0;
  for (std::uint64_t first = kTestFirstRow; first < kTestFirstRow + kTestRows; first += kChunk) {
    fill_feature_range(first, kChunk, x);
    lab.label_range(first, x, y, teacher);
    for (std::size_t i = 0; i < kChunk; ++i) test_agree += y[i] == teacher[i] ? 1 : 0;
  }
  const double test_rate = static_cast<double>(test_agree) / static_cast<double>(kTestRows);
  EXPECT_EQ(std::lround(test_rate * 1e4), 6409) << "agreement " << test_rate;
}

TEST(EpochOrder, IsAStableArgsortOfTheEpochKeys) {
  for (std::uint64_t e : {0u, 1u}) {
    const auto order = epoch_order(e);
    ASSERT_EQ(order.size(), kTrainRows);
    std::vector<std::uint64_t> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    for (std::uint64_t i = 0; i < kTrainRows; ++i) ASSERT_EQ(sorted[i], i) << "not a permutation";
    // Keys non-decreasing along the order, ties by increasing index (stability).
    for (std::size_t i = 0; i + 1 < order.size(); ++i) {
      const auto ka = splitmix_draw(kEpochStreamBase + e, order[i]);
      const auto kb = splitmix_draw(kEpochStreamBase + e, order[i + 1]);
      ASSERT_TRUE(ka < kb || (ka == kb && order[i] < order[i + 1])) << "at " << i;
    }
    // Against a naive argsort of (key, index) pairs.
    std::vector<std::pair<std::uint64_t, std::uint64_t>> pairs(kTrainRows);
    for (std::uint64_t i = 0; i < kTrainRows; ++i) pairs[i] = {splitmix_draw(kEpochStreamBase + e, i), i};
    std::sort(pairs.begin(), pairs.end());
    for (std::size_t i = 0; i < 5000; ++i) ASSERT_EQ(order[i], pairs[i].second) << "at " << i;
  }
  EXPECT_NE(epoch_order(0), epoch_order(1));
}

TEST(EpochOrder, SmallNByRankCounting) {
  // The argsort of the first n keys, by counting for each index how many keys precede it.
  const std::uint64_t n = 1500, e = 7;
  const auto order = epoch_order(e, n);
  ASSERT_EQ(order.size(), n);
  std::vector<std::uint64_t> naive(n);
  for (std::uint64_t i = 0; i < n; ++i) {
    const auto ki = splitmix_draw(kEpochStreamBase + e, i);
    std::uint64_t rank = 0;
    for (std::uint64_t j = 0; j < n; ++j) {
      const auto kj = splitmix_draw(kEpochStreamBase + e, j);
      rank += (kj < ki || (kj == ki && j < i)) ? 1 : 0;
    }
    naive[rank] = i;
  }
  EXPECT_EQ(order, naive);
}

TEST(Schedule, ReferenceRun) {
  Schedule s;  // n 200000, batch 64, 400000 samples, 1 worker
  EXPECT_EQ(s.per_epoch(), 3125u);
  EXPECT_EQ(s.total_global_batches(), 6250u);
  EXPECT_EQ(s.epochs(), 2u);
  EXPECT_EQ(s.worker_total_batches(), 6250u);
  const auto js = s.worker_batches(1);
  ASSERT_EQ(js.size(), 3125u);
  for (std::size_t i = 0; i < js.size(); ++i) EXPECT_EQ(js[i], i);
  EXPECT_TRUE(s.worker_batches(2).empty());
}

TEST(Schedule, WorkersSplitTheGlobalBatches) {
  for (std::uint64_t p : {2u, 3u, 5u}) {
    std::vector<int> taken(3125, 0);
    std::uint64_t total = 0;
    for (std::uint64_t r = 0; r < p; ++r) {
      Schedule s;
      s.workers = p;
      s.rank = r;
      const auto js = s.worker_batches(0);
      EXPECT_EQ(js.size(), s.worker_batch_count(0));
      for (auto j : js) {
        EXPECT_EQ(j % p, r);
        ++taken[j];
      }
      total += s.worker_total_batches();
    }
    for (int t : taken) ASSERT_EQ(t, 1) << "every global batch exactly once with P=" << p;
    EXPECT_EQ(total, 6250u);
  }
  Schedule s0, s1;
  s0.workers = s1.workers = 2;
  s1.rank = 1;
  EXPECT_EQ(s0.worker_batch_count(0), 1563u);  // 3125 is odd
  EXPECT_EQ(s1.worker_batch_count(0), 1562u);
  Schedule bad;
  bad.workers = 2;
  bad.rank = 2;
  EXPECT_THROW(bad.worker_batches(0), std::invalid_argument);
}

TEST(Schedule, GlobalBatchesAndPartialEpochs) {
  const auto order = epoch_order(0, 1000);
  EXPECT_EQ(batches_per_epoch(1000, 64), 16u);
  const auto b0 = global_batch(order, 64, 0);
  ASSERT_EQ(b0.size(), 64u);
  EXPECT_TRUE(std::equal(b0.begin(), b0.end(), order.begin()));
  const auto b3 = global_batch(order, 64, 3);
  EXPECT_EQ(b3.data(), order.data() + 192);
  EXPECT_EQ(global_batch(order, 64, 15).size(), 1000u - 15 * 64);  // the short last batch
  EXPECT_THROW(global_batch(order, 64, 16), std::out_of_range);

  Schedule s;
  s.samples = 250000;  // one epoch, then 50000 samples = 782 batches (the last one short)
  EXPECT_EQ(s.total_global_batches(), 3125u + 782u);
  EXPECT_EQ(s.epochs(), 2u);
  EXPECT_EQ(s.global_batches_in_epoch(0), 3125u);
  EXPECT_EQ(s.global_batches_in_epoch(1), 782u);
  s.workers = 2;
  s.rank = 1;
  EXPECT_EQ(s.worker_batch_count(1), 391u);
  EXPECT_EQ(s.worker_batches(1).back(), 781u);
}

}  // namespace
