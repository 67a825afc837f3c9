// The chunked apply: a slice's update computed and written in place a few KiB at a time.
//
// Why: the whole-slice redo (redo.hpp) computes a 64 KiB slice's new values into the redo entry
// and then copies them in: the copy is a second pass over the slice through L2, and it costs a
// third of the apply's speed next to a plain `p -= lr * g` loop. Here each chunk's new values are
// computed into the redo entry (in L1) and copied into the slice at once, so the slice is read
// and written once, as by the plain loop.
//
// Crash safety is the whole-slice redo's, chunk by chunk (layout.hpp, RedoEntry): the entry
// names the update's inputs before the first chunk, says which elements are done, and holds the
// pending chunk while it is copied. A server killed mid-slice leaves the entry valid and the
// slice's version word odd; finish_chunked (called by the next server before its first round)
// copies the pending chunk in again and computes the rest from the same inputs, which are still
// in the rings (a round publishes nothing before its apply is done, round.hpp) or in the step
// sums. The slice then holds exactly what the dead server would have written.
#pragma once

#include <cstdint>
#include <span>

#include <shmps/shm/segment.hpp>

namespace shmps::server {

// Elements per chunk: values, gradient and two state arrays, old and new, stay within a 32 KiB L1.
inline constexpr std::uint64_t kApplyChunkFloats = 1024;

// One input's part of the slice: gradient elements [lo, lo + n) of the slice (lo relative to
// the slice's first element), scaled by `scale` (clip_norm).
struct SlicePart {
  const float* grad = nullptr;
  std::uint64_t lo = 0;
  std::uint64_t n = 0;
  float scale = 1.0f;
  std::uint32_t rank = 0;
};

// Runs the update that `entry` describes (valid, mode != whole, its exactly-once row, step_after,
// version_after and clock_after filled in) over the slice's elements from entry.done on, then
// publishes the slice (row, step, clock, version) and clears the entry. `parts` are the inputs'
// parts in entry order (none for mode sums). If `value_sq_norm` is given, the squared norm of the
// new values is added to it (the monitor's sample; only meaningful when done started at 0).
void run_chunks(shm::Segment& segment, shm::RedoEntry& entry, std::span<const SlicePart> parts,
                double* value_sq_norm);

// For a restarted server: finishes a chunked update that a killed server left in `entry`.
// Throws shmps::Error if an input the entry names is no longer in its ring (a damaged segment).
void finish_chunked(shm::Segment& segment, shm::RedoEntry& entry);

}  // namespace shmps::server
