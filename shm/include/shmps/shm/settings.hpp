// Job settings that live in the segment header (written by the server at creation, read by
// everyone). Plain, fixed-width, standard-layout: they are part of the shared layout, so any
// change here changes the layout fingerprint (see layout.hpp).
#pragma once

#include <cstdint>
#include <string_view>
#include <type_traits>

namespace shmps {

// rowwise_adagrad is a table's optimizer only: one AdaGrad accumulator per row instead of per
// element (the "row-wise AdaGrad" of embedding trainers), kept in the table's row words.
enum class OptimizerKind : std::uint32_t {
  sgd = 0, momentum = 1, nesterov = 2, adagrad = 3, rmsprop = 4, adam = 5, rowwise_adagrad = 6
};
constexpr OptimizerKind kLastOptimizerKind = OptimizerKind::rowwise_adagrad;

// How the optimizer's state arrays are stored in the segment (and in the redo entries): float32,
// or bfloat16 (the upper 16 bits of a float32, rounded to nearest even on store, widened exactly
// on load; the math stays float32). bf16 halves the state's memory and its traffic per apply.
enum class StateDType : std::uint32_t { f32 = 0, bf16 = 1 };

// Settings of the server-side optimizer. A value of 0 for clip_value / clip_norm means "off".
// Weight decay is L2 (added to the gradient before the update), as PyTorch's optimizers do.
struct OptimizerSettings {
  OptimizerKind kind = OptimizerKind::sgd;
  float lr = 0.01f;
  float momentum = 0.9f;      // momentum, nesterov
  float beta1 = 0.9f;         // adam
  float beta2 = 0.999f;       // adam
  float rho = 0.99f;          // rmsprop's decay of the squared-gradient average
  float eps = 1e-8f;          // adagrad, rmsprop, adam
  float weight_decay = 0.0f;  // L2 coefficient
  float clip_value = 0.0f;    // clamp each gradient element to [-clip_value, clip_value]
  float clip_norm = 0.0f;     // scale a push's gradient so its L2 norm is at most clip_norm
  StateDType state_dtype = StateDType::f32;  // momentum, nesterov, adagrad, rmsprop, adam
  std::uint32_t reserved[5] = {};
};
// Its field list, for the layout fingerprint (layout.hpp). OptimizerSettings stays a copyable
// value: it is written once at creation, and the server and the checkpoint code copy it out.
#define SHMPS_OPTIMIZER_SETTINGS_FIELDS(FIELD, PAD)                                                  \
  FIELD(kind) FIELD(lr) FIELD(momentum) FIELD(beta1) FIELD(beta2) FIELD(rho) FIELD(eps) FIELD(weight_decay) \
  FIELD(clip_value) FIELD(clip_norm) FIELD(state_dtype) FIELD(reserved)
static_assert(std::is_standard_layout_v<OptimizerSettings>);
static_assert(sizeof(OptimizerSettings) == 64);

enum class Consistency : std::uint32_t { asp = 0, bsp = 1, ssp = 2 };

// BSP: how the gradients of one step are combined before the optimizer runs once.
enum class BspAggregate : std::uint32_t { sum = 0, mean = 1 };

// What a barrier (BSP) or a staleness bound (SSP) does when a worker's death is proven: go on
// without it, or wait for a process to take its slot again.
enum class OnWorkerDeath : std::uint32_t { proceed = 0, wait = 1 };

// How many float arrays of the parameter's size the optimizer keeps per parameter.
constexpr int optimizer_state_arrays(OptimizerKind kind) noexcept {
  switch (kind) {
    case OptimizerKind::sgd: return 0;
    case OptimizerKind::momentum:
    case OptimizerKind::nesterov:
    case OptimizerKind::adagrad:
    case OptimizerKind::rmsprop: return 1;
    case OptimizerKind::adam: return 2;
    case OptimizerKind::rowwise_adagrad: return 0;  // its state is one word per row (below)
  }
  return 0;
}

// Whether the optimizer keeps one 8-byte word per row of a table (ParamEntry::row_state_offset):
// lazy Adam its rows' step counts (std::uint64_t), row-wise AdaGrad its rows' accumulators (a
// double each). Dense parameters have no rows and keep none.
constexpr bool optimizer_row_words(OptimizerKind kind) noexcept {
  return kind == OptimizerKind::adam || kind == OptimizerKind::rowwise_adagrad;
}

// Bytes per element of an optimizer state array.
constexpr std::uint64_t state_dtype_bytes(StateDType d) noexcept { return d == StateDType::bf16 ? 2 : 4; }

constexpr std::string_view to_string(StateDType d) noexcept {
  switch (d) {
    case StateDType::f32: return "f32";
    case StateDType::bf16: return "bf16";
  }
  return "?";
}

constexpr std::string_view to_string(OptimizerKind kind) noexcept {
  switch (kind) {
    case OptimizerKind::sgd: return "sgd";
    case OptimizerKind::momentum: return "momentum";
    case OptimizerKind::nesterov: return "nesterov";
    case OptimizerKind::adagrad: return "adagrad";
    case OptimizerKind::rmsprop: return "rmsprop";
    case OptimizerKind::adam: return "adam";
    case OptimizerKind::rowwise_adagrad: return "rowwise_adagrad";
  }
  return "?";
}

constexpr std::string_view to_string(BspAggregate a) noexcept { return a == BspAggregate::sum ? "sum" : "mean"; }
constexpr std::string_view to_string(OnWorkerDeath d) noexcept { return d == OnWorkerDeath::proceed ? "proceed" : "wait"; }

constexpr std::string_view to_string(Consistency c) noexcept {
  switch (c) {
    case Consistency::asp: return "asp";
    case Consistency::bsp: return "bsp";
    case Consistency::ssp: return "ssp";
  }
  return "?";
}

}  // namespace shmps
