#include "metrics.hpp"

#include <algorithm>
#include <bit>

#include <shmps/shm/atomics.hpp>

namespace shmps::server {

using namespace shmps::shm;

void Metrics::count_pushes(const RoundPlan& plan) {
  const auto& contributions = plan.contributions;
  for (std::size_t i = 0; i < contributions.size(); ++i) {
    const PushRecord* rec = contributions[i].record;
    if (i != 0 && contributions[i - 1].record == rec) continue;
    ParamStats& stats = segment_->param_stats(rec->param);
    store_release(stats.pushes, load_own(stats.pushes) + 1);
    store_release(stats.last_grad_sq_norm, std::bit_cast<std::uint64_t>(rec->grad_sq_norm));
    store_release(stats.last_grad_floats, rec->count);
  }
}

// A push whose commit time was overwritten by a newer one meanwhile is skipped.
void Metrics::sample_latency(std::uint32_t rank, std::uint64_t last_seq, std::uint64_t applied_at) {
  const WorkerSlot& slot = segment_->slot(rank);
  const std::uint64_t seq = load_acquire(slot.last_commit_seq);
  const std::uint64_t committed_at = load_acquire(slot.last_commit_ns);
  if (seq == 0 || seq != load_acquire(slot.last_commit_seq) || seq > last_seq || seq <= latency_sampled_seq_[rank] ||
      committed_at > applied_at)
    return;
  latency_sampled_seq_[rank] = seq;
  const std::uint64_t ns = std::max<std::uint64_t>(applied_at - committed_at, 1);
  const std::size_t bucket = std::min<std::size_t>(static_cast<std::size_t>(std::bit_width(ns)) - 1, kLatencyBuckets - 1);
  SegmentHeader& h = segment_->header();
  bump_counter(h.latency_buckets[bucket], std::uint64_t{1});
  bump_counter(h.latency_samples, std::uint64_t{1});
}

}  // namespace shmps::server
