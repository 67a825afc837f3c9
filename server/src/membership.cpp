#include "membership.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

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

bool Membership::counts(std::uint32_t rank) const {
  return counts_for_group(segment_->header(), segment_->slot(rank));
}

}  // namespace shmps::server
