// The reference synthetic classification data (docs/workloads.md §1), computed
// directly from SplitMix64 draws: any row can be generated on its own, nothing is materialised.
//
//   X[n, d]  = u24(draw n*784 + d of stream 1)                      float32, row-major
//   T[d, k]  = u16(draw d*10 + k of stream 2)                       teacher, float64
//   E[n, k]  = u16(draw n*10 + k of stream 3)                       noise, float64
//   y[n]     = first argmax_k  sum_d X[n,d] T[d,k] + 8 E[n,k]       (exact in float64)
//
// Epoch e is the stable argsort of the keys draw i of stream 1000 + e (i < N); global batch j of
// an epoch is order[j*B, (j+1)*B); with P workers, worker r takes the batches j ≡ r (mod P).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace shmps::data {

inline constexpr std::size_t kFeatures = 784;
inline constexpr std::size_t kClasses = 10;
inline constexpr std::uint64_t kTrainRows = 200000;
inline constexpr std::uint64_t kTestFirstRow = 200000;
inline constexpr std::uint64_t kTestRows = 20000;

inline constexpr std::uint64_t kFeatureStream = 1;
inline constexpr std::uint64_t kTeacherStream = 2;
inline constexpr std::uint64_t kNoiseStream = 3;
inline constexpr std::uint64_t kEpochStreamBase = 1000;
inline constexpr double kNoiseScale = 8.0;

// Writes the feature row `row` into out[0, 784).
void fill_row(std::uint64_t row, std::span<float> out);

// Writes the rows `rows[i]` into out[i*784, (i+1)*784); out.size() must be rows.size()*784.
void fill_features(std::span<const std::uint64_t> rows, std::span<float> out);

// Writes the consecutive rows first .. first+count-1; out.size() must be count*784.
void fill_feature_range(std::uint64_t first, std::uint64_t count, std::span<float> out);

// Holds the teacher T and labels rows from their features.
class Labeler {
 public:
  Labeler();

  // y[i] = label of row rows[i], whose features are x[i*784, (i+1)*784) (as fill_features wrote
  // them). If `teacher` is not empty it receives the noise-free teacher label argmax_k clean.
  void label(std::span<const std::uint64_t> rows, std::span<const float> x,
             std::span<std::int32_t> y, std::span<std::int32_t> teacher = {}) const;

  // The same for the consecutive rows first .. first+y.size()-1.
  void label_range(std::uint64_t first, std::span<const float> x, std::span<std::int32_t> y,
                   std::span<std::int32_t> teacher = {}) const;

  // T[d, k], row-major [784, 10].
  std::span<const double> teacher_weights() const { return teacher_; }

 private:
  template <class RowOf>
  void label_impl(std::size_t count, RowOf row_of, std::span<const float> x,
                  std::span<std::int32_t> y, std::span<std::int32_t> teacher) const;

  std::vector<double> teacher_;  // [784, 10]
};

// The order of epoch e over the rows 0..n-1: the stable argsort of draw i of stream 1000 + e.
std::vector<std::uint64_t> epoch_order(std::uint64_t epoch, std::uint64_t n = kTrainRows);

// Global batches per epoch: ceil(n / batch) (the last one may be short).
std::uint64_t batches_per_epoch(std::uint64_t n, std::uint64_t batch);

// Global batch j of an epoch: order[j*batch, min((j+1)*batch, n)).
std::span<const std::uint64_t> global_batch(std::span<const std::uint64_t> order,
                                            std::uint64_t batch, std::uint64_t j);

// The reference schedule: `samples` samples drawn epoch after epoch in batches of `batch` rows
// (so `samples` = 400000 with n = 200000, batch = 64 gives 2 epochs of 3125 global batches). With
// `workers` processes, worker `rank` takes the global batches j ≡ rank (mod workers) of every
// epoch (j counted within the epoch).
struct Schedule {
  std::uint64_t n = kTrainRows;
  std::uint64_t batch = 64;
  std::uint64_t samples = 400000;
  std::uint64_t workers = 1;
  std::uint64_t rank = 0;

  std::uint64_t per_epoch() const { return batches_per_epoch(n, batch); }
  // Global batches over the whole run: full epochs, then ceil(rest / batch).
  std::uint64_t total_global_batches() const;
  // Epochs touched: ceil(total_global_batches / per_epoch).
  std::uint64_t epochs() const;
  // Global batches of epoch e that belong to the run (per_epoch, or fewer in a last partial one).
  std::uint64_t global_batches_in_epoch(std::uint64_t epoch) const;
  // The batch indices j of epoch e this worker takes, in order.
  std::vector<std::uint64_t> worker_batches(std::uint64_t epoch) const;
  // How many batches this worker takes in epoch e / over the whole run.
  std::uint64_t worker_batch_count(std::uint64_t epoch) const;
  std::uint64_t worker_total_batches() const;
};

}  // namespace shmps::data
