#include "redo.hpp"

#include <cstring>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/dtype.hpp>
#include <shmps/shm/killpoint.hpp>
#include <shmps/shm/seqlock.hpp>

namespace shmps::server {

using namespace shmps::shm;

namespace {
// A KeySlot is read by workers under the slice's seqlock while it is written here (the seqlock
// discards such reads): relaxed atomic stores, plain moves on x86.
void store_key_slot(KeySlot& to, const KeySlot& from) noexcept {
  __atomic_store_n(&to.key, from.key, __ATOMIC_RELAXED);
  __atomic_store_n(&to.stamp, from.stamp, __ATOMIC_RELAXED);
}
}  // namespace

void copy_in(Segment& segment, RedoEntry& e) {
  SliceEntry& slice = segment.slice(e.slice);
  const ParamEntry& p = segment.param(slice.param);
  const std::uint32_t workers = segment.header().max_workers;
  if (e.target == RedoTarget::step_sums) {
    // A streamed BSP step's sums: nobody but the server reads them, so no seqlock.
    float* sums = segment.step_sums(p) + slice.first;
    const std::uint64_t half = e.count / 2;
    std::memcpy(sums, segment.redo_values(e), half * sizeof(float));
    kill_point("apply.mid_sum");
    std::memcpy(sums + half, segment.redo_values(e) + half, (e.count - half) * sizeof(float));
    std::memcpy(&segment.last_applied(e.slice, 0), segment.redo_last_applied(e), workers * sizeof(std::uint64_t));
    slice.sum_step = e.sum_step_after;
    return;
  }
  if (e.target == RedoTarget::sync_add || e.target == RedoTarget::sync_take) {
    // Server groups (sync_engine.hpp): the slice's new values, and with them the home's
    // exactly-once entry of the delta's origin (sync_add) or the requester's new sync base and
    // sequence (sync_take), under the seqlock.
    const std::uint64_t word = load_own(slice.version);
    if ((word & 1U) == 0) seqlock_write_begin(slice.version);
    float* values = segment.values(p) + slice.first;
    const std::uint64_t half = e.count / 2;
    std::memcpy(values, segment.redo_values(e), half * sizeof(float));
    kill_point(e.target == RedoTarget::sync_add ? "sync.mid_add" : "sync.mid_take");
    std::memcpy(values + half, segment.redo_values(e) + half, (e.count - half) * sizeof(float));
    SyncSlice& sync = segment.sync_slice(e.slice);
    if (e.target == RedoTarget::sync_add) {
      segment.sync_applied(e.slice, e.sync_origin) = e.sync_seq;
    } else {
      std::memcpy(segment.sync_base(p) + slice.first, segment.redo_sync_base(e), e.count * sizeof(float));
      sync.clean_version = e.sync_clean_version;
      store_release(sync.synced_seq, e.sync_seq);
    }
    store_release(slice.version, e.version_after);
    return;
  }
  const int arrays = state_arrays_of(p);  // the parameter's optimizer's (the entry has room for the most any keeps)
  if (e.mode == RedoMode::rows) {
    // A table's touched rows (RedoMode::rows): each to its place in the slice.
    const std::uint64_t dim = p.table_dim, n = e.inputs, elem = segment.state_elem_bytes();
    const float* rows = segment.redo_values(e);
    const auto* where = reinterpret_cast<const std::uint32_t*>(rows + n * dim);
    const std::uint64_t word = load_own(slice.version);
    if ((word & 1U) == 0) seqlock_write_begin(slice.version);
    for (std::uint64_t i = 0; i < n; ++i) {
      if (i == n / 2) kill_point(n >= 2 ? "apply.mid_rows" : "apply.mid_copy");  // mid_rows: some rows in, some not
      if (p.dtype == DType::f32)
        std::memcpy(segment.values(p) + slice.first + where[i] * dim, rows + i * dim, dim * sizeof(float));
      else  // a 2-byte table's row: narrowed, which rounds its step's result (the same bytes on a replay)
        narrow(p.dtype, rows + i * dim, segment.values16(p) + slice.first + where[i] * dim, dim);
      for (int a = 0; a < arrays; ++a)
        std::memcpy(segment.state_bytes(p, a) + (slice.first + where[i] * dim) * elem,
                    segment.redo_state(e, a) + i * dim * elem, dim * elem);
      if (p.row_words_offset != 0) segment.row_words(p)[slice.first / dim + where[i]] = segment.redo_row_words(e)[i];
      if (is_keyed(p)) store_key_slot(segment.key_slots(p)[slice.first / dim + where[i]], segment.redo_key_slots(e)[i]);
    }
    std::memcpy(&segment.last_applied(e.slice, 0), segment.redo_last_applied(e), workers * sizeof(std::uint64_t));
    slice.step = e.step_after;
    store_release(slice.version, e.version_after);
    return;
  }
  const std::uint64_t half = e.count / 2;
  const std::uint64_t word = load_own(slice.version);
  if ((word & 1U) == 0) seqlock_write_begin(slice.version);  // a replay finds it odd already
  const float* from = segment.redo_values(e);
  if (p.dtype == DType::f32) {
    float* values = segment.values(p) + slice.first;
    std::memcpy(values, from, half * sizeof(float));
    kill_point("apply.mid_copy");
    std::memcpy(values + half, from + half, (e.count - half) * sizeof(float));
  } else {  // 2-byte values: narrowed (exactly: the entry's values are rounded to the dtype already)
    std::uint16_t* values = segment.values16(p) + slice.first;
    narrow(p.dtype, from, values, half);
    kill_point("apply.mid_copy");
    narrow(p.dtype, from + half, values + half, e.count - half);
  }
  const std::uint64_t elem = segment.state_elem_bytes();  // the entry holds the segment's state dtype
  for (int a = 0; a < arrays; ++a)
    std::memcpy(segment.state_bytes(p, a) + slice.first * elem, segment.redo_state(e, a), e.count * elem);
  if (p.row_words_offset != 0)  // a table slice in whole: every row's word (read_slice_row_words)
    std::memcpy(segment.row_words(p) + slice.first / p.table_dim, segment.redo_row_words(e),
                e.count / p.table_dim * sizeof(std::uint64_t));
  if (is_keyed(p))  // a keyed table slice in whole: every row's KeySlot (read_slice_key_slots)
    for (std::uint64_t r = 0; r < e.count / p.table_dim; ++r)
      store_key_slot(segment.key_slots(p)[slice.first / p.table_dim + r], segment.redo_key_slots(e)[r]);
  std::memcpy(&segment.last_applied(e.slice, 0), segment.redo_last_applied(e), workers * sizeof(std::uint64_t));
  slice.step = e.step_after;
  if (e.clock_after != 0) store_release(slice.clock, e.clock_after);
  store_release(slice.version, e.version_after);
}

void read_slice_key_slots(Segment& segment, const ParamEntry& p, const SliceEntry& slice, RedoEntry& entry) {
  if (!is_keyed(p)) return;
  std::memcpy(segment.redo_key_slots(entry), segment.key_slots(p) + slice.first / p.table_dim,
              slice.count / p.table_dim * sizeof(KeySlot));
}

void read_slice_row_words(Segment& segment, const ParamEntry& p, const SliceEntry& slice, RedoEntry& entry) {
  if (p.row_words_offset == 0) return;
  std::memcpy(segment.redo_row_words(entry), segment.row_words(p) + slice.first / p.table_dim,
              slice.count / p.table_dim * sizeof(std::uint64_t));
}

void read_slice_values(const Segment& segment, const ParamEntry& p, const SliceEntry& slice, float* out) {
  if (p.dtype == DType::f32)
    std::memcpy(out, segment.values(p) + slice.first, slice.count * sizeof(float));
  else
    widen(p.dtype, segment.values16(p) + slice.first, out, slice.count);
}

}  // namespace shmps::server
