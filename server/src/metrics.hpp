// What the server measures for the monitor (shmps-top, shmps-ctl) besides its counters: per
// parameter, the pushes a round takes and their gradient norms; per worker, the latency from a
// push's commit to its apply, sampled once per push at most. (The apply engine samples each
// slice's value norm itself, from the copy still in its cache; publish.hpp bumps the counters.)
#pragma once

#include <cstdint>
#include <vector>

#include <shmps/shm/segment.hpp>

#include "round.hpp"

namespace shmps::server {

class Metrics {
 public:
  explicit Metrics(shm::Segment& segment)
      : segment_(&segment), latency_sampled_seq_(segment.header().max_workers, 0) {}

  // Each push record the round takes, and its gradient norm, into its parameter's statistics.
  // Call before the apply (the contributions of one record are still adjacent).
  void count_pushes(const RoundPlan& plan);

  // Commit -> applied latency of the newest push worker `rank` committed, if this round
  // applied it (`last_seq` is the newest push the round is done with).
  void sample_latency(std::uint32_t rank, std::uint64_t last_seq, std::uint64_t applied_at_ns);

 private:
  shm::Segment* segment_;
  std::vector<std::uint64_t> latency_sampled_seq_;  // per slot: the newest push whose latency was sampled
};

}  // namespace shmps::server
