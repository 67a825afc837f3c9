// Checkpoints, the way back: whether a snapshot fits the segment a spec asks for
// (check_restorable), and writing it into the segment the server is creating (restore_into).
// See checkpoint.hpp.
#include <algorithm>
#include <cstring>

#include <shmps/error.hpp>
#include <shmps/shape.hpp>
#include <shmps/server/checkpoint.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/bf16.hpp>
#include <shmps/shm/dtype.hpp>
#include <shmps/shm/worker_slot.hpp>

namespace shmps::server {

using namespace shmps::shm;

namespace {

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& what) {
  throw Error(path.string() + ": " + what);
}

}  // namespace

void check_restorable(const Snapshot& snap, const std::filesystem::path& path, const ModelSpec& spec,
                      const LayoutPlan& plan) {
  for (std::size_t i = 0; i < spec.params.size(); ++i) {
    const ParamSpec& want = spec.params[i];
    auto it = std::find_if(snap.params.begin(), snap.params.end(), [&](const auto& p) { return p.name == want.name; });
    if (it == snap.params.end())
      fail(path, "has no tensor \"" + want.name + "\", a parameter of " + spec.source + ": it is a checkpoint of another model");
    if (it->shape != want.shape)
      fail(path, "tensor \"" + want.name + "\" has shape " + shape_text(it->shape) + ", but " + spec.source + " says " +
                     shape_text(want.shape));
    if (it->dtype != want.dtype)
      fail(path, "tensor \"" + want.name + "\" holds " + std::string(safetensors_dtype(it->dtype)) + " values (dtype " +
                     std::string(to_string(it->dtype)) + "), but " + spec.source + " says dtype = \"" +
                     std::string(to_string(want.dtype)) + "\": a checkpoint restores into the dtype it was taken in; set "
                     "dtype = \"" + std::string(to_string(it->dtype)) + "\" (to change a parameter's dtype, export it "
                     "and start from it as pretrained values)");
    if (it != snap.params.begin() + static_cast<std::ptrdiff_t>(i))
      fail(path, "parameter \"" + want.name + "\" is at position " + std::to_string(it - snap.params.begin()) +
                     " in the checkpoint, " + std::to_string(i) + " in " + spec.source + ": list them in the same order");
  }
  if (snap.params.size() != spec.params.size())
    fail(path, "has " + std::to_string(snap.params.size()) + " parameters, " + spec.source + " has " +
                   std::to_string(spec.params.size()) + ": it is a checkpoint of another model");
  if (snap.optimizer.kind != spec.optimizer.kind)
    fail(path, "was written with optimizer " + std::string(to_string(snap.optimizer.kind)) + ", " + spec.source +
                   " asks for " + std::string(to_string(spec.optimizer.kind)) + ": the optimizer state cannot carry over; "
                   "set kind = \"" + std::string(to_string(snap.optimizer.kind)) + "\"");
  for (std::size_t i = 0; i < spec.params.size(); ++i) {
    const ParamSpec& want = spec.params[i];
    const Snapshot::Param& have = snap.params[i];  // the same parameter (checked above)
    const OptimizerKind want_kind = want.optimizer.value_or(spec.optimizer).kind;
    if (have.optimizer.kind != want_kind)
      fail(path, "updated \"" + want.name + "\" with optimizer " + std::string(to_string(have.optimizer.kind)) + ", " +
                     spec.source + " asks for " + std::string(to_string(want_kind)) +
                     ": its optimizer state cannot carry over; give it kind = \"" +
                     std::string(to_string(have.optimizer.kind)) + "\" (" +
                     (want.table_dim != 0 ? "in its own optimizer = { ... }, or the job's [optimizer]" : "in [optimizer]") +
                     "), or start it afresh from the exported values (init = { kind = \"pretrained\", ... })");
    if (want.table_dim != 0 && optimizer_row_words(want_kind) && have.row_words.size() != want.shape[0])
      fail(path, "has no tensor \"" + want.name + "/" + row_words_tensor(want_kind).suffix +
                     "\" of " + std::to_string(want.shape[0]) + " row words, which " + std::string(to_string(want_kind)) +
                     " keeps for each row of a table: \"" + want.name +
                     "\" was not a table of this job when the checkpoint was taken (or the file is damaged); make it a "
                     "[[param]] as it was, or start the table afresh from the exported values (init = { kind = "
                     "\"pretrained\", ... })");
  }
  for (std::size_t i = 0; i < spec.params.size(); ++i) {
    const ParamSpec& want = spec.params[i];
    const Snapshot::Param& have = snap.params[i];
    if (want.keyed && have.keys.size() != want.shape[0])
      fail(path, "has no tensors \"" + want.name + "/keys\" and \"" + want.name + "/key_stamps\" of " +
                     std::to_string(want.shape[0]) + " slots: \"" + want.name + "\" had no keys = \"u64\" when the "
                     "checkpoint was taken (or the file is damaged); remove keys = \"u64\" from its [[table]], as it "
                     "was then");
    if (!want.keyed && !have.keys.empty())
      fail(path, "holds the keys of \"" + want.name + "\" (tensor \"" + want.name + "/keys\"): it was a table with "
                     "keys = \"u64\" when the checkpoint was taken; give it keys = \"u64\" again");
  }
  if (snap.slice_floats != plan.slice_floats)
    fail(path, "was sliced at " + std::to_string(snap.slice_floats * sizeof(float)) + " bytes per slice, " + spec.source +
                   " at " + std::to_string(plan.slice_floats * sizeof(float)) + ": set slice_bytes = " +
                   std::to_string(snap.slice_floats * sizeof(float)));
  for (const auto& s : snap.slots)
    if (s.rank >= spec.max_workers)
      fail(path, "holds the state of worker rank " + std::to_string(s.rank) + ", but " + spec.source + " has only " +
                     std::to_string(spec.max_workers) + " worker slots: raise max_workers");
}

void restore_into(Segment& segment, const Snapshot& snap) {
  SegmentHeader& h = segment.header();
  // The segment keeps the state dtype it was laid out with (the spec's); the snapshot's state,
  // float32 in memory, is converted into it.
  const StateDType dtype = h.optimizer.state_dtype;
  h.optimizer = snap.optimizer;
  h.optimizer.state_dtype = dtype;
  // Each worker group at its clock; a checkpoint of another grouping (another group size, even
  // with the same number of groups, or one that does not say) starts every group at the
  // slowest group's clock.
  const bool same_grouping = snap.workers_per_group == h.workers_per_group && snap.group_clocks.size() == h.group_count;
  for (std::uint32_t g = 0; g < h.group_count; ++g)
    store_release(segment.group(g).clock, same_grouping ? snap.group_clocks[g] : snap.model_clock);
  store_release(h.consistency, static_cast<std::uint32_t>(snap.consistency));
  store_release(h.staleness, snap.staleness);
  store_release(h.bsp_aggregate, static_cast<std::uint32_t>(snap.bsp_aggregate));
  store_release(h.on_worker_death, static_cast<std::uint32_t>(snap.on_worker_death));
  store_release(h.server_epoch, snap.epoch);
  store_release(h.steps, snap.steps);
  store_release(h.records_applied, snap.records_applied);
  store_release(h.records_skipped, snap.records_skipped);
  store_release(h.records_discarded, snap.records_discarded);
  store_release(h.floats_applied, snap.floats_applied);
  store_release(h.apply_rounds, snap.apply_rounds);
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    // The segment is not ready yet: nobody else reads its parameter table. Each parameter takes
    // its optimizer's settings from the checkpoint as the job's do (its kind is the spec's,
    // check_restorable).
    ParamEntry& p = segment.param(i);
    const Snapshot::Param& sp = snap.params[i];
    p.optimizer = sp.optimizer;
    p.optimizer.state_dtype = dtype;
    const int arrays = state_arrays_of(p);
    if (p.dtype == DType::f32)
      std::memcpy(segment.values(p), sp.values.data(), p.size * sizeof(float));
    else  // exact: the snapshot's values are a bf16 / fp16 segment's, widened (check_restorable)
      narrow(p.dtype, sp.values.data(), segment.values16(p), p.size);
    for (int a = 0; a < arrays; ++a) {
      if (dtype == StateDType::bf16)  // round to nearest even: exact for a checkpoint of a bf16 segment
        to_bf16(sp.state[a].data(), reinterpret_cast<std::uint16_t*>(segment.state_bytes(p, a)), p.size);
      else
        std::memcpy(segment.state_bytes(p, a), sp.state[a].data(), p.size * sizeof(float));
    }
    if (p.row_words_offset != 0)  // a table's row words (check_restorable made sure there is one per row)
      for (std::uint64_t r = 0; r < p.shape[0]; ++r) segment.row_words(p)[r] = static_cast<std::uint64_t>(sp.row_words[r]);
    if (is_keyed(p))  // its KeySlots (check_restorable: one per slot); the server rebuilds the index from them
      for (std::uint64_t r = 0; r < p.shape[0]; ++r)
        segment.key_slots(p)[r] = KeySlot{static_cast<std::uint64_t>(sp.keys[r]), static_cast<std::uint64_t>(sp.key_stamps[r])};
  }
  const std::uint32_t columns = std::min(h.max_workers, snap.max_workers);
  for (std::uint64_t s = 0; s < h.slice_count; ++s) {
    SliceEntry& slice = segment.slice(s);
    store_release(slice.version, static_cast<std::uint64_t>(snap.slice_version[s]));
    store_release(slice.clock, static_cast<std::uint64_t>(snap.slice_clock[s]));
    slice.step = static_cast<std::uint64_t>(snap.slice_step[s]);
    for (std::uint32_t r = 0; r < columns; ++r)
      segment.last_applied(s, r) = static_cast<std::uint64_t>(snap.last_applied[s * snap.max_workers + r]);
  }
  // Each slot's holder is gone: proven dead (it takes part in barriers again once a worker takes
  // the slot, or keeps them waiting with on_worker_death = wait), or it had left.
  for (const auto& s : snap.slots) {
    WorkerSlotServerView(segment.slot(s.rank))
        .restore({.state = s.state,
                  .generation = s.generation,
                  .applied = s.applied,
                  .consumed_clock = s.consumed_clock,
                  .records_applied = s.records_applied,
                  .records_discarded = s.records_discarded,
                  .resume = s.resume,
                  .resume_clock = s.resume_clock});
  }
}

void restore_sync_tables(Segment& segment, const Snapshot& snap) {
  SegmentHeader& h = segment.header();
  if (!snap.sync || snap.sync->server_group != h.server_group || snap.sync->server_groups != h.server_groups)
    throw Error(std::string("checkpoint of segment '") + snap.segment + "' holds no sync tables of server group " +
                std::to_string(h.server_group) + " of " + std::to_string(h.server_groups) +
                ": it is not this rank's part of a checkpoint of this job");
  const Snapshot::Sync& sync = *snap.sync;
  store_release(h.sync_seq, sync.seq);
  for (std::uint64_t s = 0; s < h.slice_count; ++s) {
    SyncSlice& slice = segment.sync_slice(s);
    store_release(slice.sent_seq, static_cast<std::uint64_t>(sync.sent_seq[s]));
    store_release(slice.synced_seq, static_cast<std::uint64_t>(sync.synced_seq[s]));
    slice.clean_version = static_cast<std::uint64_t>(sync.clean_version[s]);
    for (std::uint32_t g = 0; g < h.server_groups; ++g)
      segment.sync_applied(s, g) = static_cast<std::uint64_t>(sync.applied[s * h.server_groups + g]);
  }
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const ParamEntry& p = segment.param(i);
    std::memcpy(segment.sync_base(p), snap.params[i].sync_base.data(), p.size * sizeof(float));
    std::memcpy(segment.sync_sent(p), snap.params[i].sync_sent.data(), p.size * sizeof(float));
  }
}

}  // namespace shmps::server
