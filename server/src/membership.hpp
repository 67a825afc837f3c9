// Membership: who is in the job. Deaths are learnt from the kernel (a worker's lock on its byte of
// <name>.slots.lock is free: its holder is gone), never guessed from time; new generations are
// admitted between two rounds; who counts for a barrier is shm::counts_for_group, the one rule
// the server and the workers share (membership.hpp in shm/).
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

#include <shmps/shm/liveness.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::server {

class Membership {
 public:
  Membership(shm::Segment& segment, shm::LockFile& slots_lock) : segment_(&segment), slots_lock_(&slots_lock) {}

  // Probes the lock of every attached slot not yet known dead; marks the dead ones
  // (dead_generation) and logs them.
  void probe_deaths();

  // Admits every newly attached generation: its entry clock is the step its worker group is
  // collecting (BSP) or the clock it brought (never lower than the one its slot reached). Wakes the worker.
  void admit_new_workers();

  // Stragglers (docs/consistency.md#stragglers), in each worker group. BSP: the live members that
  // have not ended the step the group is collecting while another live member has. SSP: the live
  // members at the group's slowest clock while another is past the bound. Once the same ones
  // have held the others alone for `timeout` (0: never), they are evicted
  // (WorkerSlot::evicted_generation), in SSP only once their rings are drained: they stop
  // counting, so the step or the bound goes on without them, and in BSP their open step is
  // discarded (collect.hpp). Logged (event=straggler_evicted) and counted.
  // Keeps each group's GroupEntry::straggler_since_ns, which the waiting workers' messages use.
  // `now_ns`: CLOCK_MONOTONIC.
  void evict_stragglers(std::chrono::milliseconds timeout, std::uint64_t now_ns);

  // Whether `rank` counts for a BSP barrier or an SSP bound now.
  bool counts(std::uint32_t rank) const;

  std::uint64_t deaths_seen() const noexcept { return deaths_seen_; }

 private:
  shm::Segment* segment_;
  shm::LockFile* slots_lock_;
  std::uint64_t deaths_seen_ = 0;
  // Per worker group: the step and the members holding its barrier when first seen so, and when.
  struct Held {
    std::uint64_t step = 0;
    std::vector<std::uint32_t> by;
    std::uint64_t since_ns = 0;
    std::uint32_t mode = 0;  // Consistency: a live switch starts the wait anew
  };
  std::vector<Held> held_;
};

}  // namespace shmps::server
