// Reading parameter values out of a segment, each slice whole (the seqlock read of ARCHITECTURE.md's
// "Pull"). Used by the worker's pull and by read-only tools; it only reads.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>

#include <shmps/shm/segment.hpp>

namespace shmps::shm {

struct SliceReadResult {
  std::uint64_t min_version = 0;              // smallest slice version (updates applied) seen
  std::optional<std::uint64_t> stuck_slice;  // set if a slice stayed mid-update for the whole timeout
};

// Copies elements [offset, offset + out.size()) of parameter `p` into `out`, each slice from one
// version. A version word that stays odd for `timeout` (a server died mid-write and no server
// has repaired it yet) stops the read and names the slice; `out` is then incomplete. A bf16 or
// fp16 parameter's values are widened to float32 (exactly) on the way.
SliceReadResult read_param(const Segment& segment, const ParamEntry& p, std::uint64_t offset, std::span<float> out,
                           std::chrono::milliseconds timeout);
// A table with keys = "u64", whole: its slots' rows into `values` (p.size floats) and their
// KeySlots into `slots` (one per row), each slice's rows and KeySlots from one version.
SliceReadResult read_keyed_table(const Segment& segment, const ParamEntry& p, std::span<float> values,
                                 std::span<KeySlot> slots, std::chrono::milliseconds timeout);
// The same for a bf16 or fp16 parameter, copying its stored 2-byte values as they are (the caller
// checks p.dtype != DType::f32).
SliceReadResult read_param_raw(const Segment& segment, const ParamEntry& p, std::uint64_t offset,
                               std::span<std::uint16_t> out, std::chrono::milliseconds timeout);

// Copies rows ids[k] of table `p` (ParamEntry::table_dim values each; a bf16 / fp16 table's widened
// exactly to float32) into out[k * dim, ...),
// each row whole from one version of its slice. The ids must be in range (the caller checks).
SliceReadResult read_rows(const Segment& segment, const ParamEntry& p, std::span<const std::uint64_t> ids,
                          std::span<float> out, std::chrono::milliseconds timeout);

// The same, copying a bf16 / fp16 table's stored 2-byte values as they are (the caller checks
// p.dtype != DType::f32).
SliceReadResult read_rows_raw(const Segment& segment, const ParamEntry& p, std::span<const std::uint64_t> ids,
                              std::span<std::uint16_t> out, std::chrono::milliseconds timeout);

// A table with keys = "u64": rows of keys[k] into out[k * dim, ...). A key in a slot is copied
// with its KeySlot under the slice's seqlock and kept only if the KeySlot still names the key;
// a key in no slot (never admitted, evicted, or given its slot after the index was read) reads
// as its init (keyed_init_row). `index_stuck` is set if the key index stayed mid-change for
// `timeout` (nothing is read then).
SliceReadResult read_keyed_rows(const Segment& segment, const ParamEntry& p, std::span<const std::uint64_t> keys,
                                std::span<float> out, std::chrono::milliseconds timeout, bool& index_stuck);

}  // namespace shmps::shm
