// The streamed-step collector (BSP with rings smaller than a step): step t's pushes as they come,
// into the step sums (collect.hpp says which workers the step waits for, and why).
#include <algorithm>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/membership.hpp>

#include "collect.hpp"

namespace shmps::server {

using namespace shmps::shm;

bool collect_streamed_step(Segment& segment, const std::vector<RingConsumer>& rings, std::uint64_t step,
                           RoundPlan& plan) {
  const SegmentHeader& h = segment.header();
  bool everyone_finished = true;
  for (std::uint32_t r = 0; r < rings.size(); ++r) {
    const RingConsumer& ring = rings[r];
    RankRound& round = plan.ranks[r];
    WorkerSlot& slot = segment.slot(r);
    // As in collect_step: who counts is read before anything of the ring (a worker that ends its
    // step and leaves in between must not be missed), and the worker's clock before the tail
    // means the clock record that ended step `step` (if it did) is in [head, tail) or was
    // consumed before.
    const bool counts = counts_for_group(h, slot);
    const std::uint64_t worker_clock = load_acquire(slot.clock);
    const std::uint64_t streamed_before = load_acquire(slot.streamed_step);
    // A straggler's generation evicted from the barrier (never with part of its step summed,
    // Membership::evict_stragglers): whatever it commits counts for nothing.
    const std::uint64_t evicted = load_acquire(slot.evicted_generation);
    const std::uint64_t tail = ring.committed();
    // A put is taken only with no push of its ring before it and nothing after it in the round
    // (as collect_as_they_come); a walk stopped at or after one has not read the ring to its end.
    bool pushes = false, stopped_by_put = false;
    const auto read = ring.read(ring.head(), tail, [&](std::uint64_t, const PushRecord& rec) {
      if (round.puts != 0) return !(stopped_by_put = true);
      if (rec.kind == RecordKind::padding) return true;
      if (evicted != 0 && rec.generation == evicted && rec.kind != RecordKind::put) {
        if (is_gradient(rec.kind)) {
          ++round.discarded;
          round.last_seq = std::max(round.last_seq, rec.seq);
        }
        return true;
      }
      if (rec.clock > step) return false;  // a later step: it waits for this one to end
      if (rec.kind == RecordKind::put) {
        if (pushes) return !(stopped_by_put = true);
        plan.puts.push_back({r, &rec});
        round.take_put(rec);
        return true;
      }
      pushes = pushes || is_gradient(rec.kind);
      if (rec.kind == RecordKind::clock) {
        keep_resume_state(segment, r, rec);  // before the head moves past it
        round.clock = std::max(round.clock, rec.clock + 1);
      } else if (rec.clock < step && streamed_before != rec.clock + 1 && round.streamed_step == 0) {
        // A step that was completed without its writer: none of it is in any sum.
        ++round.discarded;
        round.last_seq = std::max(round.last_seq, rec.seq);
      } else if (add_contributions(segment, r, rec, plan.contributions, plan.row_refs)) {
        ++round.records;
        round.last_seq = std::max(round.last_seq, rec.seq);
        round.streamed_step = step + 1;
      }
      return true;
    });
    if (read.malformed) log_bad_record(segment, r, read.stopped_at);
    round.end = read.malformed ? tail : read.stopped_at;
    // The worker's clock says the step's records are all in [head, tail) only if the walk read them.
    const bool finished = std::max(load_acquire(slot.consumed_clock), round.clock) > step ||
                          (worker_clock > step && !stopped_by_put);
    const bool must = counts || streamed_before == step + 1 || round.streamed_step != 0;
    if (must && !finished) everyone_finished = false;
  }
  return everyone_finished;
}

}  // namespace shmps::server
