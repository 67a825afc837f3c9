// Checkpoints, step one: copy the whole state of a job out of its segment into a Snapshot
// (take_snapshot), between two apply rounds. See checkpoint.hpp; checkpoint_file.cpp writes the
// snapshot to a file, checkpoint_restore.cpp puts one back into a segment.
#include <algorithm>
#include <cstring>

#include <shmps/server/checkpoint.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/membership.hpp>
#include <shmps/shm/bf16.hpp>
#include <shmps/shm/dtype.hpp>
#include <shmps/shm/proc.hpp>

#include "parallel.hpp"

namespace shmps::server {

using namespace shmps::shm;

namespace {

// Parallel copy of big arrays (memory bandwidth: two threads beat one on most machines).
void parallel_copy(tbb::task_arena& arena, float* dst, const float* src, std::size_t n) {
  constexpr std::size_t kChunk = 1 << 20;  // 4 MiB
  parallel_for_index(arena, (n + kChunk - 1) / kChunk, [&](std::size_t chunk, std::size_t) {
    const std::size_t begin = chunk * kChunk, count = std::min(kChunk, n - begin);
    std::memcpy(dst + begin, src + begin, count * sizeof(float));
  });
}

// The same, widening bf16 state or bf16 / fp16 values to float32 (exact).
void parallel_widen(tbb::task_arena& arena, float* dst, const std::uint16_t* src, std::size_t n,
                    DType dtype = DType::bf16) {
  constexpr std::size_t kChunk = 1 << 20;
  parallel_for_index(arena, (n + kChunk - 1) / kChunk, [&](std::size_t chunk, std::size_t) {
    const std::size_t begin = chunk * kChunk, count = std::min(kChunk, n - begin);
    widen(dtype, src + begin, dst + begin, count);
  });
}

// A replica's sync tables (server groups), taken between rounds like the rest: the sync engine
// runs on the same thread.
void take_sync_tables(const Segment& segment, Snapshot& out) {
  out.sync.reset();
  if (!segment.has_server_groups()) return;
  const SegmentHeader& h = segment.header();
  // Assigned rather than emplace()d: clang rejects optional<Sync>::emplace() with no arguments
  // (Sync's default member initialisers make is_constructible_v false inside Snapshot).
  out.sync = Snapshot::Sync{};
  Snapshot::Sync& sync = *out.sync;
  sync.server_group = h.server_group;
  sync.server_groups = h.server_groups;
  sync.seq = load_acquire(h.sync_seq);
  for (std::uint64_t s = 0; s < h.slice_count; ++s) {
    const SyncSlice& slice = segment.sync_slice(s);
    sync.sent_seq.push_back(static_cast<std::int64_t>(load_acquire(slice.sent_seq)));
    sync.synced_seq.push_back(static_cast<std::int64_t>(load_acquire(slice.synced_seq)));
    sync.clean_version.push_back(static_cast<std::int64_t>(slice.clean_version));
    for (std::uint32_t g = 0; g < h.server_groups; ++g)
      sync.applied.push_back(static_cast<std::int64_t>(segment.sync_applied(s, g)));
  }
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const ParamEntry& p = segment.param(i);
    out.params[i].sync_base.assign(segment.sync_base(p), segment.sync_base(p) + p.size);
    out.params[i].sync_sent.assign(segment.sync_sent(p), segment.sync_sent(p) + p.size);
  }
}

}  // namespace

std::uint64_t Snapshot::data_bytes() const noexcept {
  std::uint64_t bytes = 0;
  for (const auto& p : params) {
    bytes += (p.values.size() + p.state[0].size() + p.state[1].size()) * sizeof(float);
    bytes += (p.row_words.size() + p.keys.size() + p.key_stamps.size()) * sizeof(std::int64_t);
  }
  bytes += (slice_version.size() + slice_clock.size() + slice_step.size() + last_applied.size()) * sizeof(std::int64_t);
  if (sync) {
    for (const auto& p : params) bytes += (p.sync_base.size() + p.sync_sent.size()) * sizeof(float);
    bytes += (sync->sent_seq.size() * 3 + sync->applied.size()) * sizeof(std::int64_t);
  }
  return bytes;
}

void take_snapshot(const Segment& segment, tbb::task_arena& arena, Snapshot& out) {
  const SegmentHeader& h = segment.header();
  out.segment = h.name;
  out.taken_unix_ns = unix_ns();
  out.epoch = load_acquire(h.server_epoch);
  out.model_clock = slowest_group_clock(segment);
  out.workers_per_group = h.workers_per_group;
  out.group_clocks.resize(h.group_count);
  for (std::uint32_t g = 0; g < h.group_count; ++g) out.group_clocks[g] = group_clock(segment, g);
  out.consistency = static_cast<Consistency>(load_acquire(h.consistency));
  out.staleness = load_acquire(h.staleness);
  out.bsp_aggregate = static_cast<BspAggregate>(load_acquire(h.bsp_aggregate));
  out.on_worker_death = static_cast<OnWorkerDeath>(load_acquire(h.on_worker_death));
  out.optimizer = h.optimizer;
  out.slice_floats = h.slice_floats;
  out.max_workers = h.max_workers;
  out.steps = load_acquire(h.steps);
  out.records_applied = load_acquire(h.records_applied);
  out.records_skipped = load_acquire(h.records_skipped);
  out.records_discarded = load_acquire(h.records_discarded);
  out.floats_applied = load_acquire(h.floats_applied);
  out.apply_rounds = load_acquire(h.apply_rounds);

  out.params.resize(h.param_count);
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const ParamEntry& p = segment.param(i);
    Snapshot::Param& sp = out.params[i];
    sp.name = std::string(param_name(p));
    sp.shape.assign(p.shape, p.shape + p.ndim);
    sp.values.resize(p.size);
    sp.dtype = p.dtype;
    sp.optimizer = p.optimizer;
    const int arrays = state_arrays_of(p);
    if (p.dtype == DType::f32)
      parallel_copy(arena, sp.values.data(), segment.values(p), p.size);
    else
      parallel_widen(arena, sp.values.data(), segment.values16(p), p.size, p.dtype);
    for (int a = 0; a < 2; ++a) {
      sp.state[a].resize(a < arrays ? p.size : 0);
      if (a >= arrays) continue;
      // A snapshot holds the state as float32 whatever the segment's state dtype (bf16 widens
      // exactly), so checkpoints of either dtype restore into either (checkpoint_restore.cpp).
      if (h.optimizer.state_dtype == StateDType::bf16)
        parallel_widen(arena, sp.state[a].data(), at<std::uint16_t>(segment.base(), p.state_offset[a]), p.size);
      else
        parallel_copy(arena, sp.state[a].data(), at<float>(segment.base(), p.state_offset[a]), p.size);
    }
    if (p.row_words_offset != 0) {
      const std::uint64_t* words = segment.row_words(p);
      sp.row_words.assign(words, words + p.shape[0]);
    } else {
      sp.row_words.clear();
    }
    sp.keys.clear();
    sp.key_stamps.clear();
    if (is_keyed(p)) {
      const KeySlot* slots = segment.key_slots(p);
      for (std::uint64_t r = 0; r < p.shape[0]; ++r) {
        sp.keys.push_back(static_cast<std::int64_t>(slots[r].key));
        sp.key_stamps.push_back(static_cast<std::int64_t>(slots[r].stamp));
      }
    }
  }
  out.slice_version.resize(h.slice_count);
  out.slice_clock.resize(h.slice_count);
  out.slice_step.resize(h.slice_count);
  out.last_applied.resize(h.slice_count * h.max_workers);
  const auto* table = at<std::uint64_t>(segment.base(), h.applied_offset);
  for (std::uint64_t s = 0; s < h.slice_count; ++s) {
    const SliceEntry& slice = segment.slice(s);
    out.slice_version[s] = static_cast<std::int64_t>(load_acquire(slice.version));
    out.slice_clock[s] = static_cast<std::int64_t>(load_acquire(slice.clock));
    out.slice_step[s] = static_cast<std::int64_t>(slice.step);
  }
  std::memcpy(out.last_applied.data(), table, out.last_applied.size() * sizeof(std::int64_t));
  take_sync_tables(segment, out);

  out.slots.clear();
  for (std::uint32_t r = 0; r < h.max_workers; ++r) {
    const WorkerSlot& slot = segment.slot(r);
    const std::uint64_t generation = load_acquire(slot.generation);
    if (generation == 0) continue;
    Snapshot::Slot s;
    s.rank = r;
    s.state = load_acquire(slot.state);
    s.generation = generation;
    s.applied = load_acquire(slot.applied);
    s.consumed_clock = load_acquire(slot.consumed_clock);
    s.resume_clock = load_acquire(slot.resume_clock);
    const std::uint32_t bytes = std::min<std::uint32_t>(load_acquire(slot.resume_bytes), kResumeBlobBytes);
    const auto* blob = reinterpret_cast<const std::byte*>(slot.resume);
    s.resume.assign(blob, blob + bytes);  // the server writes it, between rounds: stable now
    s.records_applied = load_acquire(slot.records_applied);
    s.records_discarded = load_acquire(slot.records_discarded);
    out.slots.push_back(std::move(s));
  }
}

}  // namespace shmps::server
