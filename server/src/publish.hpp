// Publishing a round, once it is applied: each ring's head moves past what the round took (the
// worker may reuse those bytes), the counters, each worker's `applied` and `progress`, and the
// wake-ups of workers asleep on their progress word.
//
// Order matters for crash safety and for readers: heads move first, then the counters, then
// `applied` and `progress`. Counting after the release keeps a record counted once when a server
// dies in between (its successor does not read it again). Counting before `applied` moves means a
// worker whose wait_applied() returned, or a monitor that sees `applied`, reads counters that
// include it.
#pragma once

#include <cstdint>
#include <vector>

#include <shmps/shm/ring.hpp>
#include <shmps/shm/segment.hpp>

#include "apply.hpp"
#include "metrics.hpp"
#include "round.hpp"

namespace shmps::server {

struct RoundResult {
  ApplyTotals totals;
  std::uint64_t started_ns = 0;  // when the apply began (0: nothing to apply)
  bool step_advanced = false;    // BSP: the model clock moved (every worker is told)
};

// Publishes `plan` (applied with `result`). Returns the records applied and discarded.
std::uint64_t publish_round(shm::Segment& segment, std::vector<shm::RingConsumer>& rings, RoundPlan& plan,
                            const RoundResult& result, Metrics& metrics);

}  // namespace shmps::server
