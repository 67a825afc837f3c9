// The redo protocol: how a slice's new state gets into the segment so that a server killed at
// any instruction leaves no torn slice and applies no push twice.
//
// An apply thread computes a slice's new values, optimizer state and exactly-once row in its own
// RedoEntry (layout.hpp), marks the entry valid, copies it in (copy_in), and clears the mark. A
// server killed in between leaves the entry valid and the slice's version word odd; the next
// server copies the entry in again (recovery.hpp), which is idempotent.
//
// A bf16 or fp16 parameter: the entry holds float32 values already rounded to the dtype, and the
// copy narrows them into the slice's 2-byte elements (exact, so a replay writes the same bytes).
// A table with lazy Adam: the entry also holds the rows' new step counts, copied in with them.
#pragma once

#include <shmps/shm/segment.hpp>

namespace shmps::server {

// Copies a redo entry into its slice under the slice's seqlock: values, optimizer state, the
// exactly-once row and the step count (and a streamed BSP step's clock), then the new version
// word. An entry for the slice's step sums (streamed BSP) copies the sums, the exactly-once row
// and the sums' step instead, with no seqlock (only the server reads sums). Idempotent.
void copy_in(shm::Segment& segment, shm::RedoEntry& entry);

// The values of slice `slice` of parameter p (p.dtype: float32, or bf16 / fp16 widened exactly)
// into out[0, slice.count): how an update reads the current values into its redo entry.
void read_slice_values(const shm::Segment& segment, const shm::ParamEntry& p, const shm::SliceEntry& slice, float* out);

// A table whose optimizer keeps row words (p.row_words_offset != 0: lazy Adam's step counts,
// row-wise AdaGrad's accumulators): the slice's rows' words into the entry's, as they are, so
// that a whole copy-in keeps them (or the caller steps some). Nothing for any other parameter.
// The same for a keyed table's KeySlots (is_keyed(p)): the slice's, into the entry.
void read_slice_key_slots(shm::Segment& segment, const shm::ParamEntry& p, const shm::SliceEntry& slice,
                          shm::RedoEntry& entry);
void read_slice_row_words(shm::Segment& segment, const shm::ParamEntry& p, const shm::SliceEntry& slice,
                          shm::RedoEntry& entry);

}  // namespace shmps::server
