#include "publish.hpp"

#include <algorithm>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/worker_slot.hpp>
#include <shmps/shm/killpoint.hpp>
#include <shmps/shm/proc.hpp>

namespace shmps::server {

using namespace shmps::shm;

namespace {

// Gives the bytes the round took back to the producers.
void release_rings(Segment& segment, std::vector<RingConsumer>& rings, RoundPlan& plan) {
  for (std::uint32_t r = 0; r < rings.size(); ++r) {
    RankRound& round = plan.ranks[r];
    WorkerSlotServerView slot(segment.slot(r));
    if (round.streamed_step != 0) slot.mark_streamed_step(round.streamed_step);  // before the head moves
    slot.raise_consumed_clock(round.clock);
    round.moved = round.end != rings[r].head();
    if (round.moved) rings[r].release_to(round.end);
  }
}

void count_round(SegmentHeader& h, const RoundPlan& plan, const RoundResult& result, std::uint64_t applied_at) {
  const std::uint64_t records = plan.records(), discarded = plan.discarded();
  if (records == 0 && discarded == 0) return;
  bump_counter(h.records_applied, records);
  bump_counter(h.records_discarded, discarded);
  bump_counter(h.floats_applied, result.totals.floats);
  bump_counter(h.records_skipped, result.totals.skipped);
  bump_counter(h.apply_rounds, std::uint64_t{1});
  if (result.started_ns != 0) bump_counter(h.apply_busy_ns, applied_at - result.started_ns);
}

// Tells each worker what the round did for it, and wakes the ones that sleep on it.
void tell_workers(Segment& segment, const RoundPlan& plan, bool step_advanced, Metrics& metrics,
                  std::uint64_t applied_at) {
  const bool applied_any = plan.records() != 0;
  // The round's slice versions before our look at each `waiting` (pairs with the worker's fence
  // between setting it and its last look at the versions, wait_for): no wake-up is missed.
  if (applied_any) fence_store_load();
  for (std::uint32_t r = 0; r < plan.ranks.size(); ++r) {
    const RankRound& round = plan.ranks[r];
    WorkerSlotServerView slot(segment.slot(r));
    if (round.records) metrics.sample_latency(r, round.last_seq, applied_at);
    if (round.records || round.discarded || round.puts || round.front_discarded)
      slot.count_round(round.records + round.puts, round.discarded + round.front_discarded, round.done_seq());
    // A worker asleep on another's progress (get by version) is woken by any round that applied.
    if (round.moved || step_advanced || (applied_any && slot.worker_waiting())) slot.wake_worker();
  }
}

}  // namespace

std::uint64_t publish_round(Segment& segment, std::vector<RingConsumer>& rings, RoundPlan& plan,
                            const RoundResult& result, Metrics& metrics) {
  const std::uint64_t records = plan.records(), discarded = plan.discarded();
  if (records != 0) kill_point("apply.before_release");
  const std::uint64_t applied_at = monotonic_ns();
  release_rings(segment, rings, plan);
  count_round(segment.header(), plan, result, applied_at);
  tell_workers(segment, plan, result.step_advanced, metrics, applied_at);
  return records + discarded;
}

}  // namespace shmps::server
