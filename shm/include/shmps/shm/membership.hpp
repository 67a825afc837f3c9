// Who counts for a BSP barrier or an SSP staleness bound. The server (deciding a step) and the
// workers (deciding whether they may pull) apply the same rule; it only reads.
#pragma once

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/layout.hpp>

namespace shmps::shm {

// A worker slot counts while its holder is attached, has been admitted by the server (see
// WorkerSlot::admitted_generation), and is not proven dead; with on_worker_death = wait a dead
// holder still counts until a process takes the slot again.
inline bool counts_for_group(const SegmentHeader& h, const WorkerSlot& slot) noexcept {
  if (load_acquire(slot.state) != static_cast<std::uint32_t>(SlotState::attached)) return false;
  const std::uint64_t generation = load_acquire(slot.generation);
  if (load_acquire(slot.admitted_generation) != generation) return false;
  if (load_acquire(slot.dead_generation) != generation) return true;
  return load_acquire(h.on_worker_death) == static_cast<std::uint32_t>(OnWorkerDeath::wait);
}

}  // namespace shmps::shm
