#include "ctr_data.hpp"

#include <algorithm>
#include <bit>
#include <stdexcept>
#include <string>

namespace shmps::ctr {

void fill_ids(std::uint64_t first, std::uint64_t count, std::span<std::uint64_t> out) {
  if (out.size() != count * kFields) throw std::invalid_argument("fill_ids: output size must be count * 8");
  // id[n, f] uses draw n*8 + f, so consecutive samples use consecutive draws: one flat loop with
  // no carried dependency (it vectorises).
  const std::uint64_t base = first * kFields;
  std::uint64_t* dst = out.data();
  for (std::size_t k = 0; k < out.size(); ++k) dst[k] = row_of_draw(splitmix_draw(kIdStream, base + k));
}

Labeler::Labeler() : teacher_(kRows) {
  for (std::size_t r = 0; r < teacher_.size(); ++r) teacher_[r] = u16(splitmix_draw(kTeacherStream, r));
}

double Labeler::clean(std::span<const std::uint64_t> sample_ids) const {
  double c = 0.0;
  for (const std::uint64_t id : sample_ids) c += teacher_[id];
  return c;
}

void Labeler::label_range(std::uint64_t first, std::span<const std::uint64_t> ids, std::span<std::int32_t> y,
                          std::span<std::int32_t> teacher) const {
  if (ids.size() != y.size() * kFields) throw std::invalid_argument("Labeler: ids must be samples * 8");
  if (!teacher.empty() && teacher.size() != y.size()) {
    throw std::invalid_argument("Labeler: one teacher label per sample");
  }
  for (std::size_t i = 0; i < y.size(); ++i) {
    const double c = clean(ids.subspan(i * kFields, kFields));
    y[i] = c + kNoiseScale * noise(first + i) > 0.0 ? 1 : 0;
    if (!teacher.empty()) teacher[i] = c > 0.0 ? 1 : 0;
  }
}

void fill_samples(const Labeler& labeler, std::uint64_t first, std::span<std::uint64_t> ids,
                  std::span<std::int32_t> y) {
  fill_ids(first, y.size(), ids);
  labeler.label_range(first, ids, y);
}

std::uint64_t distinct_rows(std::span<const std::uint64_t> ids) {
  std::vector<std::uint64_t> seen(kRows / 64, 0);
  for (const std::uint64_t id : ids) {
    if (id >= kRows) throw std::out_of_range("distinct_rows: id " + std::to_string(id) + " is not below 2^20");
    seen[id / 64] |= std::uint64_t{1} << (id % 64);
  }
  std::uint64_t n = 0;
  for (const std::uint64_t word : seen) n += static_cast<std::uint64_t>(std::popcount(word));
  return n;
}

Fingerprints fingerprints(const Labeler& labeler, std::uint64_t first, std::uint64_t count) {
  // Chunks keep the working set small (8 ids per sample); the bitmap spans the whole run.
  constexpr std::uint64_t kChunk = 4096;
  std::vector<std::uint64_t> ids(kChunk * kFields);
  std::vector<std::int32_t> y(kChunk), teacher(kChunk);
  std::vector<std::uint64_t> seen(kRows / 64, 0);
  std::uint64_t positive = 0, agree = 0;
  for (std::uint64_t done = 0; done < count;) {
    const std::uint64_t n = std::min(kChunk, count - done);
    const std::span<std::uint64_t> ids_n(ids.data(), n * kFields);
    const std::span<std::int32_t> y_n(y.data(), n), teacher_n(teacher.data(), n);
    fill_ids(first + done, n, ids_n);
    labeler.label_range(first + done, ids_n, y_n, teacher_n);
    for (std::size_t i = 0; i < n; ++i) {
      positive += static_cast<std::uint64_t>(y_n[i] == 1);
      agree += static_cast<std::uint64_t>(y_n[i] == teacher_n[i]);
    }
    for (const std::uint64_t id : ids_n) seen[id / 64] |= std::uint64_t{1} << (id % 64);
    done += n;
  }
  Fingerprints fp;
  fp.samples = count;
  if (count > 0) {
    fp.positive_share = static_cast<double>(positive) / static_cast<double>(count);
    fp.teacher_agreement = static_cast<double>(agree) / static_cast<double>(count);
  }
  for (const std::uint64_t word : seen) fp.distinct_rows += static_cast<std::uint64_t>(std::popcount(word));
  return fp;
}

}  // namespace shmps::ctr
