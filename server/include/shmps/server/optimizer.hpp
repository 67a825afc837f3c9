// The server-side optimizers: pure math over float spans, no knowledge of the segment.
//
// The server applies one gradient to one slice of one parameter at a time. A push's gradient
// is preprocessed as PyTorch's optimizers do it, then the optimizer's step is applied:
//
//   g = grad * grad_scale                      (grad_scale: clip-by-norm scale, averaging, ...)
//   g = clamp(g, -clip_value, clip_value)      if clip_value > 0
//   g = g + weight_decay * p                   if weight_decay > 0 (L2, not AdamW)
//   sgd       p -= lr * g
//   momentum  v = mu * v + g;             p -= lr * v              (dampening 0)
//   nesterov  v = mu * v + g;             p -= lr * (g + mu * v)
//   adagrad   s += g^2;                   p -= lr * g / (sqrt(s) + eps)
//   rmsprop   s = rho * s + (1 - rho) g^2; p -= lr * g / (sqrt(s) + eps)
//   adam      m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//             p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps),  t = step (1-based)
//   rowwise_adagrad (a table's row of dim elements, one accumulator s for the whole row):
//             s += mean(g^2 over the row);  p -= lr * g / (sqrt(s) + eps)
//
// State arrays start at zero (so the first momentum step gives v = g, as PyTorch's does).
// All arithmetic is float32 (row-wise AdaGrad's accumulator and its factor are doubles); plain
// SGD with lr = 1 is exact: p - 1*g == p - g.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "shmps/shm/settings.hpp"

namespace shmps::server {

// The factor by which a push's gradient is scaled so that its L2 norm is at most clip_norm:
// 1 when clip_norm is 0 (off) or sqrt(grad_squared_norm) <= clip_norm, else
// clip_norm / sqrt(grad_squared_norm). grad_squared_norm is the sum of squares over the whole
// push (see squared_norm). Gradients must be finite: reject NaN/Inf before calling this
// (a NaN norm yields 1, an infinite one 0).
double clip_norm_scale(const OptimizerSettings& s, double grad_squared_norm);

// Sum of squares of grad: float sums of blocks of 1024, added up in double (vectorised).
// Sum it over the slices of a push and pass the total to clip_norm_scale.
double squared_norm(std::span<const float> grad);

// One optimizer step on one slice, in place: values, state0, state1 are updated.
//   values, grad       same size (any size; 64-byte aligned pointers take the aligned path)
//   state0, state1     optimizer_state_arrays(s.kind) of them have values.size() elements, the
//                      others are empty: momentum/nesterov: state0 = v; adagrad/rmsprop:
//                      state0 = s; adam: state0 = m, state1 = v.
//   step               1-based number of this update of this slice (used by adam; >= 1).
//   grad_scale         multiplies the gradient first (pass 1 for none; exactness is kept).
// Throws std::invalid_argument on a size mismatch, a bad kind, or adam with step 0. The
// settings are assumed valid (validate_optimizer_settings).
void apply_update(const OptimizerSettings& s, std::span<float> values, std::span<const float> grad,
                  std::span<float> state0, std::span<float> state1, std::uint64_t step,
                  float grad_scale);

// Where an out-of-place update reads the old values and state (the same sizes as the outputs).
struct UpdateInputs {
  std::span<const float> values, state0, state1;
};

// The same step out of place: reads the old values and state from `old`, writes the new ones to
// values, state0, state1 (which may also be the same arrays). The server computes a slice's new
// values into its redo entry this way, straight from the segment, instead of first copying the
// slice there: one pass less over the slice per apply.
void apply_update(const OptimizerSettings& s, std::span<float> values, std::span<const float> grad,
                  std::span<float> state0, std::span<float> state1, std::uint64_t step,
                  float grad_scale, const UpdateInputs& old);

// The same steps with the state stored as bfloat16 (StateDType::bf16, shm/bf16.hpp): each state
// element is widened exactly to float32, the step is computed in float32 as above, and the new
// state is rounded to the nearest bf16 (ties to even) when stored. The new values are computed
// from the unrounded new state, so a step from a state that bf16 holds exactly (e.g. the zero
// state of the first step) gives the float32 path's values (to within an ulp: the loops differ
// in where the compiler fuses multiply-adds). Sizes and errors as above;
// the state arrays need no alignment. Out of place, every old array is distinct from every new
// one; in place, all of them are the new ones (a mix throws std::invalid_argument).
struct UpdateInputsBf16 {
  std::span<const float> values;
  std::span<const std::uint16_t> state0, state1;
};
void apply_update_bf16(const OptimizerSettings& s, std::span<float> values, std::span<const float> grad,
                       std::span<std::uint16_t> state0, std::span<std::uint16_t> state1, std::uint64_t step,
                       float grad_scale);
void apply_update_bf16(const OptimizerSettings& s, std::span<float> values, std::span<const float> grad,
                       std::span<std::uint16_t> state0, std::span<std::uint16_t> state1, std::uint64_t step,
                       float grad_scale, const UpdateInputsBf16& old);

// One row-wise AdaGrad step of one table row, in place: `row` and `grad` have the row's dim
// elements, `accumulator` is the row's (starts at 0). The gradient is clamped and weight-decayed
// as above (it arrives already scaled). Throws std::invalid_argument on a size mismatch or
// another kind.
void apply_rowwise_adagrad(const OptimizerSettings& s, std::span<float> row, std::span<const float> grad,
                           double& accumulator);

// For tests: where the build has AVX-512 BF16 (-march=native on such a CPU), Adam's bf16 loop
// rounds with that instruction set; use_bf16_instructions(false) makes it take the portable
// loop instead (both give the same bytes). Returns whether the build has the instructions. Not
// for use while another thread applies.
bool use_bf16_instructions(bool on) noexcept;

// ---- Validation (header-only, so the model-spec parser uses the same rules) ----------------

namespace detail {
template <class T>  // float or double: shown with the fewest digits that read back exactly
std::string format_number(T v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

template <class T>
std::string optimizer_field_problem(std::string_view field, T value) {
  const double v = static_cast<double>(value);
  if (field == "lr" || field == "eps") {
    if (!(v > 0) || !std::isfinite(v))
      return "must be a positive number, got " + format_number(value);
  } else if (field == "momentum" || field == "beta1" || field == "beta2" || field == "rho") {
    if (!(v >= 0 && v < 1)) return "must be in [0, 1), got " + format_number(value);
  } else if (field == "weight_decay" || field == "clip_value" || field == "clip_norm") {
    if (!(v >= 0) || !std::isfinite(v)) {
      return "must be a non-negative number (0 = off), got " + format_number(value);
    }
  } else {
    return "unknown optimizer field";
  }
  return {};
}
}  // namespace detail

// The rule for one numeric field of OptimizerSettings, by its name ("lr", "momentum", "beta1",
// "beta2", "rho", "eps", "weight_decay", "clip_value", "clip_norm"). Returns "" if value is
// allowed, else the problem, e.g. "must be a positive number, got -0.1":
//   lr > 0; eps > 0; momentum, beta1, beta2, rho in [0, 1); weight_decay, clip_value,
//   clip_norm >= 0 (0 = off); everything finite.
inline std::string optimizer_field_problem(std::string_view field, double value) {
  return detail::optimizer_field_problem(field, value);
}

// Checks settings as stored (e.g. read back from a segment header). Returns "" if they are
// usable, else the first problem as "<field>: <problem>", e.g. "lr: must be a positive number,
// got -0.1". Every numeric field is checked, whether or not the kind uses it.
inline std::string validate_optimizer_settings(const OptimizerSettings& s) {
  if (static_cast<std::uint32_t>(s.kind) > static_cast<std::uint32_t>(kLastOptimizerKind)) {
    return "kind: unknown optimizer kind " + std::to_string(static_cast<std::uint32_t>(s.kind)) +
           "; valid kinds: sgd, momentum, nesterov, adagrad, rmsprop, adam, rowwise_adagrad (tables)";
  }
  const std::pair<std::string_view, float> fields[] = {{"lr", s.lr},
                                                       {"momentum", s.momentum},
                                                       {"beta1", s.beta1},
                                                       {"beta2", s.beta2},
                                                       {"rho", s.rho},
                                                       {"eps", s.eps},
                                                       {"weight_decay", s.weight_decay},
                                                       {"clip_value", s.clip_value},
                                                       {"clip_norm", s.clip_norm}};
  for (const auto& [name, v] : fields) {
    std::string problem = detail::optimizer_field_problem(name, v);
    if (!problem.empty()) return std::string(name) + ": " + problem;
  }
  if (static_cast<std::uint32_t>(s.state_dtype) > static_cast<std::uint32_t>(StateDType::bf16))
    return "state_dtype: unknown state dtype " + std::to_string(static_cast<std::uint32_t>(s.state_dtype)) +
           "; valid: f32, bf16";
  return {};
}

}  // namespace shmps::server
