// The consistency policy: ASP, BSP or SSP (and BSP's sum or mean), as the segment header says.
//
// It decides, for each round, which collector runs (collect.hpp) and how the apply engine
// combines a slice's contributions (apply.hpp); it advances BSP's steps, one clock per worker
// group (GroupEntry); and it switches the policy of a live job (shmps-ctl set, commands.hpp) at a
// clock boundary. SSP's bound is not
// enforced here: it is the workers' pulls that wait (the server applies SSP pushes as they come).
#pragma once

#include <cstdint>
#include <string>

#include <shmps/server/model_spec.hpp>
#include <shmps/shm/segment.hpp>

#include "apply.hpp"
#include "round.hpp"

namespace shmps::server {

// What this round does, read once at its start.
struct RoundPolicy {
  bool whole_steps = false;  // BSP: collect a whole step or nothing
  bool streamed_steps = false;  // BSP with rings smaller than a step: sum the step's pushes as they come
  // Streamed BSP: the step being collected (its one worker group's clock). Whole steps read each
  // group's clock as they collect it (Server::apply_round).
  std::uint64_t step = 0;
  Aggregation aggregation = Aggregation::each;
};
RoundPolicy policy_for_round(const shm::Segment& segment);

// Streamed BSP: the factor of step `step`'s sums: 1 for "sum", 1 / (the workers whose pushes are
// in the step's sums) for "mean".
float streamed_step_scale(const shm::Segment& segment, std::uint64_t step, const RoundPlan& plan);

// BSP: after a round that found step `step` of worker group `group` complete, moves the group's
// clock to step + 1 (its workers' pulls for the next step wait for that) and counts the step and
// its pushes in the group's entry; with one group, every slice's clock moves too. A step is
// complete even when nobody pushed; with no worker that took part in it (attached, or
// ended it in this round, or has pushes of it in the step sums) there is no step. True if the
// clock moved.
bool complete_step(shm::Segment& segment, std::uint32_t group, std::uint64_t step, const RoundPlan& plan);

// A live switch out of BSP in the middle of a streamed step (a round whose policy no longer
// streams steps, on a segment that has step sums): the pushes already in step `step`'s sums are
// applied as that step, once (a slice whose clock says it has the step is skipped), the slices'
// and the model clock move past it, and the sums are forgotten (every slice's sum_step and every
// slot's streamed_step back to 0), so that a later switch back to BSP starts its steps from zero.
// The rest of the step's pushes, sent after the switch, are then applied as they come. Idempotent:
// a server killed in the middle does it again (the sums' step marks stay until the clocks have
// moved). True if there were sums of the step.
bool apply_step_sums_left_by_a_switch(shm::Segment& segment, ApplyEngine& engine, std::uint64_t step);

// Switches a live job to `mode` (and SSP bound). Entering BSP starts each worker group at the
// clock of its slowest worker that counts, so faster workers wait for it at their next pull and
// nobody's finished steps are collected twice. Call between rounds only.
void switch_consistency(shm::Segment& segment, Consistency mode, std::uint32_t staleness);

// Sets the spec's consistency, bsp_aggregate and on_worker_death on a segment (a restored or
// recovered one, with --override-policy).
void apply_spec_policy(shm::Segment& segment, const ModelSpec& spec);

// "" when the rings of a segment hold one BSP step of every parameter, else what to do.
std::string bsp_ring_note(const shm::Segment& segment);

}  // namespace shmps::server
