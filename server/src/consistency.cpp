#include "consistency.hpp"

#include <algorithm>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/killpoint.hpp>
#include <shmps/shm/membership.hpp>
#include <shmps/shm/memory.hpp>

namespace shmps::server {

using namespace shmps::shm;

RoundPolicy policy_for_round(const Segment& segment) {
  const SegmentHeader& h = segment.header();
  RoundPolicy policy;
  policy.whole_steps = load_acquire(h.consistency) == static_cast<std::uint32_t>(Consistency::bsp);
  if (policy.whole_steps && h.step_sums_offset != 0) {  // one worker group (plan_layout)
    policy.whole_steps = false;
    policy.streamed_steps = true;
    policy.step = load_own(segment.group(0).clock);
  }
  if (policy.whole_steps || policy.streamed_steps)
    policy.aggregation = load_acquire(h.bsp_aggregate) == static_cast<std::uint32_t>(BspAggregate::mean)
                             ? Aggregation::mean
                             : Aggregation::sum;
  return policy;
}

float streamed_step_scale(const Segment& segment, std::uint64_t step, const RoundPlan& plan) {
  const SegmentHeader& h = segment.header();
  if (load_acquire(h.bsp_aggregate) != static_cast<std::uint32_t>(BspAggregate::mean)) return 1.0f;
  std::uint64_t ranks = 0;
  for (std::uint32_t r = 0; r < h.max_workers; ++r)
    if (load_acquire(segment.slot(r).streamed_step) == step + 1 || plan.ranks[r].streamed_step == step + 1) ++ranks;
  return ranks == 0 ? 1.0f : 1.0f / static_cast<float>(ranks);
}

bool complete_step(Segment& segment, std::uint32_t group, std::uint64_t step, const RoundPlan& plan) {
  SegmentHeader& h = segment.header();
  const std::uint32_t first = segment.group_first_rank(group), end = segment.group_end_rank(group);
  std::uint64_t records = 0, discarded = 0;
  bool anyone = false;
  for (std::uint32_t r = first; r < end; ++r) {
    const RankRound& round = plan.ranks[r];
    records += round.records;
    discarded += round.discarded;
    // Took part in the step: still attached, or ended it in this round, or (streamed steps) has
    // pushes of it in the sums. A job's last step is often ended by workers that leave at once,
    // and in streamed BSP its pushes were summed in earlier rounds: without the last two, the
    // round that finds the step's ends would take nobody for the group and leave it open.
    anyone = anyone || counts_for_group(h, segment.slot(r)) || round.clock > step ||
             round.streamed_step == step + 1 || load_acquire(segment.slot(r).streamed_step) == step + 1;
  }
  if (!anyone && records == 0 && discarded == 0) return false;
  // One group: the slices hold exactly its steps, and say which (checkpoints, the monitor). With
  // several, a slice holds whatever steps of each group are done: only the groups' clocks say.
  if (h.group_count == 1)
    for (std::uint64_t i = 0; i < h.slice_count; ++i) store_release(segment.slice(i).clock, step + 1);
  GroupEntry& g = segment.group(group);
  bump_counter(g.records, records);
  bump_counter(g.discarded, discarded);
  bump_counter(g.steps, std::uint64_t{1});
  store_release(g.clock, step + 1);
  bump_counter(h.steps, std::uint64_t{1});
  return true;
}

bool apply_step_sums_left_by_a_switch(Segment& segment, ApplyEngine& engine, std::uint64_t step) {
  SegmentHeader& h = segment.header();
  bool pending = false;
  for (std::uint64_t i = 0; i < h.slice_count && !pending; ++i) {
    // Sums of this step, applied or not: a server killed after applying them but before the
    // clocks moved does the rest again (apply_step_sums skips slices whose clock has the step).
    pending = segment.slice(i).sum_step == step + 1;
  }
  if (pending) {
    RoundPlan none;
    none.ranks.resize(h.max_workers);
    engine.apply_step_sums(step, streamed_step_scale(segment, step, none));
    kill_point("switch.after_step_sums");  // applied, the clocks not moved yet
    for (std::uint64_t i = 0; i < h.slice_count; ++i) store_release(segment.slice(i).clock, step + 1);
    bump_counter(segment.group(0).steps, std::uint64_t{1});
    store_release(segment.group(0).clock, step + 1);
    bump_counter(h.steps, std::uint64_t{1});
  }
  for (std::uint64_t i = 0; i < h.slice_count; ++i) segment.slice(i).sum_step = 0;
  for (std::uint32_t r = 0; r < h.max_workers; ++r) store_release(segment.slot(r).streamed_step, std::uint64_t{0});
  return pending;
}

void switch_consistency(Segment& segment, Consistency mode, std::uint32_t staleness) {
  SegmentHeader& h = segment.header();
  const auto old = static_cast<Consistency>(load_own(h.consistency));
  if (mode == Consistency::bsp && old != Consistency::bsp) {
    for (std::uint32_t g = 0; g < h.group_count; ++g) {
      std::uint64_t start = UINT64_MAX;
      // A worker's clock counts the clock records it wrote, but its ring may still hold records of
      // earlier steps that the old mode has not consumed yet (a fast pusher in ASP runs a ring's
      // length ahead). BSP starts at the oldest of those steps: started at the worker's clock, it
      // would hold them in the ring until that step ends, and a worker whose next step no longer
      // fits beside them would wait for room forever (found by the soak, tests/crash/test_soak.cpp).
      for (std::uint32_t r = segment.group_first_rank(g); r < segment.group_end_rank(g); ++r) {
        if (!counts_for_group(h, segment.slot(r))) continue;
        std::uint64_t at = load_acquire(segment.slot(r).clock);
        const RingHeader& ring = segment.ring(r);
        if (load_acquire(ring.tail) != load_own(ring.head)) at = std::min(at, load_own(segment.slot(r).consumed_clock));
        start = std::min(start, at);
      }
      if (start == UINT64_MAX) start = load_own(segment.group(g).clock);
      if (h.group_count == 1)
        for (std::uint64_t i = 0; i < h.slice_count; ++i) store_release(segment.slice(i).clock, start);
      store_release(segment.group(g).clock, start);
    }
  }
  store_release(h.staleness, staleness);
  store_release(h.consistency, static_cast<std::uint32_t>(mode));
}

void apply_spec_policy(Segment& segment, const ModelSpec& spec) {
  SegmentHeader& h = segment.header();
  switch_consistency(segment, spec.consistency, spec.staleness);
  store_release(h.bsp_aggregate, static_cast<std::uint32_t>(spec.bsp_aggregate));
  store_release(h.on_worker_death, static_cast<std::uint32_t>(spec.on_worker_death));
}

std::string bsp_ring_note(const Segment& segment) {
  if (segment.streams_bsp_steps()) return {};  // its steps stream into the step sums: they need not fit
  const LayoutPlan plan = plan_of(segment);
  const std::uint64_t need = bsp_step_ring_bytes(plan.params);
  if (plan.ring_bytes >= need) return {};
  return "each worker's ring holds " + std::to_string(plan.ring_bytes) + " bytes, less than one BSP step that pushes "
         "every parameter (" + std::to_string(need) + " bytes): such a step fails in the worker with what to do; push "
         "less per step, or make the job again with ring_bytes >= " + std::to_string(need) +
         " (or with consistency = \"bsp\" in the spec, which sizes the rings for a step or, if that takes more than 32 MiB, "
         "gives the job step sums)";
}

}  // namespace shmps::server
