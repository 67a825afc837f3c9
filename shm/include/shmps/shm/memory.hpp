// What a segment costs, part by part: one computation from its layout plan, used for a spec
// that is not running (shmps-server --plan) and for a live job (shmps-ctl inspect), so that the
// two always agree.
//
//   values             the parameters, float32: what the model is
//   optimizer state    0, 1 or 2 arrays of the values' size (momentum, Adam's two moments, ...)
//   rings              one push ring per worker slot (ring_bytes each, and its 192-byte header)
//   worker slots       one WorkerSlot per worker slot
//   slice table        one 64-byte SliceEntry per slice (version word, clock)
//   exactly-once table one u64 per slice and worker slot (the last push applied)
//   redo log           one entry per server apply thread: a slice's values and state
//   metrics tables     per-parameter statistics and per-worker rejected counts
//   parameter table    one ParamEntry per parameter
//   header             the SegmentHeader (with the shmps-ctl mailbox)
//   alignment padding  between regions (pages; 2 MiB for big regions) and parameters
//
// overhead = total - values - optimizer state: what the job costs beyond the model itself.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <shmps/shm/segment.hpp>

namespace shmps::shm {

struct MemoryPart {
  std::string name;
  std::uint64_t bytes = 0;
  std::string detail;  // "8 x 8.0 MiB", ...
};

struct MemoryBreakdown {
  std::vector<MemoryPart> parts;  // in the order above; they add up to total_bytes
  std::uint64_t values_bytes = 0, state_bytes = 0;
  std::uint64_t ring_each_bytes = 0;  // per worker slot: its header and records
  std::uint64_t total_bytes = 0;
  std::uint64_t overhead_bytes() const noexcept { return total_bytes - values_bytes - state_bytes; }
  // Overhead as a percentage of values + optimizer state.
  double overhead_percent() const noexcept;
  // The bytes of the part called `name`, or 0.
  std::uint64_t bytes_of(std::string_view name) const noexcept;
};

MemoryBreakdown memory_breakdown(const LayoutPlan& plan);

// The breakdown as a table, one line per part, then "total" and "overhead" (every line ends in
// '\n'):
//   PART                         BYTES        SIZE  DETAIL
//   values                   1073741824     1.0 GiB  256 parameters, 268435456 floats
//   ...
std::string memory_table(const MemoryBreakdown& m);

// 1536 -> "1.5 KiB" (one decimal; B, KiB, MiB, GiB, TiB).
std::string human_bytes(std::uint64_t bytes);

}  // namespace shmps::shm
