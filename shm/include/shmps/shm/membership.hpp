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

// BSP: the step group g is collecting (GroupEntry::clock).
inline std::uint64_t group_clock(const Segment& segment, std::uint32_t g) noexcept {
  return load_acquire(segment.group(g).clock);
}

// The slowest worker group's clock: every group has completed every step before it. With one
// group it is that group's clock (what the monitor calls the model clock).
inline std::uint64_t slowest_group_clock(const Segment& segment) noexcept {
  std::uint64_t slowest = UINT64_MAX;
  for (std::uint32_t g = 0; g < segment.header().group_count; ++g) slowest = std::min(slowest, group_clock(segment, g));
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
