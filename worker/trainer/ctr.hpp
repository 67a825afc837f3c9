// The sparse click-through model (docs/workloads.md §4, models/ctr.toml): an embedding bag that
// sums the 8 rows of a sample from the table emb [2^20, 16], then a linear head head.weight
// [1, 16], head.bias [1], and binary cross-entropy with logits averaged over the batch. Names
// and layouts are PyTorch's (nn.EmbeddingBag "emb", nn.Linear "head").
//
// A batch reads only its distinct rows: a trainer pulls them (Worker::pull_rows, or a gather
// from a local table) into a dense [distinct, 16] block, and gets back one gradient row per
// distinct id, the gradients of the id's occurrences summed, which is what it pushes
// (Worker::push_rows) or applies (sgd_rows).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "ctr_data.hpp"

namespace shmps::ctr {

inline constexpr std::string_view kEmbName = "emb";
inline constexpr std::string_view kHeadWeightName = "head.weight";
inline constexpr std::string_view kHeadBiasName = "head.bias";

inline constexpr std::uint64_t kEmbStream = 24;
inline constexpr std::uint64_t kHeadStream = 25;

// The dense part of the model (or its gradient): head.weight [1, 16] and head.bias [1].
struct Head {
  std::array<float, kDim> weight{};
  float bias = 0.0f;

  std::span<float> weight_span() { return weight; }
  std::span<const float> weight_span() const { return weight; }
  std::span<float> bias_span() { return {&bias, 1}; }
  std::span<const float> bias_span() const { return {&bias, 1}; }
};

// One batch as the model sees it: the samples' ids and labels, the batch's distinct ids in
// increasing order (the rows to pull and to push), and for each id the index of its row among
// the distinct ones. Reused from batch to batch: no allocation per step once it has seen the
// largest batch.
class Batch {
 public:
  // ids: samples x 8 (as fill_ids writes them), y: one label in {0, 1} per sample.
  void assign(std::span<const std::uint64_t> ids, std::span<const std::int32_t> y);

  std::size_t samples() const { return y_.size(); }
  std::span<const std::uint64_t> ids() const { return ids_; }
  std::span<const std::int32_t> labels() const { return y_; }
  std::span<const std::uint64_t> unique() const { return unique_; }  // sorted, distinct
  std::span<const std::uint32_t> slots() const { return slot_; }     // ids()[k] == unique()[slots()[k]]

 private:
  std::vector<std::uint64_t> ids_, unique_, keys_, scratch_;  // keys_, scratch_: the sort's
  std::vector<std::uint32_t> slot_;
  std::vector<std::int32_t> y_;
};

// The gradients of one batch: rows[k*16, (k+1)*16) for the distinct id unique()[k], and the head's.
struct Grads {
  std::vector<float> rows;
  Head head;
};

struct BatchResult {
  double loss = 0.0;          // mean binary cross-entropy with logits
  std::uint64_t correct = 0;  // samples whose prediction (logit > 0) equals the label
  std::uint64_t rows = 0;     // samples
};

// rows: the batch's distinct rows, unique().size() x 16 row-major (as pull_rows fills them).
// Writes into `grads` the gradients of the mean loss (resized to unique().size() x 16):
// dlogit_n = (sigmoid(logit_n) - y_n) / B; each distinct row gets dlogit_n * head.weight once per
// occurrence in sample n; head.weight gets dlogit_n * bag_n, head.bias dlogit_n.
// Throws std::invalid_argument if `rows` has the wrong size.
BatchResult forward_backward(const Batch& batch, std::span<const float> rows, const Head& head, Grads& grads);

// Loss and correct count only.
BatchResult forward(const Batch& batch, std::span<const float> rows, const Head& head);

// The whole model in one process: the --local trainer's, or one pulled for evaluation.
struct Model {
  std::vector<float> emb;  // [2^20, 16] row-major, 64 MiB
  Head head;
};

// The reference initial model: emb[r, d] = u24(draw r*16 + d of stream 24) * float32(1/64),
// head.weight[0, d] = u24(draw d of stream 25) * float32(1/4), the bias zero.
Model reference_init();

// out[k*16, (k+1)*16) = row ids[k] of the table [2^20, 16] (a local pull_rows).
void gather_rows(std::span<const float> table, std::span<const std::uint64_t> ids, std::span<float> out);

// Plain SGD on the rows `ids` only (a local push_rows and its apply): row ids[k] -= lr * grads[k].
void sgd_rows(std::span<float> table, std::span<const std::uint64_t> ids, std::span<const float> grads, float lr);

// Plain SGD on the head: p -= lr * g.
void sgd_head(Head& head, const Head& grad, float lr);

struct EvalResult {
  double loss = 0.0;      // mean binary cross-entropy
  double accuracy = 0.0;  // fraction correct
  std::uint64_t rows = 0;
};

// Loss and accuracy of the model over the samples first .. first+count-1 (generated on the fly).
EvalResult evaluate(const Model& model, const Labeler& labeler, std::uint64_t first, std::uint64_t count);

// FNV-1a 64 over the bytes of emb, head.weight and head.bias, in that order.
std::uint64_t weights_hash(const Model& model);

}  // namespace shmps::ctr
