// The apply engine: a round plan's contributions into the slices, in parallel over slices.
//
// Each slice goes to exactly one task in a round, which is what makes the task that slice's lock:
// no two server threads ever write one slice at once. Within a slice, contributions are taken in
// rank order (the collectors add them rank by rank and the engine's sort is stable), so a round
// is deterministic given its plan. Exactly once: a contribution whose push sequence number is at
// or below the slice's exactly-once row for its rank was applied before a server restart and is
// skipped. Every slice's new state goes in through the redo protocol (redo.hpp).
//
// The engine knows nothing of rings, workers or policies: it is used on its own in the unit tests
// (a plan in, slices out).
#pragma once

#include <tbb/task_arena.h>

#include <cstdint>
#include <span>
#include <vector>

#include <shmps/shm/segment.hpp>

#include "round.hpp"

namespace shmps::server {

// How a slice's contributions in one round become optimizer steps.
enum class Aggregation {
  each,  // ASP, SSP: one optimizer step per contribution, in rank order
  sum,   // BSP: the contributions summed in rank order, one optimizer step
  mean,  // BSP: the sum divided by the number of ranks that contributed, one optimizer step
};

struct ApplyTotals {
  std::uint64_t floats = 0;   // gradient elements applied
  std::uint64_t skipped = 0;  // contributions applied before a server restart (exactly once)
};

class ApplyEngine {
 public:
  // Uses up to arena.max_concurrency() threads; each needs its own redo entry, so the arena must
  // not have more threads than the segment has redo entries.
  ApplyEngine(shm::Segment& segment, tbb::task_arena& arena) : segment_(&segment), arena_(&arena) {}

  // Applies `contributions` (sorted here by slice, stably) with the optimizer in the segment's
  // header. Updates each slice's version, step and value-norm sample, and the per-parameter
  // monitor counters.
  // A table's slices (rows records) are merged per round instead: each touched row gets one
  // step of its rows' sum (or mean, with Aggregation::mean), whatever the aggregation; their
  // rows are in `row_refs` (RoundPlan::row_refs), a keyed table's slots' keys in `keyed_rows`.
  ApplyTotals apply(std::vector<Contribution>& contributions, Aggregation aggregation,
                    std::span<const RowRef> row_refs = {}, std::span<const KeyedRow> keyed_rows = {});

  // Streamed BSP steps (the rings hold less than a step): the step's pushes are added, as they
  // come, to the slices' step sums (exactly once, through the redo protocol, like values); once
  // every worker has finished the step, apply_step_sums makes one optimizer step per slice from
  // its sums (times `scale`), and sets the slice's clock to step + 1 with its values, so that a
  // server killed in the middle applies no slice's step twice.
  ApplyTotals add_to_step_sums(std::vector<Contribution>& contributions, std::uint64_t step);
  ApplyTotals apply_step_sums(std::uint64_t step, float scale);

  // One apply thread's additions to one parameter's monitor counters in a round (apply.cpp).
  struct ParamCounts {
    std::uint64_t slice_updates = 0, floats = 0, rows = 0;
  };

 private:
  // Per apply thread (on lines of their own): what its slices added, summed by end_counts() and
  // added to the segment's counters once per round (begin_counts() zeroes them).
  struct alignas(64) ThreadCounts {
    std::uint64_t floats = 0, skipped = 0;
    std::vector<ParamCounts> params;
  };
  void begin_counts();
  ApplyTotals end_counts();
  std::vector<ThreadCounts> counts_;
  static constexpr std::size_t kPrefetchRuns = 6;  // how far ahead a thread fetches a slice's lines
  std::span<const RowRef> row_refs_;        // apply(): the round's rows (RoundPlan::row_refs)
  void sort_into_runs(std::vector<Contribution>& contributions);
  // Sorts the contributions into runs of one slice and calls update_slice(SliceUpdate&, run) for
  // each run, in parallel (one task per slice: the task is the slice's lock).
  // count_params: add each slice's optimizer steps, floats and rows to its parameter's counters.
  template <class Update>
  ApplyTotals for_each_slice_run(std::vector<Contribution>& contributions, Update&& update_slice,
                                 bool count_params = true);
  shm::Segment* segment_;
  tbb::task_arena* arena_;
  std::vector<std::size_t> run_starts_;  // where each slice's contributions begin (reused)
};

}  // namespace shmps::server
