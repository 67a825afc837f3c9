#include "apply.hpp"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <span>

#include <shmps/server/optimizer.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/dtype.hpp>
#include <shmps/shm/key_index.hpp>
#include <shmps/shm/ring.hpp>

#include "apply_chunks.hpp"
#include "parallel.hpp"
#include "redo.hpp"

namespace shmps::server {

using namespace shmps::shm;

namespace {

// One slice's update in one round, through the applying thread's redo entry: chunk by chunk
// (apply_chunks.hpp) when the entry can name all its inputs, else computed whole in the entry
// and then copied in under the slice's seqlock (redo.hpp).
class SliceUpdate {
 public:
  SliceUpdate(Segment& segment, std::uint64_t slice_index, std::size_t thread)
      : segment_(segment), slice_index_(slice_index), slice_(segment.slice(slice_index)),
        param_(segment.param(slice_.param)), settings_(param_.optimizer), redo_(segment.redo(thread)),
        arrays_(state_arrays_of(param_)), elem_(segment.state_elem_bytes()),
        bf16_(settings_.state_dtype == StateDType::bf16), dtype_(param_.dtype), step_(slice_.step) {
    last_ = segment.redo_last_applied(redo_);
    values_ = segment.redo_values(redo_);
    for (int a = 0; a < 2; ++a) {
      state_[a] = a < arrays_ ? segment.redo_state(redo_, a) : nullptr;
      slice_state_[a] = a < arrays_ ? segment.state_bytes(param_, a) + slice_.first * elem_ : nullptr;
    }
    // A bf16 / fp16 parameter's values are 2-byte elements: never read as float32 in place
    // (copy_slice_to_redo widens them), so no float pointer into them.
    slice_values_ = dtype_ == DType::f32 ? segment.values(param_) + slice_.first : nullptr;
    std::memcpy(last_, &segment.last_applied(slice_index, 0), segment.header().max_workers * sizeof(std::uint64_t));
  }

  // ASP/SSP: one optimizer step per contribution, in order.
  void apply_each(std::span<const Contribution> contributions) {
    if (take_inputs(contributions, RedoMode::each)) return;
    for (const Contribution& c : contributions) {
      const Part part = part_of(c);
      if (!part.grad) continue;
      if (!in_redo_ && part.n == slice_.count && dtype_ == DType::f32) {
        // The first update that covers the whole slice reads the old values and state straight
        // from the segment and writes the new ones into the redo entry (one pass over the slice).
        update(part.grad, 0, part.n, part.scale, true);
        in_redo_ = true;
      } else {
        copy_slice_to_redo();  // any other first update (or 2-byte values: widened) needs the slice in the entry
        update(part.grad, part.lo, part.n, part.scale, false);
      }
      ++updates_;
    }
  }

  // BSP: the contributions summed in rank order (or their mean over the ranks), one step.
  void apply_sum(std::span<const Contribution> contributions, bool mean) {
    if (take_inputs(contributions, mean ? RedoMode::mean : RedoMode::sum)) return;
    thread_local std::vector<float> sum;
    std::uint64_t ranks = 0;
    std::int64_t last_rank = -1;
    for (const Contribution& c : contributions) {
      const Part part = part_of(c);
      if (!part.grad) continue;
      const bool first = ranks == 0;
      if (static_cast<std::int64_t>(c.rank) != last_rank) {
        ++ranks;
        last_rank = c.rank;
      }
      if (first && part.n == slice_.count) {  // the first whole-slice gradient starts the sum: no zeroing pass
        sum.resize(slice_.count);
        for (std::size_t k = 0; k < part.n; ++k) sum[k] = part.scale * part.grad[k];
        continue;
      }
      if (first) sum.assign(slice_.count, 0.0f);
      for (std::size_t k = 0; k < part.n; ++k) sum[part.lo + k] += part.scale * part.grad[k];
    }
    if (ranks == 0) return;
    if (mean) {
      const float inv = 1.0f / static_cast<float>(ranks);
      for (float& g : sum) g *= inv;
    }
    if (dtype_ != DType::f32) {
      copy_slice_to_redo();
      update(sum.data(), 0, slice_.count, 1.0f, false);
    } else {
      update(sum.data(), 0, slice_.count, 1.0f, true);
    }
    updates_ = 1;
  }

  // A table's slice: the rows of all contributions merged (a row's gradients summed in rank
  // order, within a record in its order; each scaled for clip_norm; `mean`: divided by the
  // ranks that contributed), then one optimizer step of each touched row, and no other row
  // (a lazy update). The touched rows go in through the redo entry (RedoMode::rows), or the
  // slice whole when the packed rows and their places would not fit the entry (nearly every
  // row touched).
  //
  // A keyed table (keys = "u64"): each touched row's KeySlot (its key and the update's stamp)
  // goes in with it, and a row whose key was admitted in this round starts from the key's init,
  // with zero optimizer state and row word (the slot's previous key's are gone).
  void apply_rows(std::span<const Contribution> contributions, std::span<const RowRef> row_refs,
                  std::span<const KeyedRow> keyed_rows, bool mean) {
    const std::uint64_t dim = param_.table_dim;
    thread_local std::vector<float> sum;
    thread_local std::vector<std::uint8_t> seen;
    thread_local std::vector<std::uint32_t> touched;
    thread_local std::vector<std::uint32_t> keyed_of;  // a keyed table: each touched row's RowRef::keyed
    sum.resize(slice_.count);
    seen.assign(slice_.count / dim, 0);
    const bool keyed = is_keyed(param_);
    if (keyed) keyed_of.resize(slice_.count / dim);
    touched.clear();
    std::uint64_t ranks = 0;
    std::int64_t last_rank = -1;
    for (const Contribution& c : contributions) {
      // Applied to this slice before a server restart: skipped, but for a keyed table's rows of
      // keys admitted in this round. Such a key held no slot when the round was read again, so
      // no slot had taken its rows of the round (a slot that had would name it: its KeySlot goes
      // in with its rows, and a key pushed in a round is never evicted in it); wherever it is
      // admitted now, its rows go in, once (keyed_tables.hpp).
      const bool applied_before = c.record->seq <= last_[c.rank];
      if (applied_before) {
        ++skipped_;
        if (!keyed) continue;
      } else {
        last_[c.rank] = c.record->seq;
      }
      bool counted = false;
      const float scale = static_cast<float>(clip_norm_scale(settings_, c.record->grad_sq_norm));
      const float* grads = record_payload(c.record);
      for (std::uint32_t j = 0; j < c.rows_count; ++j) {
        // Both from the collector's checks (RowRef), not from the ring again.
        const RowRef ref = row_refs[c.rows_begin + j];
        if (applied_before && !keyed_rows[ref.keyed - 1].fresh) continue;
        if (!counted && static_cast<std::int64_t>(c.rank) != last_rank) {
          ++ranks;
          last_rank = c.rank;
        }
        counted = true;
        floats_ += dim;
        const std::uint64_t local = ref.row;
        float* dst = sum.data() + local * dim;
        const float* g = grads + std::uint64_t{ref.index} * dim;
        if (!seen[local]) {
          seen[local] = 1;
          touched.push_back(static_cast<std::uint32_t>(local));
          if (keyed) keyed_of[local] = ref.keyed;
          for (std::uint64_t d = 0; d < dim; ++d) dst[d] = scale * g[d];
        } else {
          for (std::uint64_t d = 0; d < dim; ++d) dst[d] += scale * g[d];
        }
      }
    }
    if (touched.empty()) return;  // every contribution was applied before a restart
    if (mean && ranks > 1) {
      const float inv = 1.0f / static_cast<float>(ranks);
      for (const std::uint32_t local : touched)
        for (std::uint64_t d = 0; d < dim; ++d) sum[local * dim + d] *= inv;
    }
    const std::uint64_t step = ++step_;
    updates_ = 1;
    rows_ = touched.size();
    // Row words (ParamEntry::row_words_offset): lazy Adam's per-row step counts (each touched row
    // takes its own next step, so its bias correction counts the rounds that touched it), or
    // row-wise AdaGrad's per-row accumulators. They go through the redo entry with the rows.
    const bool words = param_.row_words_offset != 0;
    const std::uint64_t* slice_words = words ? segment_.row_words(param_) + slice_.first / dim : nullptr;
    std::uint64_t* new_words = words ? segment_.redo_row_words(redo_) : nullptr;
    KeySlot* new_keys = keyed ? segment_.redo_key_slots(redo_) : nullptr;
    // A keyed row: its new KeySlot at `at` in the entry, and (admitted now) its row at values_ +
    // lo, its state and its word started afresh.
    const auto start_keyed_row = [&](std::uint64_t local, std::uint64_t at, std::uint64_t lo) {
      const KeyedRow& k = keyed_rows[keyed_of[local] - 1];
      new_keys[at] = KeySlot{k.key, k.stamp};
      if (!k.fresh) return;
      keyed_init_row(param_.keyed_init, k.key, std::span<float>(values_ + lo, dim));
      for (int a = 0; a < arrays_; ++a) std::memset(state_[a] + lo * elem_, 0, dim * elem_);
      if (words) new_words[at] = 0;
    };
    if (touched.size() * (dim + 1) > slice_.count) {  // most of the slice: it goes in whole
      copy_slice_to_redo();
      read_slice_row_words(segment_, param_, slice_, redo_);  // every row's, the touched ones stepped below
      read_slice_key_slots(segment_, param_, slice_, redo_);  // the same for a keyed table's KeySlots
      for (const std::uint32_t local : touched) {
        if (keyed) start_keyed_row(local, local, local * dim);
        update_row(sum.data() + local * dim, local * dim, dim, words ? &new_words[local] : nullptr, step);
      }
      return;
    }
    // Only the touched rows, packed in the entry (RedoMode::rows), each read from the slice,
    // stepped, and (commit) written back: a row costs its own cache lines, not its slice's.
    mode_ = RedoMode::rows;
    auto* where = reinterpret_cast<std::uint32_t*>(values_ + touched.size() * dim);
    for (std::size_t i = 0; i < touched.size(); ++i) {
      const std::uint64_t local = touched[i];
      where[i] = static_cast<std::uint32_t>(local);
      if (dtype_ == DType::f32)
        std::memcpy(values_ + i * dim, slice_values_ + local * dim, dim * sizeof(float));
      else  // a 2-byte table's row, widened exactly
        widen(dtype_, segment_.values16(param_) + slice_.first + local * dim, values_ + i * dim, dim);
      for (int a = 0; a < arrays_; ++a)
        std::memcpy(state_[a] + i * dim * elem_, slice_state_[a] + local * dim * elem_, dim * elem_);
      if (words) new_words[i] = slice_words[local];
      if (keyed) start_keyed_row(local, i, i * dim);
      update_row(sum.data() + local * dim, i * dim, dim, words ? &new_words[i] : nullptr, step);
    }
  }

  // Streamed BSP: adds the contributions (each scaled for clip_norm) to the slice's sums of step
  // `step`, in rank order; the sums start from zero at a slice's first contribution of the step.
  void add_to_sums(std::span<const Contribution> contributions, std::uint64_t step) {
    const float* sums = segment_.step_sums(param_) + slice_.first;
    bool started = false;
    for (const Contribution& c : contributions) {
      const Part part = part_of(c);
      if (!part.grad) continue;
      if (!started) {
        started = true;
        if (slice_.sum_step == step + 1) {
          std::memcpy(values_, sums, slice_.count * sizeof(float));
        } else if (part.n == slice_.count) {  // the step's first whole-slice gradient: no zeroing pass
          for (std::size_t k = 0; k < part.n; ++k) values_[k] = part.scale * part.grad[k];
          ++updates_;
          continue;
        } else {
          std::fill_n(values_, slice_.count, 0.0f);
        }
      }
      for (std::size_t k = 0; k < part.n; ++k) values_[part.lo + k] += part.scale * part.grad[k];
      ++updates_;
    }
    sum_step_ = step + 1;
  }

  // Streamed BSP: one optimizer step with the slice's sums of step `step` (times `scale`: 1 for
  // "sum", 1 / ranks for "mean"), unless the slice holds no sums of that step or has had it
  // applied already (a server that died mid-step: its clock says so).
  void apply_sums(std::uint64_t step, float scale) {
    if (slice_.sum_step != step + 1 || load_own(slice_.clock) > step) return;
    updates_ = 1;  // its floats were counted when they were summed
    clock_after_ = step + 1;
    mode_ = RedoMode::sums;  // chunked: its only input is the step sums
    scale_ = scale;
    ++step_;
  }

  // Publishes the new sums through the redo entry (add_to_sums).
  void commit_sums() {
    if (updates_ == 0) return;
    redo_.target = RedoTarget::step_sums;
    redo_.mode = RedoMode::whole;
    redo_.slice = slice_index_;
    redo_.count = slice_.count;
    redo_.sum_step_after = sum_step_;
    store_release(redo_.valid, 1U);
    copy_in(segment_, redo_);
    store_release(redo_.valid, 0U);
  }

  // Publishes the new state through the redo entry, and the monitor's samples.
  void commit() {
    if (updates_ == 0) return;
    const std::uint64_t version_before = load_own(slice_.version);
    redo_.target = RedoTarget::values;
    redo_.mode = mode_;
    redo_.slice = slice_index_;
    redo_.count = slice_.count;
    redo_.version_after = version_before + 2 * updates_;
    redo_.step_after = step_;
    redo_.clock_after = clock_after_;
    // For the monitor: the slice's value norm, sampled every 8th update (and the first), from
    // the new values while they are still in this thread's cache.
    const bool sample = mode_ != RedoMode::rows &&  // (rows: the entry holds no whole slice to sample)
                        (version_before == 0 || version_before / 16 != redo_.version_after / 16);
    double sq = 0;
    if (mode_ == RedoMode::rows) {
      redo_.inputs = static_cast<std::uint32_t>(rows_);
      store_release(redo_.valid, 1U);  // from here on, a restarted server finishes this copy
      copy_in(segment_, redo_);
      store_release(redo_.valid, 0U);
    } else if (mode_ != RedoMode::whole) {
      redo_.inputs = static_cast<std::uint32_t>(parts_.size());
      redo_.scale = scale_;
      store_release(redo_.done, std::uint64_t{0});
      store_release(redo_.chunk_lo, kNoChunk);
      store_release(redo_.valid, 1U);  // from here on, a restarted server finishes this update
      run_chunks(segment_, redo_, parts_, sample ? &sq : nullptr);  // clears valid
    } else {
      store_release(redo_.valid, 1U);  // from here on, a restarted server finishes this copy
      copy_in(segment_, redo_);
      store_release(redo_.valid, 0U);
      if (sample) sq = squared_norm(std::span<const float>(values_, slice_.count));
    }
    if (sample) store_release(slice_.value_sq_norm, std::bit_cast<std::uint64_t>(sq));
  }

  // What this update adds to its parameter's monitor counters (ParamStats), which the engine
  // sums per thread and adds once per round (an atomic add per slice, from every apply thread
  // onto one line, costs more than a table's row).
  void count_into(ApplyEngine::ParamCounts& c) const noexcept {
    c.slice_updates += updates_;
    c.floats += floats_;
    c.rows += rows_;
  }
  std::uint64_t param() const noexcept { return slice_.param; }
  bool table() const noexcept { return param_.table_dim != 0; }
  std::uint64_t floats() const noexcept { return floats_; }
  std::uint64_t skipped() const noexcept { return skipped_; }

 private:
  // The part of a contribution's record inside this slice; grad == nullptr when the record was
  // applied to this slice before a server restart (exactly once: skipped).
  struct Part {
    const float* grad = nullptr;
    std::uint64_t lo = 0;  // relative to the slice's first element
    std::size_t n = 0;
    float scale = 1.0f;    // clip_norm
  };
  Part part_of(const Contribution& c) {
    if (c.record->seq <= last_[c.rank]) {
      ++skipped_;
      return {};
    }
    Part part;
    part.lo = std::max(slice_.first, c.record->offset) - slice_.first;
    const std::uint64_t hi = std::min(slice_.first + slice_.count, c.record->offset + c.record->count) - slice_.first;
    part.n = hi - part.lo;
    part.grad = record_payload(c.record) + (slice_.first + part.lo - c.record->offset);
    part.scale = static_cast<float>(clip_norm_scale(settings_, c.record->grad_sq_norm));
    last_[c.rank] = c.record->seq;
    floats_ += part.n;
    return part;
  }

  // The chunked path: takes the run's inputs (their parts, and their names in the redo entry)
  // and leaves the update to commit(); false if there are too many for the entry to name.
  bool take_inputs(std::span<const Contribution> contributions, RedoMode mode) {
    if (contributions.size() > redo_input_capacity(segment_.header().max_workers)) return false;
    thread_local std::vector<SlicePart> parts;
    parts.clear();
    RedoInput* inputs = segment_.redo_inputs(redo_);
    for (const Contribution& c : contributions) {
      const Part part = part_of(c);
      if (!part.grad) continue;
      const auto ring_offset = static_cast<std::uint64_t>(reinterpret_cast<const std::byte*>(c.record) -
                                                          segment_.ring_data(c.rank));
      inputs[parts.size()] = RedoInput{c.rank, 0, ring_offset, c.record->seq};
      parts.push_back(SlicePart{part.grad, part.lo, part.n, part.scale, c.rank});
    }
    parts_ = parts;
    mode_ = mode;
    const std::uint64_t steps = parts.empty() ? 0 : mode == RedoMode::each ? parts.size() : 1;
    step_ += steps;
    updates_ = steps;
    return true;
  }

  // State array a of the redo entry, elements [lo, lo + n), as T (float or bf16 bits).
  template <class T>
  std::span<T> state_span(int a, std::uint64_t lo, std::size_t n) const {
    return a < arrays_ ? std::span<T>(reinterpret_cast<T*>(state_[a]) + lo, n) : std::span<T>();
  }
  // The whole slice's state array a in the segment, as T.
  template <class T>
  std::span<const T> slice_state_span(int a) const {
    return a < arrays_ ? std::span<const T>(reinterpret_cast<const T*>(slice_state_[a]), slice_.count)
                       : std::span<const T>();
  }

  // One optimizer step of `grad` over the slice's elements [lo, lo + n), into the redo entry: from
  // the segment's slice (from_slice: the whole slice, lo = 0) or in place in the entry.
  void update(const float* grad, std::uint64_t lo, std::size_t n, float scale, bool from_slice) {
    const std::span<float> values(values_ + lo, n);
    const std::span<const float> g(grad, n);
    const std::uint64_t step = ++step_;
    if (bf16_) {
      const auto s0 = state_span<std::uint16_t>(0, lo, n), s1 = state_span<std::uint16_t>(1, lo, n);
      if (from_slice)
        apply_update_bf16(settings_, values, g, s0, s1, step, scale,
                          UpdateInputsBf16{{slice_values_, slice_.count}, slice_state_span<std::uint16_t>(0),
                                           slice_state_span<std::uint16_t>(1)});
      else
        apply_update_bf16(settings_, values, g, s0, s1, step, scale);
    } else {
      const auto s0 = state_span<float>(0, lo, n), s1 = state_span<float>(1, lo, n);
      if (from_slice)
        apply_update(settings_, values, g, s0, s1, step, scale,
                     UpdateInputs{{slice_values_, slice_.count}, slice_state_span<float>(0), slice_state_span<float>(1)});
      else
        apply_update(settings_, values, g, s0, s1, step, scale);
    }
    // A bf16 / fp16 parameter: the new values rounded to nearest even, once per optimizer step
    // (so the result does not depend on how pushes fall into rounds), and the entry then holds
    // exactly what copy_in narrows into the slice.
    round_to(dtype_, values.data(), n);
  }

  // One optimizer step of a table's row, `grad` over the redo entry's elements [lo, lo + n), in
  // place. `word`: the row's word in the redo entry (lazy Adam: its step count, taken one further
  // here; row-wise AdaGrad: its accumulator), or nullptr for an optimizer that keeps none (then
  // the slice's step number `step`).
  void update_row(const float* grad, std::uint64_t lo, std::size_t n, std::uint64_t* word, std::uint64_t step) {
    if (settings_.kind == OptimizerKind::rowwise_adagrad) {
      auto accumulator = std::bit_cast<double>(*word);
      apply_rowwise_adagrad(settings_, std::span<float>(values_ + lo, n), std::span<const float>(grad, n), accumulator);
      *word = std::bit_cast<std::uint64_t>(accumulator);
      return;
    }
    update_in_redo(grad, lo, n, word != nullptr ? ++*word : step);
  }

  // One optimizer step of `grad` over the redo entry's elements [lo, lo + n), in place, as step
  // number `step` of the slice (a table's row: apply_rows, through update_row). A 2-byte table's row is left
  // unrounded: it takes one step a round, and copy_in's narrowing is that step's one rounding (a
  // replay narrows the same entry to the same bytes), as the chunked path does.
  void update_in_redo(const float* grad, std::uint64_t lo, std::size_t n, std::uint64_t step) {
    const std::span<float> values(values_ + lo, n);
    const std::span<const float> g(grad, n);
    if (bf16_)
      apply_update_bf16(settings_, values, g, state_span<std::uint16_t>(0, lo, n), state_span<std::uint16_t>(1, lo, n),
                        step, 1.0f);
    else
      apply_update(settings_, values, g, state_span<float>(0, lo, n), state_span<float>(1, lo, n), step, 1.0f);
  }

  void copy_slice_to_redo() {
    if (in_redo_) return;
    read_slice_values(segment_, param_, slice_, values_);  // a 2-byte dtype widened, exactly
    for (int a = 0; a < arrays_; ++a) std::memcpy(state_[a], slice_state_[a], slice_.count * elem_);
    in_redo_ = true;
  }

  Segment& segment_;
  const std::uint64_t slice_index_;
  SliceEntry& slice_;
  const ParamEntry& param_;
  const OptimizerSettings settings_;  // the parameter's: the job's, or a table's own
  RedoEntry& redo_;
  const int arrays_;
  const std::uint64_t elem_;  // bytes per state element
  const bool bf16_;   // the optimizer state in bf16
  const DType dtype_;  // the values' dtype
  std::uint64_t step_;
  std::uint64_t* last_ = nullptr;  // the slice's exactly-once row, being updated in the redo entry
  float* values_ = nullptr;        // the new values, in the redo entry
  std::byte* state_[2] = {nullptr, nullptr};  // the new state, in the redo entry (state dtype)
  const float* slice_values_ = nullptr;  // the current values, in the segment
  const std::byte* slice_state_[2] = {nullptr, nullptr};
  bool in_redo_ = false;  // the redo entry holds the slice's current values and state
  RedoMode mode_ = RedoMode::whole;  // how commit() gets the update in
  std::span<const SlicePart> parts_;  // the chunked path's inputs
  float scale_ = 1.0f;                // RedoMode::sums: the factor on the step sums
  std::uint64_t updates_ = 0, floats_ = 0, skipped_ = 0;
  std::uint64_t rows_ = 0;  // a table's slice: the distinct rows updated (apply_rows)
  std::uint64_t sum_step_ = 0, clock_after_ = 0;
};

}  // namespace

void ApplyEngine::sort_into_runs(std::vector<Contribution>& contributions) {
  std::stable_sort(contributions.begin(), contributions.end(),
                   [](const Contribution& a, const Contribution& b) { return a.slice < b.slice; });
  run_starts_.clear();
  for (std::size_t i = 0; i < contributions.size(); ++i)
    if (i == 0 || contributions[i].slice != contributions[i - 1].slice) run_starts_.push_back(i);
  run_starts_.push_back(contributions.size());
}

void ApplyEngine::begin_counts() {
  const std::size_t threads = static_cast<std::size_t>(arena_->max_concurrency()) + 1;
  const std::uint32_t params = segment_->header().param_count;
  if (counts_.size() != threads) counts_.resize(threads);
  for (ThreadCounts& t : counts_) {
    t.floats = t.skipped = 0;
    t.params.assign(params, ParamCounts{});
  }
}

ApplyTotals ApplyEngine::end_counts() {
  ApplyTotals totals;
  const std::uint32_t params = segment_->header().param_count;
  for (std::uint32_t i = 0; i < params; ++i) {
    ParamCounts sum;
    for (const ThreadCounts& t : counts_) {
      sum.slice_updates += t.params[i].slice_updates;
      sum.floats += t.params[i].floats;
      sum.rows += t.params[i].rows;
    }
    if (sum.slice_updates == 0 && sum.floats == 0) continue;
    ParamStats& stats = segment_->param_stats(i);
    stats.slice_updates.fetch_add(sum.slice_updates, std::memory_order_relaxed);
    stats.floats_applied.fetch_add(sum.floats, std::memory_order_relaxed);
    if (sum.rows != 0) {  // a table: also the distinct rows of this round
      stats.rows_updated.fetch_add(sum.rows, std::memory_order_relaxed);
      store_release(stats.round_rows, sum.rows);
    }
  }
  for (const ThreadCounts& t : counts_) {
    totals.floats += t.floats;
    totals.skipped += t.skipped;
  }
  return totals;
}

template <class Update>
ApplyTotals ApplyEngine::for_each_slice_run(std::vector<Contribution>& contributions, Update&& update_slice,
                                            bool count_params) {
  if (contributions.empty()) return {};
  sort_into_runs(contributions);
  begin_counts();
  const std::size_t runs = run_starts_.size() - 1;
  const std::uint64_t workers = segment_->header().max_workers;
  parallel_for_ranges(*arena_, runs, [&](std::size_t first, std::size_t last, std::size_t thread) {
    ThreadCounts& mine_counts = counts_[std::min(thread, counts_.size() - 1)];
    for (std::size_t run = first; run < last; ++run) {
      // Many small slices (a table's rows, scattered): each costs a few cache misses (its slice
      // entry, its exactly-once row, its values), so fetch those of a slice a few runs ahead.
      if (run + kPrefetchRuns < last) {
        const Contribution& next = contributions[run_starts_[run + kPrefetchRuns]];
        __builtin_prefetch(&segment_->slice(next.slice));
        __builtin_prefetch(&segment_->last_applied(next.slice, 0));
        if (workers > 8) __builtin_prefetch(&segment_->last_applied(next.slice, 8));
        if (next.rows_count != 0) {  // a table's slice: its first row's values (all from the segment and the plan)
          const SliceEntry& slice = segment_->slice(next.slice);
          const ParamEntry& table = segment_->param(slice.param);
          __builtin_prefetch(reinterpret_cast<const std::byte*>(segment_->values16(table)) +
                             (slice.first + row_refs_[next.rows_begin].row * table.table_dim) * dtype_bytes(table.dtype));
        }
      }
      const std::size_t begin = run_starts_[run], end = run_starts_[run + 1];
      const std::span<const Contribution> mine(contributions.data() + begin, end - begin);
      SliceUpdate update(*segment_, mine.front().slice, thread);
      update_slice(update, mine);
      mine_counts.floats += update.floats();
      mine_counts.skipped += update.skipped();
      if (count_params) update.count_into(mine_counts.params[update.param()]);
    }
  });
  return end_counts();
}

ApplyTotals ApplyEngine::apply(std::vector<Contribution>& contributions, Aggregation aggregation,
                               std::span<const RowRef> row_refs, std::span<const KeyedRow> keyed_rows) {
  row_refs_ = row_refs;
  return for_each_slice_run(contributions, [&](SliceUpdate& update, std::span<const Contribution> mine) {
    if (update.table())  // a table's slice gets rows only (collect.hpp); asked of the segment, not the ring
      update.apply_rows(mine, row_refs, keyed_rows, aggregation == Aggregation::mean);
    else if (aggregation == Aggregation::each)
      update.apply_each(mine);
    else
      update.apply_sum(mine, aggregation == Aggregation::mean);
    update.commit();
  });
}

ApplyTotals ApplyEngine::add_to_step_sums(std::vector<Contribution>& contributions, std::uint64_t step) {
  // Summing is not an optimizer step: the parameters' counters count the step (apply_step_sums).
  return for_each_slice_run(
      contributions,
      [&](SliceUpdate& update, std::span<const Contribution> mine) {
        update.add_to_sums(mine, step);
        update.commit_sums();
      },
      false);
}

ApplyTotals ApplyEngine::apply_step_sums(std::uint64_t step, float scale) {
  begin_counts();
  parallel_for_index(*arena_, segment_->header().slice_count, [&](std::size_t slice, std::size_t thread) {
    if (segment_->slice(slice).sum_step != step + 1) return;  // no push of the step touched it
    SliceUpdate update(*segment_, slice, thread);
    update.apply_sums(step, scale);
    update.commit();
    ThreadCounts& mine_counts = counts_[std::min(thread, counts_.size() - 1)];
    mine_counts.floats += update.floats();
    update.count_into(mine_counts.params[update.param()]);
  });
  return end_counts();
}

}  // namespace shmps::server
