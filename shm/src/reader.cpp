#include "shmps/shm/reader.hpp"

#include <algorithm>
#include <bit>
#include <optional>
#include <thread>
#include <vector>

#include <shmps/shm/dtype.hpp>
#include <shmps/shm/key_index.hpp>
#include <shmps/shm/seqlock.hpp>

namespace shmps::shm {

namespace {

// One seqlock read of `slice` (copy() between two looks at its version word), retried until it
// succeeds: a slice is written for microseconds at a time, so spin a little, then yield, bounded
// by `timeout`. The version word read, or nullopt if the slice stayed mid-update that long (a
// server died writing it).
template <class Copy>
std::optional<std::uint64_t> read_slice(const SliceEntry& slice, Copy&& copy, std::chrono::milliseconds timeout) {
  using Clock = std::chrono::steady_clock;
  std::uint64_t version = 0;
  int attempts = 0;
  Clock::time_point deadline{};
  while (seqlock_try_read(slice.version, version, copy) != SeqlockRead::ok) {
    if (++attempts < 64) continue;
    if (attempts == 64) deadline = Clock::now() + timeout;
    if (Clock::now() >= deadline) return std::nullopt;
    std::this_thread::yield();
  }
  return version;
}

// Elements [offset, offset + count) of p, slice by slice: copy(lo, hi) copies elements [lo, hi)
// of one slice, under that slice's seqlock read.
template <class CopyRange>
SliceReadResult read_slices(const Segment& seg, const ParamEntry& p, std::uint64_t offset, std::uint64_t count,
                            CopyRange&& copy, std::chrono::milliseconds timeout) {
  SliceReadResult result;
  result.min_version = UINT64_MAX;
  const std::uint64_t slice_floats = seg.header().slice_floats;
  const std::uint64_t end = offset + count;
  for (std::uint64_t k = offset / slice_floats; k * slice_floats < end; ++k) {
    const SliceEntry& slice = seg.slice(p.first_slice + k);
    const std::uint64_t lo = std::max<std::uint64_t>(offset, slice.first);
    const std::uint64_t hi = std::min<std::uint64_t>(end, slice.first + slice.count);
    const auto version = read_slice(slice, [&] { copy(lo, hi); }, timeout);
    if (!version) {
      result.stuck_slice = k;
      return result;
    }
    result.min_version = std::min(result.min_version, *version / 2);
  }
  return result;
}

}  // namespace

SliceReadResult read_param(const Segment& seg, const ParamEntry& p, std::uint64_t offset, std::span<float> out,
                           std::chrono::milliseconds timeout) {
  if (p.dtype == DType::f32) {
    const float* values = seg.values(p);
    return read_slices(
        seg, p, offset, out.size(),
        [&](std::uint64_t lo, std::uint64_t hi) { racy_copy_floats(out.data() + (lo - offset), values + lo, hi - lo); },
        timeout);
  }
  // 2-byte values: copied a block at a time into a small buffer (the racy copy), then widened
  // into out (exact); the copy and the widening of a block stay in L1.
  const std::uint16_t* values = seg.values16(p);
  return read_slices(
      seg, p, offset, out.size(),
      [&](std::uint64_t lo, std::uint64_t hi) {
        constexpr std::uint64_t kBlock = 2048;
        alignas(64) std::uint16_t block[kBlock];
        for (std::uint64_t b = lo; b < hi; b += kBlock) {
          const std::uint64_t n = std::min(kBlock, hi - b);
          racy_copy_halves(block, values + b, n);
          widen(p.dtype, block, out.data() + (b - offset), n);
        }
      },
      timeout);
}

SliceReadResult read_keyed_table(const Segment& seg, const ParamEntry& p, std::span<float> values,
                                 std::span<KeySlot> slots, std::chrono::milliseconds timeout) {
  const float* from = seg.values(p);
  const KeySlot* key_slots = seg.key_slots(p);
  const std::uint64_t dim = p.table_dim;
  return read_slices(
      seg, p, 0, values.size(),
      [&](std::uint64_t lo, std::uint64_t hi) {
        racy_copy_floats(values.data() + lo, from + lo, hi - lo);
        for (std::uint64_t r = lo / dim; r < hi / dim; ++r) {
          slots[r].key = __atomic_load_n(&key_slots[r].key, __ATOMIC_RELAXED);
          slots[r].stamp = __atomic_load_n(&key_slots[r].stamp, __ATOMIC_RELAXED);
        }
      },
      timeout);
}

SliceReadResult read_param_raw(const Segment& seg, const ParamEntry& p, std::uint64_t offset,
                               std::span<std::uint16_t> out, std::chrono::milliseconds timeout) {
  const std::uint16_t* values = seg.values16(p);
  return read_slices(
      seg, p, offset, out.size(),
      [&](std::uint64_t lo, std::uint64_t hi) { racy_copy_halves(out.data() + (lo - offset), values + lo, hi - lo); },
      timeout);
}

namespace {

// Rows ids[k] of table p, each whole from one version of its slice: copy_row(k, id) copies row
// `id` into the caller's out[k * dim, ...) inside the slice's seqlock read.
template <class CopyRow>
SliceReadResult read_rows_by(const Segment& seg, const ParamEntry& p, std::span<const std::uint64_t> ids,
                             std::chrono::milliseconds timeout, CopyRow&& copy_row) {
  SliceReadResult result;
  result.min_version = UINT64_MAX;
  const std::uint64_t dim = p.table_dim, slice_floats = seg.header().slice_floats;
  const std::uint64_t row_bytes = dim * dtype_bytes(p.dtype);
  const auto* bytes = reinterpret_cast<const std::byte*>(seg.values16(p));
  // Consecutive ids in one slice (a sorted batch's hot rows) are read under one seqlock read, at
  // most kGroup of them: a longer read would more often overlap the server's write of a hot slice
  // and start again.
  constexpr std::size_t kGroup = 64;
  // Rows per slice is a power of two whenever the slice and dim are (a shift, not a division).
  const std::uint64_t rows_per_slice = slice_floats / dim;
  const bool shift = std::has_single_bit(rows_per_slice);
  const int bits = std::countr_zero(rows_per_slice);
  const auto slice_of = [&](std::uint64_t id) { return shift ? id >> bits : id / rows_per_slice; };
  // Scattered rows each miss the cache twice (the slice's version word, the row): fetch both a
  // few rows ahead, so the misses overlap instead of following one another.
  constexpr std::size_t kAhead = 8;
  for (std::size_t k = 0; k < std::min(kAhead, ids.size()); ++k) {
    __builtin_prefetch(&seg.slice(p.first_slice + slice_of(ids[k])));
    __builtin_prefetch(bytes + ids[k] * row_bytes);
  }
  for (std::size_t k = 0, end = 0; k < ids.size(); k = end) {
    if (k + kAhead < ids.size()) {
      __builtin_prefetch(&seg.slice(p.first_slice + slice_of(ids[k + kAhead])));
      __builtin_prefetch(bytes + ids[k + kAhead] * row_bytes);
    }
    const std::uint64_t slice_index = slice_of(ids[k]);
    for (end = k + 1; end < ids.size() && end - k < kGroup && slice_of(ids[end]) == slice_index; ++end) {
    }
    const auto version = read_slice(
        seg.slice(p.first_slice + slice_index),
        [&] {
          for (std::size_t i = k; i < end; ++i) copy_row(i, ids[i]);
        },
        timeout);
    if (!version) {
      result.stuck_slice = slice_index;
      return result;
    }
    result.min_version = std::min(result.min_version, *version / 2);
  }
  return result;
}

}  // namespace

SliceReadResult read_rows(const Segment& seg, const ParamEntry& p, std::span<const std::uint64_t> ids,
                          std::span<float> out, std::chrono::milliseconds timeout) {
  const std::uint64_t dim = p.table_dim;
  if (p.dtype == DType::f32) {
    const float* values = seg.values(p);
    return read_rows_by(seg, p, ids, timeout, [&](std::size_t k, std::uint64_t id) {
      racy_copy_floats(out.data() + k * dim, values + id * dim, dim);
    });
  }
  // A 2-byte row: copied (racily) into a small buffer, then widened into out, exactly.
  const std::uint16_t* values = seg.values16(p);
  return read_rows_by(seg, p, ids, timeout, [&](std::size_t k, std::uint64_t id) {
    constexpr std::uint64_t kBlock = 2048;
    alignas(64) std::uint16_t block[kBlock];
    for (std::uint64_t b = 0; b < dim; b += kBlock) {
      const std::uint64_t n = std::min(kBlock, dim - b);
      racy_copy_halves(block, values + id * dim + b, n);
      widen(p.dtype, block, out.data() + k * dim + b, n);
    }
  });
}

SliceReadResult read_rows_raw(const Segment& seg, const ParamEntry& p, std::span<const std::uint64_t> ids,
                              std::span<std::uint16_t> out, std::chrono::milliseconds timeout) {
  const std::uint64_t dim = p.table_dim;
  const std::uint16_t* values = seg.values16(p);
  return read_rows_by(seg, p, ids, timeout, [&](std::size_t k, std::uint64_t id) {
    racy_copy_halves(out.data() + k * dim, values + id * dim, dim);
  });
}

SliceReadResult read_keyed_rows(const Segment& seg, const ParamEntry& p, std::span<const std::uint64_t> keys,
                                std::span<float> out, std::chrono::milliseconds timeout, bool& index_stuck) {
  const std::uint64_t dim = p.table_dim;
  thread_local std::vector<std::uint64_t> slots, found_slots;
  thread_local std::vector<std::size_t> found_at;
  thread_local std::vector<KeySlot> seen;
  slots.resize(keys.size());
  index_stuck = !find_key_slots(seg, p, keys, slots, timeout);
  if (index_stuck) return {};
  found_slots.clear();
  found_at.clear();
  for (std::size_t k = 0; k < keys.size(); ++k) {
    if (slots[k] == kNoKeySlot) {
      keyed_init_row(p.keyed_init, keys[k], out.subspan(k * dim, dim));
    } else {
      found_slots.push_back(slots[k]);
      found_at.push_back(k);
    }
  }
  if (found_slots.empty()) return {};
  seen.resize(found_slots.size());
  const float* values = seg.values(p);
  const KeySlot* key_slots = seg.key_slots(p);
  SliceReadResult result = read_rows_by(seg, p, found_slots, timeout, [&](std::size_t i, std::uint64_t slot) {
    racy_copy_floats(out.data() + found_at[i] * dim, values + slot * dim, dim);
    seen[i].key = __atomic_load_n(&key_slots[slot].key, __ATOMIC_RELAXED);
    seen[i].stamp = __atomic_load_n(&key_slots[slot].stamp, __ATOMIC_RELAXED);
  });
  if (result.stuck_slice) return result;
  for (std::size_t i = 0; i < found_slots.size(); ++i) {
    const std::size_t k = found_at[i];
    if (seen[i].stamp == 0 || seen[i].key != keys[k])  // the slot went to another key after the index was read
      keyed_init_row(p.keyed_init, keys[k], out.subspan(k * dim, dim));
  }
  return result;
}

}  // namespace shmps::shm
