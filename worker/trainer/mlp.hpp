// The reference MLP (docs/workloads.md §2): 784-256-10, Linear, ReLU, Linear,
// softmax cross-entropy averaged over the batch. Parameters in the PyTorch nn.Linear layout
// (weight[out, in], row-major) under the names fc1.weight, fc1.bias, fc2.weight, fc2.bias, each a
// contiguous float32 buffer, so a trainer pulls or pushes each one with a single call.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <span>
#include <string_view>
#include <vector>

namespace shmps::mlp {

inline constexpr std::size_t kIn = 784;
inline constexpr std::size_t kHidden = 256;
inline constexpr std::size_t kOut = 10;

struct ParamSpec {
  std::string_view name;
  std::size_t rows;  // out features (or the bias length)
  std::size_t cols;  // in features (1 for a bias)
  std::size_t size() const { return rows * cols; }
};

// In the order used everywhere (pull/push, the weights hash, checkpoints).
inline constexpr std::size_t kParamCount = 4;
inline constexpr std::array<ParamSpec, kParamCount> kParams{{
    {"fc1.weight", kHidden, kIn},
    {"fc1.bias", kHidden, 1},
    {"fc2.weight", kOut, kHidden},
    {"fc2.bias", kOut, 1},
}};
inline constexpr std::size_t kFc1Weight = 0, kFc1Bias = 1, kFc2Weight = 2, kFc2Bias = 3;

// Index of a parameter name in kParams; throws std::invalid_argument for an unknown name.
std::size_t param_index(std::string_view name);

// Allocates on 64-byte boundaries. The MLP's results must not depend on where its buffers happen
// to lie (Eigen's vectorised reductions peel up to an aligned address, which changes the order of
// float sums), so that equal inputs give bit-equal weights in any process.
template <class T>
struct AlignedAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{64};
  AlignedAllocator() noexcept = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlignment)); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, kAlignment); }
  template <class U>
  bool operator==(const AlignedAllocator<U>&) const noexcept { return true; }
};

// The four parameters as read-only spans, in kParams order, each of its parameter's size: the
// buffers of a Tensors (Tensors::views), or the values in a shmps segment itself (Worker::view),
// so that a worker can train without a private copy of the model. Both are 64-byte aligned, so
// the results are bit-equal either way (see AlignedAllocator).
using ParamViews = std::array<std::span<const float>, kParamCount>;

// Four contiguous float buffers (parameters or gradients), zero-initialised, 64-byte aligned.
class Tensors {
 public:
  Tensors();

  ParamViews views() const;

  std::span<float> operator[](std::size_t i) { return bufs_.at(i); }
  std::span<const float> operator[](std::size_t i) const { return bufs_.at(i); }
  std::span<float> get(std::string_view name) { return bufs_[param_index(name)]; }
  std::span<const float> get(std::string_view name) const { return bufs_[param_index(name)]; }

  void set_zero();
  std::size_t total_size() const;

 private:
  std::array<std::vector<float, AlignedAllocator<float>>, kParamCount> bufs_;
};

// The reference initial model: fc1.weight[o,i] = u24(draw o*784+i of stream 11) * float32(1/28),
// fc2.weight[o,i] = u24(draw o*256+i of stream 12) * float32(1/16), biases zero.
Tensors reference_init();
void reference_init(Tensors& params);

struct BatchResult {
  double loss = 0.0;         // mean cross-entropy over the batch
  std::uint64_t correct = 0; // rows whose first argmax of the logits equals the label
  std::uint64_t rows = 0;
};

// Forward/backward with preallocated workspaces for batches of up to max_batch rows; no
// allocation per step. One Net is used by one thread at a time.
class Net {
 public:
  explicit Net(std::size_t max_batch = 64);
  ~Net();
  Net(Net&&) noexcept;
  Net& operator=(Net&&) noexcept;

  std::size_t max_batch() const;

  // x: [b, 784] row-major, y: b labels in [0, 10), b <= max_batch. Writes into `grads` the
  // gradients of the mean loss (all four buffers are overwritten).
  // Throws std::invalid_argument if a view has the wrong size.
  BatchResult forward_backward(const ParamViews& params, std::span<const float> x,
                               std::span<const std::int32_t> y, Tensors& grads);
  BatchResult forward_backward(const Tensors& params, std::span<const float> x,
                               std::span<const std::int32_t> y, Tensors& grads) {
    return forward_backward(params.views(), x, y, grads);
  }

  // Loss and correct count only.
  BatchResult forward(const ParamViews& params, std::span<const float> x, std::span<const std::int32_t> y);
  BatchResult forward(const Tensors& params, std::span<const float> x, std::span<const std::int32_t> y) {
    return forward(params.views(), x, y);
  }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct EvalResult {
  double loss = 0.0;      // mean cross-entropy
  double accuracy = 0.0;  // fraction correct
  std::uint64_t rows = 0;
};

// Loss and accuracy over the data rows first .. first+count-1 (generated on the fly, `chunk`
// rows at a time).
EvalResult evaluate(const Tensors& params, std::uint64_t first, std::uint64_t count,
                    std::size_t chunk = 1000);

// Plain SGD: p -= lr * g for all four buffers.
void sgd_update(Tensors& params, const Tensors& grads, float lr);

// FNV-1a 64 over the bytes of the four buffers in kParams order.
std::uint64_t weights_hash(const Tensors& params);

}  // namespace shmps::mlp
