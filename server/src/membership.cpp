#include "membership.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdint>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/membership.hpp>
#include <shmps/shm/worker_slot.hpp>

namespace shmps::server {

using namespace shmps::shm;

void Membership::probe_deaths() {
  const SegmentHeader& h = segment_->header();
  for (std::uint32_t r = 0; r < h.max_workers; ++r) {
    WorkerSlotServerView slot(segment_->slot(r));
    if (slot.state() != SlotState::attached) continue;
    const std::uint64_t generation = slot.generation();
    if (slot.dead_generation() == generation) continue;
    if (slots_lock_->probe(r) != Holder::none) continue;
    // The lock is free. A worker attaching right now takes the lock before it bumps the
    // generation, so an unchanged generation means this holder is certainly gone.
    if (slot.generation() != generation) continue;
    slot.mark_dead(generation);
    ++deaths_seen_;
    spdlog::warn("event=worker_dead segment={} rank={} pid={} generation={} published={} applied={}", h.name, r,
                 slot.pid(), generation, slot.published(), slot.applied());
  }
}

void Membership::admit_new_workers() {
  const SegmentHeader& h = segment_->header();
  for (std::uint32_t r = 0; r < h.max_workers; ++r) {
    WorkerSlotServerView slot(segment_->slot(r));
    if (slot.state() != SlotState::attached) continue;
    const std::uint64_t generation = slot.generation();
    if (slot.admitted_generation() == generation) continue;
    std::uint64_t entry = slot.clock();
    if (load_own(h.consistency) == static_cast<std::uint32_t>(Consistency::bsp))
      entry = std::max(entry, load_own(segment_->group(segment_->group_of(r)).clock));
    slot.admit(generation, entry);
  }
}

void Membership::evict_stragglers(std::chrono::milliseconds timeout, std::uint64_t now_ns) {
  SegmentHeader& h = segment_->header();
  const std::uint32_t groups = h.group_count;
  held_.resize(groups);
  const auto mode = static_cast<Consistency>(load_own(h.consistency));
  const bool bsp = mode == Consistency::bsp, ssp = mode == Consistency::ssp;
  const std::uint64_t bound = ssp ? load_own(h.staleness) : 0;
  const bool streamed = bsp && segment_->streams_bsp_steps();
  for (std::uint32_t g = 0; g < groups; ++g) {
    GroupEntry& entry = segment_->group(g);
    Held& held = held_[g];
    // The clock the group waits on. BSP: the step the group is collecting, held by the members
    // that have not ended it while another has. SSP: the slowest counting member's clock, held
    // by the members at it while another is past the bound (clock > slowest + bound: its next
    // pull waits for them).
    std::uint64_t step = load_own(entry.clock);
    if (ssp) {
      step = UINT64_MAX;
      for (std::uint32_t r = segment_->group_first_rank(g); r < segment_->group_end_rank(g); ++r)
        if (counts_for_group(h, segment_->slot(r))) step = std::min(step, load_acquire(segment_->slot(r).clock));
    }
    const std::uint64_t waits_past = ssp ? (step > UINT64_MAX - bound ? UINT64_MAX : step + bound) : step;
    // Who holds it. A straggler is live and alone with that: a dead member that still counts
    // (on_worker_death = wait) holds it by the user's choice, and in a streamed step a member with
    // part of the step in the sums cannot be taken out of them (collect_streamed_step): neither is
    // evicted, nor anyone with them. In SSP a member's pushes are applied as they come, and its
    // committed ones must all be applied: the timeout runs only while the server has drained the
    // rings of those behind (a stopped worker adds nothing to its own).
    std::vector<std::uint32_t> behind;
    bool someone_waits = false, evictable = bsp || ssp, drained = true;
    for (std::uint32_t r = segment_->group_first_rank(g); r < segment_->group_end_rank(g); ++r) {
      WorkerSlot& slot = segment_->slot(r);
      if (!counts_for_group(h, slot)) continue;
      const std::uint64_t clock = load_acquire(slot.clock);
      if (clock > waits_past) {
        someone_waits = true;
        continue;
      }
      if (clock > step) continue;  // SSP: ahead of the slowest, within the bound
      behind.push_back(r);
      const std::uint64_t generation = load_acquire(slot.generation);
      if (load_own(slot.dead_generation) == generation) evictable = false;
      if (streamed && load_own(slot.streamed_step) == step + 1) evictable = false;
      const RingHeader& ring = segment_->ring(r);
      if (ssp && load_own(ring.head) != load_acquire(ring.tail)) drained = false;
    }
    if (!evictable || !someone_waits || behind.empty()) {
      held.by.clear();
      if (load_own(entry.straggler_since_ns) != 0) store_release(entry.straggler_since_ns, std::uint64_t{0});
      continue;
    }
    // SSP: the wait counts only from when the server has drained the rings of those behind, so
    // that a healthy worker held back by a full ring (a slow server) is not taken for a straggler.
    if (held.by != behind || held.step != step || held.since_ns == 0 ||
        held.mode != static_cast<std::uint32_t>(mode) || !drained) {
      held = Held{step, behind, now_ns, static_cast<std::uint32_t>(mode)};
      store_release(entry.straggler_since_ns, now_ns);
      continue;
    }
    const std::uint64_t behind_ms = (now_ns - held.since_ns) / 1'000'000ULL;
    if (timeout.count() == 0 || behind_ms < static_cast<std::uint64_t>(timeout.count())) continue;
    for (std::uint32_t r : behind) {
      WorkerSlotServerView slot(segment_->slot(r));
      const std::uint64_t generation = slot.generation();
      slot.evict(generation, behind_ms);
      store_release(h.stragglers_evicted, load_own(h.stragglers_evicted) + 1);
      store_release(entry.evictions, load_own(entry.evictions) + 1);
      if (bsp)
        spdlog::warn("event=straggler_evicted segment={} rank={} pid={} generation={} group={} step={} behind_ms={} "
                     "straggler_timeout_ms={} reason=\"alive but it alone held the barrier of step {} for {} ms; the "
                     "step goes on without it, its open step is discarded, and its rank may be restarted\"",
                     h.name, r, slot.pid(), generation, g, step, behind_ms, timeout.count(), step, behind_ms);
      else
        spdlog::warn("event=straggler_evicted segment={} rank={} pid={} generation={} group={} step={} behind_ms={} "
                     "straggler_timeout_ms={} reason=\"alive but it alone held the SSP bound (ssp:{}) at clock {} for "
                     "{} ms; the others go on without it, every push it committed before is applied, and its rank "
                     "may be restarted\"",
                     h.name, r, slot.pid(), generation, g, step, behind_ms, timeout.count(), bound, step, behind_ms);
    }
    held = Held{};
    store_release(entry.straggler_since_ns, std::uint64_t{0});
  }
}

bool Membership::counts(std::uint32_t rank) const {
  return counts_for_group(segment_->header(), segment_->slot(rank));
}

}  // namespace shmps::server
