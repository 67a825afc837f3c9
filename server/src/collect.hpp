// Collectors: from the workers' rings into a round plan (round.hpp). Which one a round uses is
// the consistency policy's choice (consistency.hpp).
//
// Both read only committed records (the one ring walk, RingConsumer::read) and move nothing:
// the publisher moves each ring's head after the apply (publish.hpp). A malformed record (a
// buggy or hostile worker) is logged and the rest of that ring discarded; the server never reads
// outside the ring and never applies a range outside its parameter.
#pragma once

#include <cstdint>
#include <vector>

#include <shmps/shm/ring.hpp>
#include <shmps/shm/segment.hpp>

#include "round.hpp"

namespace shmps::server {

// ASP and SSP: every committed push, as it comes. Clock records only move the cursor (and hand
// over the resume state they carry).
void collect_as_they_come(shm::Segment& segment, const std::vector<shm::RingConsumer>& rings, RoundPlan& plan);

// BSP: the pushes of step `step` of worker group `group` from each of its workers' rings, if
// every worker of the group that counts for the barrier (membership.hpp) has finished that step:
// true. Otherwise false, and the plan takes nothing from those rings but padding (and puts) in
// front of their first records. Only the group's rings are read: a step counts the group's own
// workers, so workers of two groups never complete each other's step. A group with no worker
// that counts and nothing of the step in its rings has no step: false.
//
// A ring holds runs of pushes, each closed by the clock record of the step it belongs to. A
// run counts in the step its clock record names (an older step's late run counts in the
// current one). A run with no clock record counts only once it gets one; if its generation
// died (the slot's holder is proven dead, or a newer generation wrote after it) it is discarded
// whole: a worker killed in the middle of a step contributes none of that step.
bool collect_step(shm::Segment& segment, const std::vector<shm::RingConsumer>& rings, std::uint32_t group,
                  std::uint64_t step, RoundPlan& plan);

// Streamed BSP (the rings hold less than a step, Segment::streams_bsp_steps): takes every
// committed push of step `step` (or an earlier one) as it comes, to be added to the step sums,
// and returns whether every worker that must has finished the step. A worker must if it counts
// for the barrier (membership.hpp), or if pushes of its open step are already in the sums, alive
// or not: a worker that dies in the middle of a streamed step holds the step until its slot's
// next process finishes it (Worker::push skips what the predecessor committed). Records of a
// step that was completed without their writer (it died before any of its step was summed) are
// discarded.
bool collect_streamed_step(shm::Segment& segment, const std::vector<shm::RingConsumer>& rings, std::uint64_t step,
                           RoundPlan& plan);

// ---- Shared by the collectors (collect.cpp) ---------------------------------------------------

// Adds the slices a push record touches (a rows record: the slices of its rows, with the rows in
// row_refs); false (nothing added, logged) if the record's range is outside its parameter, its
// ids outside its table, or its kind not the parameter's (a dense push to a table, rows to a
// dense parameter).
bool add_contributions(const shm::Segment& segment, std::uint32_t rank, const shm::PushRecord& record,
                       std::vector<Contribution>& out, std::vector<RowRef>& row_refs);

// Keeps the resume state a clock record carries in its worker's slot, for a restarted worker.
// Called before the ring's head moves past the record.
void keep_resume_state(shm::Segment& segment, std::uint32_t rank, const shm::PushRecord& clock_record);

// Logs a malformed record at `position` of `rank`'s ring.
void log_bad_record(const shm::Segment& segment, std::uint32_t rank, std::uint64_t position);

}  // namespace shmps::server
