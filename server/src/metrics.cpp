#include "metrics.hpp"

#include <algorithm>
#include <bit>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/worker_slot.hpp>

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
  const auto commit = WorkerSlotServerView(segment_->slot(rank)).last_commit();
  if (!commit || commit->seq > last_seq || commit->seq <= latency_sampled_seq_[rank] || commit->ns > applied_at) return;
  latency_sampled_seq_[rank] = commit->seq;
  const std::uint64_t ns = std::max<std::uint64_t>(applied_at - commit->ns, 1);
  const std::size_t bucket = std::min<std::size_t>(static_cast<std::size_t>(std::bit_width(ns)) - 1, kLatencyBuckets - 1);
  SegmentHeader& h = segment_->header();
  bump_counter(h.latency_buckets[bucket], std::uint64_t{1});
  bump_counter(h.latency_samples, std::uint64_t{1});
}

}  // namespace shmps::server
