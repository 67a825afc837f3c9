#include "apply_put.hpp"

#include <algorithm>
#include <cstring>

#include <spdlog/spdlog.h>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/dtype.hpp>
#include <shmps/shm/killpoint.hpp>
#include <shmps/shm/ring.hpp>
#include <shmps/shm/worker_slot.hpp>

#include "redo.hpp"

namespace shmps::server {

using namespace shmps::shm;

namespace {

// Why the server refuses a put record, or nullptr if it applies it. The same answer for the same
// record after a restart: a refused one is remembered in the slot; an applied one left its mark
// on every slice (a collector takes nothing after a put from its ring in the same round, so no
// later push of the rank can have moved those marks before the round was published).
const char* refusal(Segment& segment, std::uint32_t rank, const PushRecord& rec) {
  const SegmentHeader& h = segment.header();
  if (rec.param >= h.param_count || rec.count == 0 || rec.offset > segment.param(rec.param).size ||
      rec.count > segment.param(rec.param).size - rec.offset)
    return "its range is outside its parameter";
  if (WorkerSlotServerView(segment.slot(rank)).put_refused_seq() >= rec.seq) return "it was refused before a restart";
  const ParamEntry& param = segment.param(rec.param);
  bool applied = true;
  for (std::uint64_t k = rec.offset / h.slice_floats; k <= (rec.offset + rec.count - 1) / h.slice_floats; ++k)
    applied = applied && segment.last_applied(param.first_slice + k, rank) >= rec.seq;
  if (applied) return nullptr;  // before a restart: put_slice skips every slice
  const std::uint64_t owner = load_acquire(segment.param_stats(rec.param).put_rank);
  if (owner != 0 && owner != std::uint64_t{rank} + 1) return "another worker put the parameter first";
  const ParamEntry& p = segment.param(rec.param);
  for (std::uint64_t k = rec.offset / h.slice_floats; k <= (rec.offset + rec.count - 1) / h.slice_floats; ++k)
    if (segment.slice(p.first_slice + k).step != 0) return "the parameter has had an optimizer update";
  return nullptr;
}

// Writes the record's part of one slice through the redo entry (values, the slot's exactly-once
// mark; state and step unchanged). Skips a slice the record was applied to before (a restart).
std::uint64_t put_slice(Segment& segment, std::uint32_t rank, const PushRecord& rec, std::uint64_t index,
                        RedoEntry& redo) {
  const SegmentHeader& h = segment.header();
  if (segment.last_applied(index, rank) >= rec.seq) return 0;
  SliceEntry& slice = segment.slice(index);
  const ParamEntry& p = segment.param(slice.param);
  const std::uint64_t lo = std::max(slice.first, rec.offset), hi = std::min(slice.first + slice.count, rec.offset + rec.count);
  float* values = segment.redo_values(redo);
  read_slice_values(segment, p, slice, values);
  std::memcpy(values + (lo - slice.first), record_payload(&rec) + (lo - rec.offset), (hi - lo) * sizeof(float));
  round_to(p.dtype, values + (lo - slice.first), hi - lo);  // a bf16 / fp16 parameter stores them rounded
  const std::uint64_t elem = segment.state_elem_bytes();
  for (int a = 0; a < state_arrays_of(p); ++a)
    std::memcpy(segment.redo_state(redo, a), segment.state_bytes(p, a) + slice.first * elem, slice.count * elem);
  read_slice_row_words(segment, p, slice, redo);  // a table's row words unchanged
  read_slice_key_slots(segment, p, slice, redo);  // and a keyed table's KeySlots
  std::uint64_t* row = segment.redo_last_applied(redo);
  std::memcpy(row, &segment.last_applied(index, 0), h.max_workers * sizeof(std::uint64_t));
  row[rank] = rec.seq;
  redo.target = RedoTarget::values;
  redo.mode = RedoMode::whole;
  redo.slice = index;
  redo.count = slice.count;
  redo.version_after = (load_own(slice.version) & ~std::uint64_t{1}) + 2;
  redo.step_after = slice.step;
  redo.clock_after = 0;
  store_release(redo.valid, 1U);  // from here on, a restarted server finishes this copy
  kill_point("put.mid_slice");
  copy_in(segment, redo);
  store_release(redo.valid, 0U);
  return hi - lo;
}

}  // namespace

std::uint64_t apply_puts(Segment& segment, const RoundPlan& plan, RedoEntry& redo) {
  const SegmentHeader& h = segment.header();
  std::uint64_t floats = 0;
  for (const PutTake& put : plan.puts) {
    const PushRecord& rec = *put.record;
    if (const char* why = refusal(segment, put.rank, rec)) {
      WorkerSlotServerView(segment.slot(put.rank)).refuse_put(rec.seq);
      spdlog::warn("event=put_refused segment={} rank={} seq={} param={} reason=\"{}\"", h.name, put.rank, rec.seq,
                   rec.param < h.param_count ? segment.param(rec.param).name : "?", why);
      continue;
    }
    ParamStats& stats = segment.param_stats(rec.param);
    if (load_acquire(stats.put_rank) == 0) store_release(stats.put_rank, std::uint64_t{put.rank} + 1);
    const ParamEntry& p = segment.param(rec.param);
    for (std::uint64_t k = rec.offset / h.slice_floats; k <= (rec.offset + rec.count - 1) / h.slice_floats; ++k)
      floats += put_slice(segment, put.rank, rec, p.first_slice + k, redo);
    spdlog::info("event=put segment={} rank={} seq={} param={} offset={} count={}", h.name, put.rank, rec.seq, p.name,
                 rec.offset, rec.count);
  }
  return floats;
}

}  // namespace shmps::server
