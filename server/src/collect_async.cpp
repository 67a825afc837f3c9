// The as-they-come collector (ASP and SSP): every committed record of every ring, this round.
#include <algorithm>

#include <shmps/shm/atomics.hpp>

#include "collect.hpp"

namespace shmps::server {

using namespace shmps::shm;

void collect_as_they_come(Segment& segment, const std::vector<RingConsumer>& rings, RoundPlan& plan) {
  for (std::uint32_t r = 0; r < rings.size(); ++r) {
    const RingConsumer& ring = rings[r];
    RankRound& round = plan.ranks[r];
    const std::uint64_t tail = ring.committed();
    // A straggler evicted from an SSP bound, or from a BSP barrier before a live switch: what it
    // commits after the eviction counts for nothing here either (membership.cpp evicts in SSP
    // only with its ring drained).
    const std::uint64_t evicted = load_acquire(segment.slot(r).evicted_generation);
    // A put is applied before the round's pushes, so it is taken only with no push of its ring
    // before it, and nothing of its ring after it (apply_put.hpp relies on that after a restart).
    bool pushes = false;
    const auto read = ring.read(ring.head(), tail, [&](std::uint64_t, const PushRecord& rec) {
      if (round.puts != 0) return false;
      if (evicted != 0 && rec.generation == evicted && rec.kind != RecordKind::put) {
        if (is_gradient(rec.kind)) {
          ++round.discarded;
          round.last_seq = std::max(round.last_seq, rec.seq);
        }
        return true;
      }
      if (rec.kind == RecordKind::put) {
        if (pushes) return false;
        plan.puts.push_back({r, &rec});
        round.take_put(rec);
      } else if (rec.kind == RecordKind::clock) {
        keep_resume_state(segment, r, rec);  // before the head moves past it
        round.clock = std::max(round.clock, rec.clock + 1);
      } else if (is_gradient(rec.kind)) {
        add_contributions(segment, r, rec, plan.contributions, plan.row_refs);
        round.last_seq = rec.seq;
        ++round.records;
        pushes = true;
      }
      return true;
    });
    if (read.malformed) log_bad_record(segment, r, read.stopped_at);
    round.end = read.malformed ? tail : read.stopped_at;
  }
}

}  // namespace shmps::server
