#include "synthetic_data.hpp"

#include <algorithm>
#include <array>
#include <numeric>
#include <stdexcept>

#include <shmps/splitmix.hpp>

namespace shmps::data {

void fill_row(std::uint64_t row, std::span<float> out) {
  if (out.size() < kFeatures) throw std::invalid_argument("fill_row: output shorter than a row");
  // Draw i of stream 1 is mix(1 + (i + 1) * gamma); walk the states of this row directly (the
  // loop has no carried dependency, so it vectorises).
  const std::uint64_t base = kFeatureStream + (row * kFeatures + 1) * kSplitMixGamma;
  float* dst = out.data();
  for (std::size_t d = 0; d < kFeatures; ++d) {
    dst[d] = u24(splitmix_mix(base + static_cast<std::uint64_t>(d) * kSplitMixGamma));
  }
}

void fill_features(std::span<const std::uint64_t> rows, std::span<float> out) {
  if (out.size() != rows.size() * kFeatures) {
    throw std::invalid_argument("fill_features: output size must be rows * 784");
  }
  for (std::size_t i = 0; i < rows.size(); ++i) fill_row(rows[i], out.subspan(i * kFeatures, kFeatures));
}

void fill_feature_range(std::uint64_t first, std::uint64_t count, std::span<float> out) {
  if (out.size() != count * kFeatures) {
    throw std::invalid_argument("fill_feature_range: output size must be count * 784");
  }
  for (std::uint64_t i = 0; i < count; ++i) {
    fill_row(first + i, out.subspan(static_cast<std::size_t>(i) * kFeatures, kFeatures));
  }
}

Labeler::Labeler() : teacher_(kFeatures * kClasses) {
  for (std::size_t i = 0; i < teacher_.size(); ++i) teacher_[i] = u16(splitmix_draw(kTeacherStream, i));
}

template <class RowOf>
void Labeler::label_impl(std::size_t count, RowOf row_of, std::span<const float> x,
                         std::span<std::int32_t> y, std::span<std::int32_t> teacher) const {
  if (x.size() != count * kFeatures) throw std::invalid_argument("Labeler: features must be rows * 784");
  if (y.size() != count) throw std::invalid_argument("Labeler: one label per row");
  if (!teacher.empty() && teacher.size() != count) {
    throw std::invalid_argument("Labeler: one teacher label per row");
  }
  const double* t = teacher_.data();
  for (std::size_t i = 0; i < count; ++i) {
    // clean[k] = sum_d X[d] T[d, k]: every product is a multiple of 2^-38 and every partial sum
    // stays below 2^10, so the float64 sum is exact in any order (FMA included).
    std::array<double, kClasses> clean{};
    const float* xi = x.data() + i * kFeatures;
    for (std::size_t d = 0; d < kFeatures; ++d) {
      const double xd = static_cast<double>(xi[d]);
      const double* td = t + d * kClasses;
      for (std::size_t k = 0; k < kClasses; ++k) clean[k] += xd * td[k];
    }
    const std::uint64_t n = row_of(i);
    std::size_t best = 0;
    std::size_t best_clean = 0;
    double best_score = 0.0;
    for (std::size_t k = 0; k < kClasses; ++k) {
      const double score = clean[k] + kNoiseScale * u16(splitmix_draw(kNoiseStream, n * kClasses + k));
      if (k == 0 || score > best_score) {
        best_score = score;
        best = k;
      }
      if (clean[k] > clean[best_clean]) best_clean = k;
    }
    y[i] = static_cast<std::int32_t>(best);
    if (!teacher.empty()) teacher[i] = static_cast<std::int32_t>(best_clean);
  }
}

void Labeler::label(std::span<const std::uint64_t> rows, std::span<const float> x,
                    std::span<std::int32_t> y, std::span<std::int32_t> teacher) const {
  label_impl(rows.size(), [rows](std::size_t i) { return rows[i]; }, x, y, teacher);
}

void Labeler::label_range(std::uint64_t first, std::span<const float> x, std::span<std::int32_t> y,
                          std::span<std::int32_t> teacher) const {
  label_impl(y.size(), [first](std::size_t i) { return first + static_cast<std::uint64_t>(i); }, x, y,
             teacher);
}

std::vector<std::uint64_t> epoch_order(std::uint64_t epoch, std::uint64_t n) {
  const std::uint64_t stream = kEpochStreamBase + epoch;
  std::vector<std::uint64_t> keys(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = splitmix_draw(stream, i);
  std::vector<std::uint64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), std::uint64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&keys](std::uint64_t a, std::uint64_t b) { return keys[a] < keys[b]; });
  return order;
}

std::uint64_t batches_per_epoch(std::uint64_t n, std::uint64_t batch) {
  if (batch == 0) throw std::invalid_argument("batch size must be positive");
  return (n + batch - 1) / batch;
}

std::span<const std::uint64_t> global_batch(std::span<const std::uint64_t> order, std::uint64_t batch,
                                            std::uint64_t j) {
  const std::uint64_t n = order.size();
  const std::uint64_t begin = j * batch;
  if (batch == 0 || begin >= n) throw std::out_of_range("global_batch: batch index past the epoch");
  const std::uint64_t end = std::min(begin + batch, n);
  return order.subspan(static_cast<std::size_t>(begin), static_cast<std::size_t>(end - begin));
}

std::uint64_t Schedule::total_global_batches() const {
  if (n == 0) throw std::invalid_argument("schedule: empty data set");
  const std::uint64_t full = samples / n;
  const std::uint64_t rest = samples % n;
  return full * per_epoch() + (rest + batch - 1) / batch;
}

std::uint64_t Schedule::epochs() const {
  const std::uint64_t per = per_epoch();
  return (total_global_batches() + per - 1) / per;
}

std::uint64_t Schedule::global_batches_in_epoch(std::uint64_t epoch) const {
  const std::uint64_t per = per_epoch();
  const std::uint64_t total = total_global_batches();
  const std::uint64_t first = epoch * per;
  if (first >= total) return 0;
  return std::min(per, total - first);
}

std::uint64_t Schedule::worker_batch_count(std::uint64_t epoch) const {
  if (workers == 0 || rank >= workers) throw std::invalid_argument("schedule: rank must be below workers");
  const std::uint64_t g = global_batches_in_epoch(epoch);
  return g > rank ? (g - rank + workers - 1) / workers : 0;
}

std::vector<std::uint64_t> Schedule::worker_batches(std::uint64_t epoch) const {
  std::vector<std::uint64_t> js;
  js.reserve(static_cast<std::size_t>(worker_batch_count(epoch)));
  const std::uint64_t g = global_batches_in_epoch(epoch);
  for (std::uint64_t j = rank; j < g; j += workers) js.push_back(j);
  return js;
}

std::uint64_t Schedule::worker_total_batches() const {
  std::uint64_t total = 0;
  const std::uint64_t e_count = epochs();
  for (std::uint64_t e = 0; e < e_count; ++e) total += worker_batch_count(e);
  return total;
}

}  // namespace shmps::data
