// Where everything goes in a segment (LayoutPlan, segment.hpp): plan_layout for a new one from
// the server's request, plan_of for a live one from its header and parameter table. The regions
// themselves, field by field, are described in layout.hpp.
#include "shmps/shm/segment.hpp"

#include <algorithm>
#include <bit>
#include <cstring>
#include <string>

#include <shmps/error.hpp>
#include <shmps/shm/dtype.hpp>
#include <shmps/shm/memory.hpp>

namespace shmps::shm {

std::uint64_t bsp_step_ring_bytes(std::span<const ParamEntry> params) noexcept {
  std::uint64_t step = sizeof(PushRecord), largest = 0;  // the clock record
  for (const auto& p : params) {
    if (p.table_dim != 0) continue;  // a table is pushed by rows, whose size a step does not fix
    step += record_bytes_for(p.size);
    largest = std::max(largest, p.size);
  }
  return step + record_bytes_for(largest);  // slack for the padding record at the wrap
}

LayoutPlan plan_layout(const LayoutRequest& request) {
  if (request.params.empty()) throw Error("a model needs at least one parameter");
  if (request.slice_bytes < kCacheLine || request.slice_bytes % kCacheLine != 0)
    throw Error("slice_bytes must be a positive multiple of 64, got " + std::to_string(request.slice_bytes));
  if (request.max_workers == 0 || request.max_workers > 1024)
    throw Error("max_workers must be between 1 and 1024, got " + std::to_string(request.max_workers));
  if (request.workers_per_group > request.max_workers)
    throw Error("workers_per_group (" + std::to_string(request.workers_per_group) + ") must be at most max_workers (" +
                std::to_string(request.max_workers) + "): a group cannot have more workers than the job has slots");
  if (request.redo_entries == 0 || request.redo_entries > 1024) throw Error("redo_entries must be between 1 and 1024");
  if (request.server_groups == 0 || request.server_groups > kMaxServerGroups)
    throw Error("server_groups must be between 1 and " + std::to_string(kMaxServerGroups) + ", got " +
                std::to_string(request.server_groups));
  if (request.server_group >= request.server_groups)
    throw Error("server group " + std::to_string(request.server_group) + " is not below server_groups " +
                std::to_string(request.server_groups));

  LayoutPlan plan;
  plan.slice_floats = request.slice_bytes / sizeof(float);
  plan.max_workers = request.max_workers;
  plan.workers_per_group = request.workers_per_group == 0 ? request.max_workers : request.workers_per_group;
  plan.group_count = (plan.max_workers + plan.workers_per_group - 1) / plan.workers_per_group;
  plan.state_dtype = request.state_dtype;
  if (static_cast<std::uint32_t>(request.state_dtype) > static_cast<std::uint32_t>(StateDType::bf16))
    throw Error("unknown optimizer state dtype " + std::to_string(static_cast<std::uint32_t>(request.state_dtype)));
  const std::uint64_t state_elem = state_dtype_bytes(request.state_dtype);
  plan.redo_count = request.redo_entries;
  plan.server_group = request.server_group;
  plan.server_groups = request.server_groups;
  const bool sync = request.server_groups > 1;
  // Row words (lazy Adam's step counts, row-wise AdaGrad's accumulators): only tables whose
  // optimizer keeps them. A redo entry holds those of one slice: at most slice_floats / (the
  // narrowest such table's dim).
  const auto keeps_words = [](const auto& p) { return p.table_dim != 0 && optimizer_row_words(p.optimizer.kind); };
  std::uint32_t narrowest_table = 0;
  for (const auto& p : request.params)
    if (keeps_words(p) && (narrowest_table == 0 || p.table_dim < narrowest_table)) narrowest_table = p.table_dim;
  const bool row_words = narrowest_table != 0;
  // Keyed tables (keys = "u64"): a redo entry holds one slice's KeySlots, as the row words.
  std::uint32_t narrowest_keyed = 0;
  for (const auto& p : request.params)
    if (p.keyed && (narrowest_keyed == 0 || p.table_dim < narrowest_keyed)) narrowest_keyed = p.table_dim;
  std::uint64_t largest = 0;
  std::string largest_name;
  for (const auto& p : request.params) {
    if (p.name.empty() || p.name.size() >= kMaxNameBytes)
      throw Error("parameter name '" + p.name + "' must have 1 to " + std::to_string(kMaxNameBytes - 1) + " characters");
    if (p.shape.empty() || p.shape.size() > kMaxDims)
      throw Error("parameter '" + p.name + "' must have 1 to " + std::to_string(kMaxDims) + " dimensions");
    ParamEntry entry{};
    std::memcpy(entry.name, p.name.data(), p.name.size());
    entry.dtype = p.dtype;
    if (static_cast<std::uint32_t>(p.dtype) > static_cast<std::uint32_t>(DType::fp16))
      throw Error("parameter '" + p.name + "': unknown dtype " + std::to_string(static_cast<std::uint32_t>(p.dtype)));
    if (p.dtype != DType::f32 && sync)
      throw Error("parameter '" + p.name + "' has dtype " + std::string(to_string(p.dtype)) +
                  ", and server groups (" + std::to_string(request.server_groups) +
                  " of them, or several hosts) sync float32 values only: run the job as one server group, or make "
                  "the parameter dtype = \"f32\"");
    if (static_cast<std::uint32_t>(p.optimizer.kind) > static_cast<std::uint32_t>(kLastOptimizerKind))
      throw Error("parameter '" + p.name + "': unknown optimizer kind " + std::to_string(static_cast<std::uint32_t>(p.optimizer.kind)));
    if (p.optimizer.kind == OptimizerKind::rowwise_adagrad && p.table_dim == 0)
      throw Error("parameter '" + p.name + "': rowwise_adagrad keeps one accumulator per table row, and '" + p.name +
                  "' is not a table");
    entry.optimizer = p.optimizer;
    entry.optimizer.state_dtype = request.state_dtype;
    plan.state_arrays = std::max(plan.state_arrays, static_cast<std::uint32_t>(optimizer_state_arrays(p.optimizer.kind)));
    entry.ndim = static_cast<std::uint32_t>(p.shape.size());
    entry.init_put = p.init_put ? 1U : 0U;
    entry.table_dim = p.table_dim;
    if (p.keyed) {
      if (p.table_dim == 0) throw Error("parameter '" + p.name + "': keys = \"u64\" is for tables only");
      if (sync)
        throw Error("table '" + p.name + "' has keys = \"u64\", and server groups (" +
                    std::to_string(request.server_groups) + " of them, or several hosts) sync slices of row numbers, "
                    "not keys: run the job as one server group, or give the table row numbers (no keys)");
      if (p.dtype != DType::f32)
        throw Error("table '" + p.name + "' has keys = \"u64\" and dtype " + std::string(to_string(p.dtype)) +
                    ": a keyed table keeps float32 rows; make it dtype = \"f32\"");
      if (p.admit_after == 0) throw Error("table '" + p.name + "': admit_after must be at least 1");
      if (p.shape.empty() || p.shape[0] >= (std::uint64_t{1} << 32))
        throw Error("table '" + p.name + "' has keys = \"u64\": it may have at most 2^32 - 1 slots (rows)");
      entry.admit_after = p.admit_after;
      entry.keyed_init = p.keyed_init;
    }
    if (p.table_dim != 0 && (p.shape.size() != 2 || p.shape[1] != p.table_dim))
      throw Error("table '" + p.name + "' must have shape {rows, dim} with dim " + std::to_string(p.table_dim));
    if (p.table_dim != 0 && plan.slice_floats % p.table_dim != 0)
      throw Error("table '" + p.name + "': its rows of " + std::to_string(p.table_dim) +
                  " floats must not straddle slices, but the slices hold " + std::to_string(plan.slice_floats) +
                  " floats (slice_bytes " + std::to_string(request.slice_bytes) +
                  "): make slice_bytes a multiple of 4 x dim");
    std::uint64_t size = 1;
    for (std::size_t d = 0; d < p.shape.size(); ++d) {
      if (p.shape[d] == 0) throw Error("parameter '" + p.name + "' has a zero dimension");
      if (size > (std::uint64_t{1} << 46) / p.shape[d]) throw Error("parameter '" + p.name + "' is too large");
      size *= p.shape[d];
      entry.shape[d] = p.shape[d];
    }
    entry.size = size;
    entry.first_slice = plan.slice_count;
    entry.slice_count = (size + plan.slice_floats - 1) / plan.slice_floats;
    plan.slice_count += entry.slice_count;
    if (size > largest && p.table_dim == 0) {  // a table's pushes are rows, not the table
      largest = size;
      largest_name = p.name;
    }
    plan.params.push_back(entry);
  }

  // The ring (see kMinRingBytes in segment.hpp for the rule and why).
  if (request.ring_bytes != 0) {
    plan.ring_bytes = align_up(request.ring_bytes, kCacheLine);
    plan.ring_rule = "set by ring_bytes";
  } else {
    const std::uint64_t two_pushes = 2 * record_bytes_for(largest);
    // In BSP a ring holds a whole step if that takes at most kMaxAutoRingBytes; bigger steps stream.
    const std::uint64_t whole_step = bsp_step_ring_bytes(plan.params);
    const std::uint64_t step = request.bsp && whole_step <= kMaxAutoRingBytes ? whole_step : 0;
    plan.ring_bytes = std::max({kMinRingBytes, std::min(two_pushes, kMaxAutoRingBytes), step});
    if (plan.ring_bytes == step)
      plan.ring_rule = "automatic: one BSP step (a push of every parameter and the clock record, plus one largest "
                       "record of slack), because the server takes a step only once it has ended";
    else if (plan.ring_bytes == two_pushes)
      plan.ring_rule = "automatic: two pushes of the largest parameter, " + largest_name +
                       " (a push may use at most half a ring)";
    else if (plan.ring_bytes == kMaxAutoRingBytes)
      plan.ring_rule = "automatic: the cap of " + human_bytes(kMaxAutoRingBytes) + " (pushes of " + largest_name +
                       " stream through it in chunks of at most half a ring)";
    else
      plan.ring_rule = "automatic: the minimum of 1 MiB";
  }
  if (plan.ring_bytes < 4 * kCacheLine) throw Error("ring_bytes must be at least 256");
  // Several worker groups each step on their own: one model's worth of step sums serves one step
  // at a time, so their BSP steps cannot stream; each ring must hold a whole step.
  if (request.bsp && plan.group_count > 1 && plan.ring_bytes < bsp_step_ring_bytes(plan.params))
    throw Error("a BSP job with " + std::to_string(plan.group_count) + " worker groups needs rings that hold a whole step (" +
                std::to_string(bsp_step_ring_bytes(plan.params)) + " bytes each; the rings would hold " +
                std::to_string(plan.ring_bytes) + "): set ring_bytes = " + std::to_string(bsp_step_ring_bytes(plan.params)) +
                " (max_workers rings of that size), or run the job as one group (no workers_per_group)");
  plan.ring_stride = sizeof(RingHeader) + plan.ring_bytes;
  // A big ring starts on a huge-page boundary (its worker's pages are then its own huge pages).
  if (plan.ring_stride >= kBigRegionBytes) plan.ring_stride = align_up(plan.ring_stride, kHugePageBytes);
  // A region of kBigRegionBytes or more starts on a huge-page boundary.
  const auto big_region_at = [](std::uint64_t offset, std::uint64_t region_bytes) {
    return region_bytes >= kBigRegionBytes ? align_up(offset, kHugePageBytes) : offset;
  };

  std::uint64_t offset = align_up(sizeof(SegmentHeader), kCacheLine);
  plan.params_offset = offset;
  offset = align_up(offset + plan.params.size() * sizeof(ParamEntry), kCacheLine);
  plan.slices_offset = offset;
  offset += plan.slice_count * sizeof(SliceEntry);
  plan.applied_offset = offset;
  offset = align_up(offset + plan.slice_count * request.max_workers * sizeof(std::uint64_t), kCacheLine);
  plan.redo_offset = offset;
  plan.redo_stride = align_up(sizeof(RedoEntry) + align_up(request.max_workers, 8) * sizeof(std::uint64_t) +
                                  redo_inputs_bytes(request.max_workers) + plan.slice_floats * sizeof(float) +
                                  plan.state_arrays * plan.slice_floats * state_elem +
                                  (sync ? plan.slice_floats * sizeof(float) : 0) +  // sync_take: the fresh values
                                  (row_words ? plan.slice_floats / narrowest_table * sizeof(std::uint64_t) : 0),
                              kCacheLine);
  if (narrowest_keyed != 0) {  // the KeySlots after everything else in the entry
    plan.redo_key_slots_at = plan.redo_stride;
    plan.redo_stride = align_up(plan.redo_stride + plan.slice_floats / narrowest_keyed * sizeof(KeySlot), kCacheLine);
  }
  offset += request.redo_entries * plan.redo_stride;
  plan.param_stats_offset = offset;
  offset += plan.params.size() * sizeof(ParamStats);
  plan.rejected_offset = offset;
  plan.rejected_stride = align_up(plan.params.size() * sizeof(std::uint64_t), kCacheLine);
  offset += request.max_workers * plan.rejected_stride;
  plan.groups_offset = offset;
  offset += plan.group_count * sizeof(GroupEntry);
  plan.slots_offset = offset;
  offset += request.max_workers * sizeof(WorkerSlot);
  const std::uint64_t rings_bytes = request.max_workers * plan.ring_stride;
  plan.rings_offset = big_region_at(offset, rings_bytes);
  offset = plan.rings_offset + rings_bytes;

  // The values, each parameter in its dtype; and the same parameters as float32 (f32_offset, for
  // the step sums and the sync arrays, which hold float32 whatever the dtype).
  std::uint64_t values_bytes = 0, f32_bytes = 0;
  for (auto& entry : plan.params) {
    values_bytes += align_up(entry.size * dtype_bytes(entry.dtype), kCacheLine);
    entry.f32_offset = f32_bytes;
    f32_bytes += align_up(entry.size * sizeof(float), kCacheLine);
  }
  // Values start on a page so that big parameters can be backed by whole pages.
  offset = big_region_at(align_up(offset, 4096), values_bytes);
  plan.values_offset = offset;
  for (auto& entry : plan.params) {
    entry.values_offset = offset;
    offset += align_up(entry.size * dtype_bytes(entry.dtype), kCacheLine);
  }
  // The state arrays: array a of every parameter whose optimizer keeps more than a of them.
  std::uint64_t state_bytes = 0;
  for (const auto& entry : plan.params)
    state_bytes += static_cast<std::uint64_t>(state_arrays_of(entry)) * align_up(entry.size * state_elem, kCacheLine);
  offset = big_region_at(align_up(offset, 4096), state_bytes);
  plan.state_offset = offset;
  for (int a = 0; a < static_cast<int>(plan.state_arrays); ++a) {
    for (auto& entry : plan.params) {
      if (a >= state_arrays_of(entry)) continue;
      entry.state_offset[a] = offset;
      offset += align_up(entry.size * state_elem, kCacheLine);
    }
  }
  std::uint64_t last_region = state_bytes != 0 ? state_bytes : values_bytes;
  // The row words of the tables whose optimizer keeps them (lazy Adam, row-wise AdaGrad).
  if (row_words) {
    std::uint64_t row_words_bytes = 0;
    for (const auto& entry : plan.params)
      if (keeps_words(entry)) row_words_bytes += align_up(entry.shape[0] * sizeof(std::uint64_t), kCacheLine);
    offset = big_region_at(align_up(offset, 4096), row_words_bytes);
    for (auto& entry : plan.params) {
      if (!keeps_words(entry)) continue;
      entry.row_words_offset = offset;
      offset += align_up(entry.shape[0] * sizeof(std::uint64_t), kCacheLine);
    }
    last_region = row_words_bytes;
  }
  // Keyed tables: each one's KeySlots, then its key index (a header line and the buckets: a
  // power of two, at least twice the rows, so that probes stay short with every slot taken).
  if (narrowest_keyed != 0) {
    std::uint64_t keyed_bytes = 0;
    for (auto& entry : plan.params) {
      if (request.params[static_cast<std::size_t>(&entry - plan.params.data())].keyed) {
        entry.key_buckets = std::bit_ceil(2 * entry.shape[0]);
        keyed_bytes += align_up(entry.shape[0] * sizeof(KeySlot), kCacheLine) + sizeof(KeyIndexHeader) +
                       align_up(entry.key_buckets * sizeof(KeyBucket), kCacheLine);
      }
    }
    offset = big_region_at(align_up(offset, 4096), keyed_bytes);
    for (auto& entry : plan.params) {
      if (entry.key_buckets == 0) continue;
      entry.key_slots_offset = offset;
      offset += align_up(entry.shape[0] * sizeof(KeySlot), kCacheLine);
      entry.key_index_offset = offset;
      offset += sizeof(KeyIndexHeader) + align_up(entry.key_buckets * sizeof(KeyBucket), kCacheLine);
    }
    last_region = keyed_bytes;
  }
  // A BSP job whose rings cannot hold a step: the step's pushes stream into one model's worth of
  // sums, float32 whatever the state dtype (they are gradients). (An ASP or SSP job pays nothing
  // for it; switched to BSP live, its steps must fit its rings, bsp_ring_note.)
  if (request.bsp && plan.ring_bytes < bsp_step_ring_bytes(plan.params)) {
    for (const auto& entry : plan.params)
      if (entry.table_dim != 0)
        throw Error("a BSP job with a table (" + std::string(entry.name) + ") needs rings that hold a whole step: set "
                    "ring_bytes to at least " + std::to_string(bsp_step_ring_bytes(plan.params)) +
                    " plus the bytes of a step's push_rows (steps that stream through the rings are summed densely, "
                    "which a table's rows are not)");
    offset = big_region_at(align_up(offset, 4096), f32_bytes);
    plan.step_sums_offset = offset;
    plan.step_sums_bytes = f32_bytes;
    offset += f32_bytes;
    last_region = f32_bytes;
  }
  // Server groups: per slice its sync state and the home's exactly-once row, then a slice's
  // values at its last sync and its delta in flight, each laid out as the values are.
  if (sync) {
    offset = align_up(offset, 4096);
    const std::uint64_t tables_start = offset;
    plan.sync_offset = offset;
    offset = align_up(offset + plan.slice_count * sizeof(SyncSlice), kCacheLine);
    plan.sync_applied_offset = offset;
    offset = align_up(offset + plan.slice_count * request.server_groups * sizeof(std::uint64_t), kCacheLine);
    offset = big_region_at(align_up(offset, 4096), f32_bytes);
    plan.sync_base_offset = offset;
    offset += f32_bytes;
    offset = big_region_at(align_up(offset, 4096), f32_bytes);
    plan.sync_sent_offset = offset;
    offset += f32_bytes;
    plan.sync_bytes = offset - tables_start;
    last_region = f32_bytes;
  }
  // A big last region ends on a huge-page boundary too (huge=within_size makes a huge page only
  // where the file covers it whole).
  plan.total_bytes = last_region >= kBigRegionBytes ? align_up(offset, kHugePageBytes) : align_up(offset, 4096);
  return plan;
}

LayoutPlan plan_of(const Segment& segment) {
  const SegmentHeader& h = segment.header();
  LayoutPlan plan;
  plan.slice_floats = h.slice_floats;
  plan.slice_count = h.slice_count;
  plan.max_workers = h.max_workers;
  plan.workers_per_group = h.workers_per_group;
  plan.group_count = h.group_count;
  plan.state_arrays = h.state_arrays;
  plan.state_dtype = h.optimizer.state_dtype;
  plan.redo_count = h.redo_count;
  plan.ring_bytes = h.ring_bytes;
  plan.ring_stride = h.ring_stride;
  plan.params_offset = h.params_offset;
  plan.slices_offset = h.slices_offset;
  plan.applied_offset = h.applied_offset;
  plan.slots_offset = h.slots_offset;
  plan.rings_offset = h.rings_offset;
  plan.values_offset = h.values_offset;
  plan.state_offset = h.state_offset;
  plan.total_bytes = h.total_bytes;
  plan.redo_offset = h.redo_offset;
  plan.redo_stride = h.redo_stride;
  plan.param_stats_offset = h.param_stats_offset;
  plan.rejected_offset = h.rejected_offset;
  plan.rejected_stride = h.rejected_stride;
  plan.groups_offset = h.groups_offset;
  plan.step_sums_offset = h.step_sums_offset;
  plan.step_sums_bytes = h.step_sums_bytes;
  plan.server_group = h.server_group;
  plan.server_groups = h.server_groups;
  plan.sync_offset = h.sync_offset;
  plan.sync_applied_offset = h.sync_applied_offset;
  plan.sync_base_offset = h.sync_base_offset;
  plan.sync_sent_offset = h.sync_sent_offset;
  plan.redo_key_slots_at = h.redo_key_slots_at;
  if (h.sync_offset != 0) {
    std::uint64_t values_bytes = 0;
    for (std::uint32_t i = 0; i < h.param_count; ++i) values_bytes += align_up(segment.param(i).size * sizeof(float), kCacheLine);
    plan.sync_bytes = h.sync_sent_offset + values_bytes - h.sync_offset;
  }
  for (std::uint32_t i = 0; i < h.param_count; ++i) plan.params.push_back(segment.param(i));
  return plan;
}

}  // namespace shmps::shm
