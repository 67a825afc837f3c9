#include "mlp.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

// GCC 12 reports a false -Wmaybe-uninitialized inside Eigen's AVX-512 GEMM kernels (the
// intentionally undefined vector of _mm512_undefined_ps, GCC bug 105593); silence only that one.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same false positive at -O2 with sanitizers
#endif
#include <Eigen/Core>

#include <shmps/splitmix.hpp>

#include "synthetic_data.hpp"

namespace shmps::mlp {

namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMap = Eigen::Map<const RowMat>;
using MutMap = Eigen::Map<RowMat>;
using ConstRowVec = Eigen::Map<const Eigen::RowVectorXf>;
using MutRowVec = Eigen::Map<Eigen::RowVectorXf>;

Eigen::Index idx(std::size_t n) { return static_cast<Eigen::Index>(n); }

ConstMap cmat(const ParamViews& t, std::size_t i) {
  return ConstMap(t[i].data(), idx(kParams[i].rows), idx(kParams[i].cols));
}
MutMap mmat(Tensors& t, std::size_t i) {
  return MutMap(t[i].data(), idx(kParams[i].rows), idx(kParams[i].cols));
}
ConstRowVec cvec(const ParamViews& t, std::size_t i) { return ConstRowVec(t[i].data(), idx(t[i].size())); }
MutRowVec mvec(Tensors& t, std::size_t i) { return MutRowVec(t[i].data(), idx(t[i].size())); }

}  // namespace

std::size_t param_index(std::string_view name) {
  for (std::size_t i = 0; i < kParamCount; ++i) {
    if (kParams[i].name == name) return i;
  }
  throw std::invalid_argument("unknown MLP parameter '" + std::string(name) +
                              "' (expected fc1.weight, fc1.bias, fc2.weight or fc2.bias)");
}

Tensors::Tensors() {
  for (std::size_t i = 0; i < kParamCount; ++i) bufs_[i].assign(kParams[i].size(), 0.0f);
}

void Tensors::set_zero() {
  for (auto& b : bufs_) std::fill(b.begin(), b.end(), 0.0f);
}

ParamViews Tensors::views() const {
  ParamViews v;
  for (std::size_t i = 0; i < kParamCount; ++i) v[i] = bufs_[i];
  return v;
}

std::size_t Tensors::total_size() const {
  std::size_t n = 0;
  for (const auto& b : bufs_) n += b.size();
  return n;
}

void reference_init(Tensors& params) {
  const auto init = [&params](std::size_t which, std::uint64_t stream, float scale) {
    std::span<float> w = params[which];
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = u24(splitmix_draw(stream, i)) * scale;
  };
  // draw o*in + i is draw number (flat row-major index) of the stream.
  init(kFc1Weight, 11, static_cast<float>(1.0 / 28.0));
  init(kFc2Weight, 12, static_cast<float>(1.0 / 16.0));
  std::ranges::fill(params[kFc1Bias], 0.0f);
  std::ranges::fill(params[kFc2Bias], 0.0f);
}

Tensors reference_init() {
  Tensors t;
  reference_init(t);
  return t;
}

struct Net::Impl {
  std::size_t max_batch;
  RowMat hidden;   // [max_batch, 256] post-ReLU activations
  RowMat logits;   // [max_batch, 10], then the gradient of the loss w.r.t. the logits
  RowMat dhidden;  // [max_batch, 256]

  explicit Impl(std::size_t mb)
      : max_batch(mb), hidden(idx(mb), idx(kHidden)), logits(idx(mb), idx(kOut)), dhidden(idx(mb), idx(kHidden)) {}

  // Forward pass; leaves the activations in `hidden` and, if want_grad, dL/dlogits (of the mean
  // loss) in `logits`.
  BatchResult run_forward(const ParamViews& p, std::span<const float> x, std::span<const std::int32_t> y,
                          bool want_grad) {
    for (std::size_t i = 0; i < kParamCount; ++i)
      if (p[i].size() != kParams[i].size())
        throw std::invalid_argument("MLP: " + std::string(kParams[i].name) + " has " + std::to_string(p[i].size()) +
                                    " elements, expected " + std::to_string(kParams[i].size()));
    const std::size_t b = y.size();
    if (b == 0) throw std::invalid_argument("MLP: empty batch");
    if (b > max_batch) throw std::invalid_argument("MLP: batch larger than the workspace");
    if (x.size() != b * kIn) throw std::invalid_argument("MLP: features must be batch * 784 floats");
    const ConstMap X(x.data(), idx(b), idx(kIn));
    auto H = hidden.topRows(idx(b));
    auto Z = logits.topRows(idx(b));

    H.noalias() = X * cmat(p, kFc1Weight).transpose();
    H.rowwise() += cvec(p, kFc1Bias);
    {
      float* h = hidden.data();  // row-major: the first b rows are contiguous
      for (std::size_t i = 0; i < b * kHidden; ++i) h[i] = h[i] > 0.0f ? h[i] : 0.0f;
    }
    Z.noalias() = H * cmat(p, kFc2Weight).transpose();
    Z.rowwise() += cvec(p, kFc2Bias);

    BatchResult r;
    r.rows = b;
    const float inv_b = 1.0f / static_cast<float>(b);
    double loss_sum = 0.0;
    for (std::size_t i = 0; i < b; ++i) {
      float* z = Z.row(idx(i)).data();
      const auto label = static_cast<std::size_t>(y[i]);
      if (y[i] < 0 || label >= kOut) throw std::invalid_argument("MLP: label out of range");
      std::size_t arg = 0;
      for (std::size_t k = 1; k < kOut; ++k) {
        if (z[k] > z[arg]) arg = k;
      }
      if (arg == label) ++r.correct;
      const float zmax = z[arg];
      float sum = 0.0f;
      for (std::size_t k = 0; k < kOut; ++k) sum += std::exp(z[k] - zmax);
      const float log_sum = std::log(sum);
      loss_sum += static_cast<double>(log_sum + zmax - z[label]);
      if (want_grad) {
        // d(mean loss)/dz = (softmax - onehot) / b
        for (std::size_t k = 0; k < kOut; ++k) {
          const float pk = std::exp(z[k] - zmax - log_sum);
          z[k] = (pk - (k == label ? 1.0f : 0.0f)) * inv_b;
        }
      }
    }
    r.loss = loss_sum / static_cast<double>(b);
    return r;
  }
};

Net::Net(std::size_t max_batch) : impl_(std::make_unique<Impl>(max_batch)) {
  if (max_batch == 0) throw std::invalid_argument("MLP: max_batch must be positive");
}
Net::~Net() = default;
Net::Net(Net&&) noexcept = default;
Net& Net::operator=(Net&&) noexcept = default;

std::size_t Net::max_batch() const { return impl_->max_batch; }

BatchResult Net::forward(const ParamViews& params, std::span<const float> x, std::span<const std::int32_t> y) {
  return impl_->run_forward(params, x, y, false);
}

BatchResult Net::forward_backward(const ParamViews& params, std::span<const float> x,
                                  std::span<const std::int32_t> y, Tensors& grads) {
  Impl& m = *impl_;
  const BatchResult r = m.run_forward(params, x, y, true);
  const Eigen::Index b = idx(y.size());
  const ConstMap X(x.data(), b, idx(kIn));
  const auto H = m.hidden.topRows(b);
  const auto dZ = m.logits.topRows(b);
  auto dH = m.dhidden.topRows(b);

  mmat(grads, kFc2Weight).noalias() = dZ.transpose() * H;
  mvec(grads, kFc2Bias) = dZ.colwise().sum();
  dH.noalias() = dZ * cmat(params, kFc2Weight);
  {
    const float* h = m.hidden.data();
    float* dh = m.dhidden.data();
    const std::size_t n = y.size() * kHidden;
    for (std::size_t i = 0; i < n; ++i) dh[i] = h[i] > 0.0f ? dh[i] : 0.0f;
  }
  mmat(grads, kFc1Weight).noalias() = dH.transpose() * X;
  mvec(grads, kFc1Bias) = dH.colwise().sum();
  return r;
}

EvalResult evaluate(const Tensors& params, std::uint64_t first, std::uint64_t count, std::size_t chunk) {
  if (chunk == 0) throw std::invalid_argument("evaluate: chunk must be positive");
  Net net(chunk);
  const data::Labeler labeler;
  std::vector<float> x(chunk * kIn);
  std::vector<std::int32_t> y(chunk);
  double loss_sum = 0.0;
  std::uint64_t correct = 0;
  for (std::uint64_t done = 0; done < count;) {
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(chunk, count - done));
    const std::span<float> xs(x.data(), n * kIn);
    const std::span<std::int32_t> ys(y.data(), n);
    data::fill_feature_range(first + done, n, xs);
    labeler.label_range(first + done, xs, ys);
    const BatchResult r = net.forward(params, xs, ys);
    loss_sum += r.loss * static_cast<double>(n);
    correct += r.correct;
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

void sgd_update(Tensors& params, const Tensors& grads, float lr) {
  for (std::size_t i = 0; i < kParamCount; ++i) {
    std::span<float> p = params[i];
    std::span<const float> g = grads[i];
    for (std::size_t j = 0; j < p.size(); ++j) p[j] -= lr * g[j];
  }
}

std::uint64_t weights_hash(const Tensors& params) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::size_t i = 0; i < kParamCount; ++i) {
    const std::span<const float> p = params[i];
    const auto* bytes = reinterpret_cast<const unsigned char*>(p.data());
    for (std::size_t j = 0; j < p.size_bytes(); ++j) {
      h ^= bytes[j];
      h *= 0x100000001b3ULL;
    }
  }
  return h;
}

}  // namespace shmps::mlp
