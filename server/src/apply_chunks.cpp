#include "apply_chunks.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/optimizer.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/dtype.hpp>
#include <shmps/shm/killpoint.hpp>
#include <shmps/shm/ring.hpp>
#include <shmps/shm/seqlock.hpp>

namespace shmps::server {

using namespace shmps::shm;

namespace {

// One slice's chunked update: the slice's arrays in the segment, the entry's arrays (one chunk
// each), and the update's inputs.
class Chunks {
 public:
  Chunks(Segment& segment, RedoEntry& entry, std::span<const SlicePart> parts)
      : segment_(segment), entry_(entry), slice_(segment.slice(entry.slice)), param_(segment.param(slice_.param)),
        settings_(param_.optimizer), arrays_(state_arrays_of(param_)),
        elem_(segment.state_elem_bytes()), bf16_(settings_.state_dtype == StateDType::bf16), dtype_(param_.dtype),
        parts_(parts), step_before_(slice_.step) {
    // A bf16 / fp16 parameter's values are 2-byte elements: read through old_values() (widened),
    // written by copy_pending() (narrowed); no float pointer into them.
    if (dtype_ == DType::f32)
      values_ = segment.values(param_) + slice_.first;
    else
      values16_ = segment.values16(param_) + slice_.first;
    new_values_ = segment.redo_values(entry);
    for (int a = 0; a < arrays_; ++a) {
      state_[a] = segment.state_bytes(param_, a) + slice_.first * elem_;
      new_state_[a] = segment.redo_state(entry, a);
    }
    if (entry.mode == RedoMode::mean) {
      std::int64_t last_rank = -1;
      for (const SlicePart& part : parts) {
        if (static_cast<std::int64_t>(part.rank) != last_rank) ++ranks_;
        last_rank = part.rank;
      }
    }
  }

  // Copies the pending chunk (the entry's arrays) into the slice. Idempotent.
  void copy_pending() {
    const std::uint64_t lo = load_own(entry_.chunk_lo);
    const std::uint64_t n = entry_.chunk_count;
    begin_write();
    const std::uint64_t half = n / 2;
    copy_values(lo, 0, half);
    // Killed here: the slice is torn inside this chunk; the next server copies it again.
    if (lo <= entry_.count / 2 && entry_.count / 2 < lo + n) kill_point("apply.mid_copy");
    copy_values(lo, half, n - half);
    for (int a = 0; a < arrays_; ++a) std::memcpy(state_[a] + lo * elem_, new_state_[a], n * elem_);
  }

  // Every chunk from entry.done to the end of the slice, then the slice's words.
  void run(double* value_sq_norm) {
    const std::uint64_t count = entry_.count;
    const std::uint64_t chunk = std::min<std::uint64_t>(kApplyChunkFloats, segment_.header().slice_floats);
    for (std::uint64_t lo = load_own(entry_.done); lo < count; lo += chunk) {
      const std::uint64_t n = std::min(chunk, count - lo);
      if (compute(lo, n)) {
        entry_.chunk_count = n;
        store_release(entry_.chunk_lo, lo);  // the entry's arrays hold the chunk
        keep_order();                        // ... before any of it reaches the slice
        copy_pending();
        if (value_sq_norm != nullptr) *value_sq_norm += squared_norm(std::span<const float>(new_values_, n));
        // Killed between chunks: the slice holds new values below lo + n and old ones above.
        if (lo < count / 2 && count / 2 <= lo + n) kill_point("apply.mid_chunks");
      } else if (value_sq_norm != nullptr) {
        *value_sq_norm += squared_norm(std::span<const float>(old_values(lo, n), n));  // unchanged, still counted
      }
      keep_order();  // the chunk is in the slice before the entry says so
      store_release(entry_.done, lo + n);
      store_release(entry_.chunk_lo, kNoChunk);
      keep_order();  // ... and the entry lets go of its arrays before the next chunk is computed into them
    }
    begin_write();  // a slice no input touched (each) still gets its new row and version
    std::memcpy(&segment_.last_applied(entry_.slice, 0), segment_.redo_last_applied(entry_),
                segment_.header().max_workers * sizeof(std::uint64_t));
    slice_.step = entry_.step_after;
    if (entry_.clock_after != 0) store_release(slice_.clock, entry_.clock_after);
    store_release(slice_.version, entry_.version_after);
    store_release(entry_.valid, 0U);
  }

 private:
  // What a kill can see is the order of this thread's stores in the program: release stores order
  // only the stores before them, so the stores after them must not be moved up by the compiler.
  static void keep_order() noexcept { std::atomic_signal_fence(std::memory_order_seq_cst); }

  // The slice's version word goes odd before the first element changes (a replay finds it odd).
  void begin_write() {
    if ((load_own(slice_.version) & 1U) == 0) seqlock_write_begin(slice_.version);
  }

  // The slice's (old) values [lo, lo + n) as float32: in place, or a 2-byte dtype's widened
  // (exactly) into old_.
  const float* old_values(std::uint64_t lo, std::uint64_t n) {
    if (values_ != nullptr) return values_ + lo;
    widen(dtype_, values16_ + lo, old_, n);
    return old_;
  }

  // The entry's new values [k, k + n) into slice elements [lo + k, ...): copied, or a 2-byte
  // dtype's narrowed (rounded to nearest even: the step's one rounding, see update()).
  void copy_values(std::uint64_t lo, std::uint64_t k, std::uint64_t n) {
    if (values_ != nullptr)
      std::memcpy(values_ + lo + k, new_values_ + k, n * sizeof(float));
    else
      narrow(dtype_, new_values_ + k, values16_ + lo + k, n);
  }

  void copy_old_to_entry(std::uint64_t lo, std::uint64_t n) {
    std::memcpy(new_values_, old_values(lo, n), n * sizeof(float));
    for (int a = 0; a < arrays_; ++a) std::memcpy(new_state_[a], state_[a] + lo * elem_, n * elem_);
  }

  // One optimizer step of `grad` over the entry's chunk elements [k, k + m), for slice elements
  // [lo + k, lo + k + m): from the old values and state in the slice (from_slice: the whole
  // chunk, k = 0), or in place in the entry.
  // A bf16 / fp16 parameter's values are rounded to its dtype once per step, as the whole path
  // rounds them (apply.cpp): a step in place in the entry first rounds what an earlier step left
  // there, and copy_values narrows the last step's values (rounding them, the same bytes on a
  // replay, which narrows the same entry). One rounding a step, not two.
  void update(const float* grad, std::uint64_t lo, std::uint64_t k, std::uint64_t m, std::uint64_t step, float scale,
              bool from_slice) {
    if (!from_slice) round_to(dtype_, new_values_ + k, m);
    if (bf16_)
      update_as<std::uint16_t, UpdateInputsBf16>(grad, lo, k, m, step, scale, from_slice);
    else
      update_as<float, UpdateInputs>(grad, lo, k, m, step, scale, from_slice);
  }
  template <class T, class Inputs>
  void update_as(const float* grad, std::uint64_t lo, std::uint64_t k, std::uint64_t m, std::uint64_t step,
                 float scale, bool from_slice) {
    const auto state = [&](std::byte* const* arrays, int a, std::uint64_t at) {
      return a < arrays_ ? std::span<T>(reinterpret_cast<T*>(arrays[a]) + at, m) : std::span<T>();
    };
    const std::span<float> values(new_values_ + k, m);
    const std::span<const float> g(grad, m);
    const std::span<T> s0 = state(new_state_, 0, k), s1 = state(new_state_, 1, k);
    if (!from_slice) {
      if constexpr (std::is_same_v<T, float>)
        apply_update(settings_, values, g, s0, s1, step, scale);
      else
        apply_update_bf16(settings_, values, g, s0, s1, step, scale);
      return;
    }
    const Inputs old{{old_values(lo, m), m}, state(state_, 0, lo), state(state_, 1, lo)};
    if constexpr (std::is_same_v<T, float>)
      apply_update(settings_, values, g, s0, s1, step, scale, old);
    else
      apply_update_bf16(settings_, values, g, s0, s1, step, scale, old);
  }

  // The new values and state of slice elements [lo, lo + n) into the entry's arrays; false if
  // the update leaves them as they are (mode each, no input reaches them).
  bool compute(std::uint64_t lo, std::uint64_t n) {
    switch (entry_.mode) {
      case RedoMode::each: return compute_each(lo, n);
      case RedoMode::sum:
      case RedoMode::mean: return compute_sum(lo, n);
      case RedoMode::sums: {
        update(segment_.step_sums(param_) + slice_.first + lo, lo, 0, n, step_before_ + 1, entry_.scale, true);
        return true;
      }
      case RedoMode::whole:
      case RedoMode::rows: break;
    }
    throw Error("redo entry of slice " + std::to_string(entry_.slice) + " has no chunked mode");
  }

  // One optimizer step per input, in order; the first one that covers the chunk reads the old
  // values straight from the slice (one pass), any other first one needs them copied first.
  bool compute_each(std::uint64_t lo, std::uint64_t n) {
    bool first = true;
    for (std::size_t i = 0; i < parts_.size(); ++i) {
      const SlicePart& part = parts_[i];
      const std::uint64_t from = std::max(lo, part.lo), to = std::min(lo + n, part.lo + part.n);
      if (from >= to) continue;
      const float* grad = part.grad + (from - part.lo);
      const std::uint64_t step = step_before_ + i + 1;
      if (first && from == lo && to == lo + n) {
        update(grad, lo, 0, n, step, part.scale, true);
      } else {
        if (first) copy_old_to_entry(lo, n);
        update(grad, lo, from - lo, to - from, step, part.scale, false);
      }
      first = false;
    }
    return !first;
  }

  // BSP: the inputs summed in order (or their mean over the ranks), one optimizer step; every
  // chunk gets the step, a chunk no input reaches with a zero gradient (as a whole-slice sum).
  bool compute_sum(std::uint64_t lo, std::uint64_t n) {
    bool started = false;
    for (const SlicePart& part : parts_) {
      const std::uint64_t from = std::max(lo, part.lo), to = std::min(lo + n, part.lo + part.n);
      if (from >= to) continue;
      const float* grad = part.grad + (from - part.lo);
      if (!started && from == lo && to == lo + n) {  // no zeroing pass
        for (std::uint64_t k = 0; k < n; ++k) sum_[k] = part.scale * grad[k];
        started = true;
        continue;
      }
      if (!started) std::fill_n(sum_, n, 0.0f);
      started = true;
      for (std::uint64_t k = 0; k < to - from; ++k) sum_[from - lo + k] += part.scale * grad[k];
    }
    if (!started) std::fill_n(sum_, n, 0.0f);
    if (entry_.mode == RedoMode::mean && ranks_ > 0) {
      const float inv = 1.0f / static_cast<float>(ranks_);
      for (std::uint64_t k = 0; k < n; ++k) sum_[k] *= inv;
    }
    update(sum_, lo, 0, n, step_before_ + 1, 1.0f, true);
    return true;
  }

  Segment& segment_;
  RedoEntry& entry_;
  SliceEntry& slice_;
  const ParamEntry& param_;
  const OptimizerSettings settings_;
  const int arrays_;
  const std::uint64_t elem_;  // bytes per state element: the segment's state dtype
  const bool bf16_;
  const DType dtype_;  // the values' dtype
  const std::span<const SlicePart> parts_;
  const std::uint64_t step_before_;  // the slice's step count: it changes only once the slice is done
  std::uint64_t ranks_ = 0;          // mode mean: the ranks among the inputs
  float* values_ = nullptr;              // the slice's values: float32
  std::uint16_t* values16_ = nullptr;    // ... or a bf16 / fp16 parameter's
  std::byte* state_[2] = {nullptr, nullptr};  // the slice's state arrays, in the state dtype
  float* new_values_ = nullptr;
  std::byte* new_state_[2] = {nullptr, nullptr};
  alignas(64) float sum_[kApplyChunkFloats];
  alignas(64) float old_[kApplyChunkFloats];  // a 2-byte dtype's old values of one chunk, widened
};

// The slice's part of input i of the entry, found in its ring; throws if the ring no longer holds it.
SlicePart part_from_input(Segment& segment, RedoEntry& entry, const RedoInput& input) {
  const SegmentHeader& h = segment.header();
  const SliceEntry& slice = segment.slice(entry.slice);
  const auto damaged = [&](const std::string& what) {
    return Error("segment '" + std::string(h.name) + "': the previous server died while applying slice " +
                 std::to_string(entry.slice) + ", and its redo entry names push " + std::to_string(input.seq) +
                 " of worker " + std::to_string(input.rank) + ", but " + what +
                 ": the segment is damaged. Restore the job from a checkpoint (shmps-server --restore), or remove the "
                 "segment with `shmps-ctl destroy " + std::string(h.name) + "`");
  };
  if (input.rank >= h.max_workers || input.ring_offset % kCacheLine != 0 || input.ring_offset >= h.ring_bytes ||
      h.ring_bytes - input.ring_offset < sizeof(PushRecord))
    throw damaged("that input's place is outside the rings");
  const RingConsumer ring(&segment.ring(input.rank), segment.ring_data(input.rank));
  const PushRecord* rec = ring.record_at(input.ring_offset);
  if (rec->kind != RecordKind::push || rec->seq != input.seq || rec->param != slice.param ||
      record_bytes_for(rec->count) != rec->record_bytes || rec->record_bytes > h.ring_bytes - input.ring_offset ||
      rec->offset >= slice.first + slice.count || rec->offset + rec->count <= slice.first)
    throw damaged("its ring no longer holds that push");
  SlicePart part;
  part.lo = std::max(slice.first, rec->offset) - slice.first;
  part.n = std::min(slice.first + slice.count, rec->offset + rec->count) - slice.first - part.lo;
  part.grad = record_payload(rec) + (slice.first + part.lo - rec->offset);
  part.scale = static_cast<float>(clip_norm_scale(segment.param(slice.param).optimizer, rec->grad_sq_norm));
  part.rank = input.rank;
  return part;
}

}  // namespace

void run_chunks(Segment& segment, RedoEntry& entry, std::span<const SlicePart> parts, double* value_sq_norm) {
  Chunks(segment, entry, parts).run(value_sq_norm);
}

void finish_chunked(Segment& segment, RedoEntry& entry) {
  const SegmentHeader& h = segment.header();
  const auto damaged = [&](const std::string& what) {
    return Error("segment '" + std::string(h.name) + "': a redo entry left by the previous server " + what +
                 ": the segment is damaged. Restore the job from a checkpoint (shmps-server --restore), or remove the "
                 "segment with `shmps-ctl destroy " + std::string(h.name) + "`");
  };
  if (entry.inputs > redo_input_capacity(h.max_workers))
    throw damaged("names " + std::to_string(entry.inputs) + " inputs, more than it holds");
  if (entry.slice >= h.slice_count || entry.count != segment.slice(entry.slice).count)
    throw damaged("names slice " + std::to_string(entry.slice) + " of " + std::to_string(entry.count) + " elements");
  const std::uint64_t chunk = std::min<std::uint64_t>(kApplyChunkFloats, h.slice_floats);
  const std::uint64_t lo = load_own(entry.chunk_lo), done = load_own(entry.done);
  if (done > entry.count || (lo != kNoChunk && (lo >= entry.count || entry.chunk_count > chunk ||
                                                entry.chunk_count > entry.count - lo)))
    throw damaged("has chunk " + std::to_string(lo) + " + " + std::to_string(entry.chunk_count) + " and done " +
                  std::to_string(done) + " in a slice of " + std::to_string(entry.count));
  std::vector<SlicePart> parts;
  for (std::uint32_t i = 0; i < entry.inputs; ++i)
    parts.push_back(part_from_input(segment, entry, segment.redo_inputs(entry)[i]));
  Chunks chunks(segment, entry, parts);
  if (load_own(entry.chunk_lo) != kNoChunk) {
    chunks.copy_pending();
    store_release(entry.done, load_own(entry.chunk_lo) + entry.chunk_count);
    store_release(entry.chunk_lo, kNoChunk);
  }
  chunks.run(nullptr);
}

}  // namespace shmps::server
