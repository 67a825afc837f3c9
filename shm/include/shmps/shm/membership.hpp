// Who counts for a BSP barrier or an SSP staleness bound. The server (deciding a step) and the
// workers (deciding whether they may pull) apply the same rule; it only reads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/layout.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::shm {

// Whether the slot's holder was evicted from its BSP barrier or SSP bound as a straggler (its generation is the
// evicted one; a new process taking the rank is not).
inline bool evicted(const WorkerSlot& slot) noexcept {
  const std::uint64_t generation = load_acquire(slot.generation);
  return generation != 0 && load_acquire(slot.evicted_generation) == generation;
}

// A worker slot counts while its holder is attached, has been admitted by the server (see
// WorkerSlot::admitted_generation), is not proven dead and was not evicted as a straggler; with
// on_worker_death = wait a dead holder still counts until a process takes the slot again (an
// evicted one does not: evicting is the server's decision to go on without it).
inline bool counts_for_group(const SegmentHeader& h, const WorkerSlot& slot) noexcept {
  if (load_acquire(slot.state) != static_cast<std::uint32_t>(SlotState::attached)) return false;
  const std::uint64_t generation = load_acquire(slot.generation);
  if (load_acquire(slot.admitted_generation) != generation) return false;
  if (load_acquire(slot.evicted_generation) == generation) return false;
  if (load_acquire(slot.dead_generation) != generation) return true;
  return load_acquire(h.on_worker_death) == static_cast<std::uint32_t>(OnWorkerDeath::wait);
}

// BSP: the step group g is collecting (GroupEntry::clock).
inline std::uint64_t group_clock(const Segment& segment, std::uint32_t g) noexcept {
  return load_acquire(segment.group(g).clock);
}

// Whether any worker of group g counts: a group nobody has joined never steps, so it must not
// hold back what is measured against every group.
inline bool group_has_workers(const Segment& segment, std::uint32_t g) noexcept {
  for (std::uint64_t r = segment.group_first_rank(g); r < segment.group_end_rank(g); ++r)
    if (counts_for_group(segment.header(), segment.slot(r))) return true;
  return false;
}

// The slowest clock among the worker groups that have workers: each of them has completed every
// step before it. With no worker anywhere (a stopped job), the slowest of all groups, which is
// safe to resume every group from. With one group it is that group's clock (what the monitor
// calls the model clock).
inline std::uint64_t slowest_group_clock(const Segment& segment) noexcept {
  std::uint64_t slowest_with_workers = UINT64_MAX, slowest = UINT64_MAX;
  for (std::uint32_t g = 0; g < segment.header().group_count; ++g) {
    const std::uint64_t clock = group_clock(segment, g);
    slowest = std::min(slowest, clock);
    if (group_has_workers(segment, g)) slowest_with_workers = std::min(slowest_with_workers, clock);
  }
  if (slowest_with_workers != UINT64_MAX) return slowest_with_workers;
  return slowest == UINT64_MAX ? 0 : slowest;
}

// "clock 12" with one group; "group clocks 12, 9" with several (group 0 first).
inline std::string group_clocks_text(const Segment& segment) {
  const std::uint32_t groups = segment.header().group_count;
  std::string text = groups == 1 ? "clock " : "group clocks ";
  for (std::uint32_t g = 0; g < groups; ++g) text += (g ? ", " : "") + std::to_string(group_clock(segment, g));
  return text;
}

}  // namespace shmps::shm
