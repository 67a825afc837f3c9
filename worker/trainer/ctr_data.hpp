// The sparse click-through data (docs/workloads.md §4), computed directly from SplitMix64 draws
// (the streams and mappings of §1, shmps/splitmix.hpp): any sample can be generated on its own,
// nothing is materialised but the teacher table.
//
//   z         = draw n*8 + f of stream 20;  e = (z >> 32) mod 20;  m = (z & 0xFFFFFFFF) & (2^e - 1)
//   id[n, f]  = 2^e - 1 + m                                       in [0, 2^20 - 2]
//   T[r]      = u16(draw r of stream 21)                          teacher, float64
//   E[n]      = u16(draw n of stream 23)                          noise, float64
//   clean[n]  = sum_f T[id[n, f]];   y[n] = clean[n] + 0.5 E[n] > 0   (exact in float64)
//
// Training rows 0..3,999,999 in order (no shuffle), global batch j = rows j*256 .. j*256+255;
// with P workers, worker r takes the batches j ≡ r (mod P). Test rows 10,000,000..10,099,999.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include <shmps/splitmix.hpp>

namespace shmps::ctr {

inline constexpr std::uint64_t kRows = std::uint64_t{1} << 20;  // R: rows of the table
inline constexpr std::size_t kDim = 16;                          // D: floats per row
inline constexpr std::size_t kFields = 8;                        // F: ids per sample
inline constexpr std::uint64_t kBatch = 256;                     // B
inline constexpr std::uint64_t kTrainRows = 4000000;
inline constexpr std::uint64_t kTestFirstRow = 10000000;
inline constexpr std::uint64_t kTestRows = 100000;

inline constexpr std::uint64_t kIdStream = 20;
inline constexpr std::uint64_t kTeacherStream = 21;
inline constexpr std::uint64_t kNoiseStream = 23;
inline constexpr std::uint64_t kIdBands = 20;  // e in [0, 20): the power-of-two band of a row
inline constexpr double kNoiseScale = 0.5;

// The row of a draw z of stream 20: band e takes 1/20 of the draws and spreads them evenly over
// its 2^e rows, so row 0 gets 5% of them (a Zipf(1)-like skew, in integer arithmetic only).
constexpr std::uint64_t row_of_draw(std::uint64_t z) noexcept {
  const std::uint64_t e = (z >> 32) % kIdBands;
  const std::uint64_t band = (std::uint64_t{1} << e) - 1;
  return band + ((z & 0xFFFFFFFFULL) & band);
}

// id[n, f].
constexpr std::uint64_t row_id(std::uint64_t n, std::size_t f) noexcept {
  return row_of_draw(splitmix_draw(kIdStream, n * kFields + f));
}

// E[n].
inline double noise(std::uint64_t n) noexcept { return u16(splitmix_draw(kNoiseStream, n)); }

// The ids of the consecutive samples first .. first+count-1: out[i*8 + f] = id[first + i, f];
// out.size() must be count*8.
void fill_ids(std::uint64_t first, std::uint64_t count, std::span<std::uint64_t> out);

// Holds the teacher T (2^20 doubles, 8 MiB) and labels samples from their ids.
class Labeler {
 public:
  Labeler();

  // clean = sum_f T[ids[f]] of one sample's 8 ids. Every T is a multiple of 2^-15 in [-1, 1),
  // so the sum, and clean + 0.5 E, are exact in float64: labels do not depend on the order.
  double clean(std::span<const std::uint64_t> sample_ids) const;

  // y[i] = label of sample first + i, whose ids are ids[i*8, (i+1)*8) (as fill_ids wrote them).
  // If `teacher` is not empty it receives the noise-free label clean > 0.
  void label_range(std::uint64_t first, std::span<const std::uint64_t> ids, std::span<std::int32_t> y,
                   std::span<std::int32_t> teacher = {}) const;

  std::span<const double> teacher_weights() const { return teacher_; }

 private:
  std::vector<double> teacher_;  // [R]
};

// The ids and labels of the consecutive samples first .. first+y.size()-1 (ids: y.size()*8).
void fill_samples(const Labeler& labeler, std::uint64_t first, std::span<std::uint64_t> ids,
                  std::span<std::int32_t> y);

// Distinct values among ids (each below kRows), counted with a bitmap of the table's rows.
std::uint64_t distinct_rows(std::span<const std::uint64_t> ids);

// The fingerprints of docs/workloads.md §4 over the samples first .. first+count-1.
struct Fingerprints {
  std::uint64_t samples = 0;
  double positive_share = 0.0;      // share of y = 1
  double teacher_agreement = 0.0;   // share of y == (clean > 0)
  std::uint64_t distinct_rows = 0;  // rows of the table the samples touch
};
Fingerprints fingerprints(const Labeler& labeler, std::uint64_t first, std::uint64_t count);

// The schedule is shmps::data::Schedule (synthetic_data.hpp) with n = kTrainRows and batch
// kBatch, whose epochs here visit the rows in order: global batch j of a pass is the rows
// j*batch .. min((j+1)*batch, kTrainRows) - 1.

}  // namespace shmps::ctr
