#include "ctr.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

namespace shmps::ctr {

namespace {

using Row = std::array<float, kDim>;

// The logit of one sample, row_of(f) giving the row of its field f; `bag` receives the rows' sum
// (the backward pass needs it). The bag is summed from zero in field order, as
// nn.EmbeddingBag(mode="sum") does, and the dot product in index order (GCC keeps the order of
// a float reduction without -ffast-math), so the result does not depend on where the rows lie.
template <class RowOf>
float sample_logit(RowOf row_of, const Head& head, Row& bag) {
  bag.fill(0.0f);
  for (std::size_t f = 0; f < kFields; ++f) {
    const float* r = row_of(f);
    for (std::size_t d = 0; d < kDim; ++d) bag[d] += r[d];
  }
  float z = 0.0f;
  for (std::size_t d = 0; d < kDim; ++d) z += bag[d] * head.weight[d];
  return z + head.bias;
}

// Binary cross-entropy with logits, max(z, 0) - z y + log(1 + e^-|z|): finite for any z.
double bce(float logit, std::int32_t y) {
  const double z = logit;
  return std::max(z, 0.0) - z * static_cast<double>(y) + std::log1p(std::exp(-std::abs(z)));
}

// exp of a non-positive argument only, so it cannot overflow.
float sigmoid(float z) {
  if (z >= 0.0f) return 1.0f / (1.0f + std::exp(-z));
  const float e = std::exp(z);
  return e / (1.0f + e);
}

template <bool kBackward>
BatchResult run(const Batch& batch, std::span<const float> rows, const Head& head, Grads* grads) {
  const std::size_t n = batch.samples();
  const std::size_t distinct = batch.unique().size();
  if (rows.size() != distinct * kDim) {
    throw std::invalid_argument("ctr: " + std::to_string(rows.size()) + " row values for " +
                                std::to_string(distinct) + " distinct ids (16 per row expected)");
  }
  if constexpr (kBackward) {
    grads->rows.assign(distinct * kDim, 0.0f);
    grads->head = Head{};
  }
  const std::span<const std::uint32_t> slots = batch.slots();
  const std::span<const std::int32_t> y = batch.labels();
  const float batch_size = static_cast<float>(n);
  BatchResult res;
  res.rows = n;
  Row bag;
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t* slot = slots.data() + i * kFields;
    const float logit =
        sample_logit([&](std::size_t f) { return rows.data() + static_cast<std::size_t>(slot[f]) * kDim; }, head, bag);
    res.loss += bce(logit, y[i]);
    res.correct += static_cast<std::uint64_t>((logit > 0.0f ? 1 : 0) == y[i]);
    if constexpr (kBackward) {
      // d loss / d logit of the mean loss.
      const float dlogit = (sigmoid(logit) - static_cast<float>(y[i])) / batch_size;
      for (std::size_t d = 0; d < kDim; ++d) grads->head.weight[d] += dlogit * bag[d];
      grads->head.bias += dlogit;
      // An id twice in the batch (or in one sample) adds to the same row: the summed gradient
      // of a distinct row, as a coalesced sparse gradient has it.
      for (std::size_t f = 0; f < kFields; ++f) {
        float* g = grads->rows.data() + static_cast<std::size_t>(slot[f]) * kDim;
        for (std::size_t d = 0; d < kDim; ++d) g[d] += dlogit * head.weight[d];
      }
    }
  }
  if (n > 0) res.loss /= static_cast<double>(n);
  return res;
}

}  // namespace

void Batch::assign(std::span<const std::uint64_t> ids, std::span<const std::int32_t> y) {
  if (ids.size() != y.size() * kFields) throw std::invalid_argument("ctr::Batch: ids must be samples * 8");
  for (const std::int32_t label : y) {
    if (label != 0 && label != 1) throw std::invalid_argument("ctr::Batch: a label is not 0 or 1");
  }
  // One sort of (id, position) pairs packed in a word gives both the distinct ids in order and
  // each position's row among them. Ids are below 2^20 and positions below 2^32. The sort is an
  // LSD radix sort on the id's 20 bits, two passes of 10 (stable, so an id's positions stay in
  // order): about 11 us for a batch of 2,048 ids where std::sort took 84, the local trainer's
  // largest cost then.
  if (ids.size() >= (std::size_t{1} << 32)) throw std::invalid_argument("ctr::Batch: too many ids");
  static_assert(kRows == std::uint64_t{1} << 20, "the radix sort covers 20-bit ids");
  constexpr std::uint64_t kDigit = 1024;
  std::array<std::uint32_t, kDigit> low{}, high{};
  for (const std::uint64_t id : ids) {
    if (id >= kRows) throw std::out_of_range("ctr::Batch: id " + std::to_string(id) + " is not below 2^20");
    ++low[id % kDigit];
    ++high[id / kDigit];
  }
  std::uint32_t low_sum = 0, high_sum = 0;
  for (std::size_t d = 0; d < kDigit; ++d) {
    low_sum += std::exchange(low[d], low_sum);
    high_sum += std::exchange(high[d], high_sum);
  }
  ids_.assign(ids.begin(), ids.end());  // the input is valid: keep it
  y_.assign(y.begin(), y.end());
  scratch_.resize(ids.size());
  keys_.resize(ids.size());
  for (std::size_t k = 0; k < ids.size(); ++k) scratch_[low[ids[k] % kDigit]++] = ids[k] << 32 | k;
  for (const std::uint64_t key : scratch_) keys_[high[(key >> 32) / kDigit]++] = key;
  unique_.clear();
  slot_.resize(ids.size());
  for (const std::uint64_t key : keys_) {
    const std::uint64_t id = key >> 32;
    if (unique_.empty() || unique_.back() != id) unique_.push_back(id);
    slot_[key & 0xFFFFFFFFULL] = static_cast<std::uint32_t>(unique_.size() - 1);
  }
}

BatchResult forward_backward(const Batch& batch, std::span<const float> rows, const Head& head, Grads& grads) {
  return run<true>(batch, rows, head, &grads);
}

BatchResult forward(const Batch& batch, std::span<const float> rows, const Head& head) {
  return run<false>(batch, rows, head, nullptr);
}

Model reference_init() {
  Model m;
  m.emb.resize(kRows * kDim);
  // emb[r, d] is draw r*16 + d, the flat row-major index; each value is one float32 multiply.
  const float emb_scale = static_cast<float>(1.0 / 64.0);
  for (std::size_t i = 0; i < m.emb.size(); ++i) m.emb[i] = u24(splitmix_draw(kEmbStream, i)) * emb_scale;
  const float head_scale = static_cast<float>(1.0 / 4.0);
  for (std::size_t d = 0; d < kDim; ++d) m.head.weight[d] = u24(splitmix_draw(kHeadStream, d)) * head_scale;
  m.head.bias = 0.0f;
  return m;
}

void gather_rows(std::span<const float> table, std::span<const std::uint64_t> ids, std::span<float> out) {
  if (out.size() != ids.size() * kDim) throw std::invalid_argument("gather_rows: output must be ids * 16");
  for (std::size_t k = 0; k < ids.size(); ++k) {
    if ((ids[k] + 1) * kDim > table.size()) throw std::out_of_range("gather_rows: id past the table");
    std::copy_n(table.data() + ids[k] * kDim, kDim, out.data() + k * kDim);
  }
}

void sgd_rows(std::span<float> table, std::span<const std::uint64_t> ids, std::span<const float> grads, float lr) {
  if (grads.size() != ids.size() * kDim) throw std::invalid_argument("sgd_rows: gradients must be ids * 16");
  for (std::size_t k = 0; k < ids.size(); ++k) {
    if ((ids[k] + 1) * kDim > table.size()) throw std::out_of_range("sgd_rows: id past the table");
    float* p = table.data() + ids[k] * kDim;
    const float* g = grads.data() + k * kDim;
    for (std::size_t d = 0; d < kDim; ++d) p[d] -= lr * g[d];
  }
}

void sgd_head(Head& head, const Head& grad, float lr) {
  for (std::size_t d = 0; d < kDim; ++d) head.weight[d] -= lr * grad.weight[d];
  head.bias -= lr * grad.bias;
}

EvalResult evaluate(const Model& model, const Labeler& labeler, std::uint64_t first, std::uint64_t count) {
  if (model.emb.size() != kRows * kDim) throw std::invalid_argument("ctr::evaluate: the table must be 2^20 x 16");
  constexpr std::uint64_t kChunk = 4096;
  std::vector<std::uint64_t> ids(kChunk * kFields);
  std::vector<std::int32_t> y(kChunk);
  double loss_sum = 0.0;
  std::uint64_t correct = 0;
  Row bag;
  for (std::uint64_t done = 0; done < count;) {
    const std::size_t n = static_cast<std::size_t>(std::min(kChunk, count - done));
    fill_samples(labeler, first + done, std::span(ids.data(), n * kFields), std::span(y.data(), n));
    // No gradient, so no need for the distinct rows: read the table directly.
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint64_t* id = ids.data() + i * kFields;
      const float logit = sample_logit([&](std::size_t f) { return model.emb.data() + id[f] * kDim; }, model.head, bag);
      loss_sum += bce(logit, y[i]);
      correct += static_cast<std::uint64_t>((logit > 0.0f ? 1 : 0) == y[i]);
    }
    done += n;
  }
  EvalResult e;
  e.rows = count;
  if (count > 0) {
    e.loss = loss_sum / static_cast<double>(count);
    e.accuracy = static_cast<double>(correct) / static_cast<double>(count);
  }
  return e;
}

std::uint64_t weights_hash(const Model& model) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  const auto mix = [&h](std::span<const float> p) {
    const auto* bytes = reinterpret_cast<const unsigned char*>(p.data());
    for (std::size_t j = 0; j < p.size_bytes(); ++j) {
      h ^= bytes[j];
      h *= 0x100000001b3ULL;
    }
  };
  mix(model.emb);
  mix(model.head.weight_span());
  mix(model.head.bias_span());
  return h;
}

}  // namespace shmps::ctr
