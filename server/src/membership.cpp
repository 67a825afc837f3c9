#include "membership.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/futex.hpp>
#include <shmps/shm/membership.hpp>

namespace shmps::server {

using namespace shmps::shm;

void Membership::probe_deaths() {
  const SegmentHeader& h = segment_->header();
  for (std::uint32_t r = 0; r < h.max_workers; ++r) {
    WorkerSlot& slot = segment_->slot(r);
    if (load_acquire(slot.state) != static_cast<std::uint32_t>(SlotState::attached)) continue;
    const std::uint64_t generation = load_acquire(slot.generation);
    if (load_own(slot.dead_generation) == generation) continue;
    if (slots_lock_->probe(r) != Holder::none) continue;
    // The lock is free. A worker attaching right now takes the lock before it bumps the
    // generation, so an unchanged generation means this holder is certainly gone.
    if (load_acquire(slot.generation) != generation) continue;
    store_release(slot.dead_generation, generation);
    ++deaths_seen_;
    spdlog::warn("event=worker_dead segment={} rank={} pid={} generation={} published={} applied={}", h.name, r,
                 load_acquire(slot.pid), generation, load_acquire(slot.published), load_own(slot.applied));
  }
}

void Membership::admit_new_workers() {
  const SegmentHeader& h = segment_->header();
  for (std::uint32_t r = 0; r < h.max_workers; ++r) {
    WorkerSlot& slot = segment_->slot(r);
    if (load_acquire(slot.state) != static_cast<std::uint32_t>(SlotState::attached)) continue;
    const std::uint64_t generation = load_acquire(slot.generation);
    if (load_own(slot.admitted_generation) == generation) continue;
    std::uint64_t entry = load_acquire(slot.clock);
    if (load_own(h.consistency) == static_cast<std::uint32_t>(Consistency::bsp))
      entry = std::max(entry, load_own(h.model_clock));
    store_release(slot.admitted_clock, entry);
    store_release(slot.admitted_generation, generation);
    store_release(slot.progress, load_own(slot.progress) + 1);
    fence_store_load();
    if (load_acquire(slot.waiting)) futex_wake_all(slot.progress);
  }
}

bool Membership::counts(std::uint32_t rank) const {
  return counts_for_group(segment_->header(), segment_->slot(rank));
}

}  // namespace shmps::server
