// What the read-only tools (shmps-ctl, shmps-top) say about a segment's processes: whether a
// live process holds a lock byte, and the status of a worker slot. Both only probe the lock files
// (a probe takes no lock) and read the segment: they can never block or change a job.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/layout.hpp>
#include <shmps/shm/liveness.hpp>
#include <shmps/shm/proc.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::tools {

// A live worker whose heartbeat is older than this is shown "suspect" (never "dead": only the
// kernel's lock proves a death).
inline constexpr std::uint64_t kSuspectAfterNs = 5'000'000'000ULL;

// Whether a live process holds byte `byte` of a lock file; "unknown" if it cannot be read.
inline std::string holder(const std::string& path, unsigned byte, bool& alive) {
  alive = false;
  if (!std::filesystem::exists(path)) return "none";
  try {
    alive = shm::LockFile::open_for_probe(path).probe(byte) == shm::Holder::alive;
    return alive ? "alive" : "none";
  } catch (const Error&) {
    return "unknown";
  }
}

inline std::string state_name(std::uint32_t s) {
  switch (static_cast<shm::SegmentState>(s)) {
    case shm::SegmentState::creating: return "creating";
    case shm::SegmentState::ready: return "ready";
    case shm::SegmentState::stopping: return "stopping";
    case shm::SegmentState::stopped: return "stopped";
  }
  return "unknown(" + std::to_string(s) + ")";
}

// What a worker slot is, from its own words and the kernel's lock (never from time alone):
// free, left, evicted (from its BSP barrier as a straggler, alive or not: that generation never
// counts again; a new process taking the rank does), dead, suspect or alive.
inline std::string slot_status(const shm::Segment& seg, unsigned r, const shm::LockFile* slots_lock) {
  using namespace shm;
  const WorkerSlot& slot = seg.slot(r);
  const auto state = static_cast<SlotState>(load_acquire(slot.state));
  if (state == SlotState::free) return "free";
  if (state == SlotState::left) return "left";
  const std::uint64_t generation = load_acquire(slot.generation);
  if (load_acquire(slot.evicted_generation) == generation) return "evicted";
  if (load_acquire(slot.dead_generation) == generation) return "dead";
  if (slots_lock && slots_lock->probe(r) == Holder::none) return "dead";
  if (monotonic_ns() - load_acquire(slot.heartbeat_ns) > kSuspectAfterNs) return "suspect";
  return "alive";
}

}  // namespace shmps::tools
