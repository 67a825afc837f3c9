#include "metrics.hpp"

#include <algorithm>
#include <cmath>

namespace shmps::top {

namespace {

struct Interval {
  double seconds = 0;
  std::optional<double> rate(std::uint64_t before, std::uint64_t now) const {
    if (seconds <= 0) return std::nullopt;
    return now >= before ? static_cast<double>(now - before) / seconds : 0.0;
  }
  // A counter of nanoseconds as a fraction of the interval's wall time.
  std::optional<double> fraction(std::uint64_t before_ns, std::uint64_t now_ns) const {
    const auto r = rate(before_ns, now_ns);
    if (!r) return std::nullopt;
    return std::clamp(*r / 1e9, 0.0, 1.0);
  }
};

std::optional<double> age_s(std::uint64_t now, std::uint64_t then) {
  if (then == 0) return std::nullopt;
  return now > then ? static_cast<double>(now - then) / 1e9 : 0.0;
}

}  // namespace

std::optional<double> histogram_quantile(const std::uint64_t* buckets, std::size_t count, double q) {
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < count; ++i) total += buckets[i];
  if (total == 0) return std::nullopt;
  const double rank = q * static_cast<double>(total);
  double below = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const auto n = static_cast<double>(buckets[i]);
    if (n > 0 && below + n >= rank) {
      const double lower = std::ldexp(1.0, static_cast<int>(i));
      if (i + 1 == count) return lower;  // the open-ended last bucket: at least this much
      return lower + lower * std::clamp((rank - below) / n, 0.0, 1.0);
    }
    below += n;
  }
  return std::ldexp(1.0, static_cast<int>(count - 1));
}

Metrics compute_metrics(const Sample* before, const Sample& now) {
  Metrics m;
  m.now = now;
  if (now.presence != Presence::ready) return m;

  // Rates only between two readings of the same segment file.
  Interval iv;
  const bool comparable = before && before->presence == Presence::ready && before->mapping_id == now.mapping_id &&
                          now.mono_ns > before->mono_ns;
  if (comparable) {
    iv.seconds = static_cast<double>(now.mono_ns - before->mono_ns) / 1e9;
    m.interval_s = iv.seconds;
  }

  if (now.server_started_unix_ns != 0) m.uptime_s = age_s(now.unix_ns, now.server_started_unix_ns);
  m.server_heartbeat_age_s = age_s(now.mono_ns, now.server_heartbeat_ns);
  m.checkpoint_age_s = age_s(now.unix_ns, now.last_checkpoint_unix_ns);
  m.sync_age_s = age_s(now.unix_ns, now.last_sync_unix_ns);
  for (const Sample::Peer& peer : now.peers)
    m.peers.push_back({age_s(now.unix_ns, peer.last_answer_round_unix_ns), age_s(now.unix_ns, peer.oldest_in_flight_unix_ns)});
  if (now.last_checkpoint_unix_ns != 0) m.checkpoint_duration_s = static_cast<double>(now.last_checkpoint_duration_ns) / 1e9;

  if (comparable) {
    m.records_per_s = iv.rate(before->records_applied, now.records_applied);
    m.floats_per_s = iv.rate(before->floats_applied, now.floats_applied);
    m.apply_busy_fraction = iv.fraction(before->apply_busy_ns, now.apply_busy_ns);
  }

  // Latency: the samples of this interval if there are any, else everything so far.
  std::array<std::uint64_t, shm::kLatencyBuckets> window{};
  std::uint64_t in_window = 0;
  if (comparable)
    for (std::size_t i = 0; i < window.size(); ++i) {
      window[i] = now.latency_buckets[i] >= before->latency_buckets[i] ? now.latency_buckets[i] - before->latency_buckets[i] : 0;
      in_window += window[i];
    }
  if (in_window > 0) {
    m.latency.window = "interval";
  } else {
    window = now.latency_buckets;
    for (auto n : window) in_window += n;
    m.latency.window = in_window > 0 ? "cumulative" : "none";
  }
  m.latency.samples = in_window;
  m.latency.p50_ns = histogram_quantile(window.data(), window.size(), 0.50);
  m.latency.p99_ns = histogram_quantile(window.data(), window.size(), 0.99);

  double pushes_per_s = 0;
  for (const SlotSample& slot : now.slots) {
    WorkerMetrics w;
    w.now = slot;
    const SlotSample* old = comparable && slot.rank < before->slots.size() ? &before->slots[slot.rank] : nullptr;
    if (old) {
      w.pushes_per_s = iv.rate(old->published, slot.published);
      w.push_bytes_per_s = iv.rate(old->push_bytes, slot.push_bytes);
      w.pulls_per_s = iv.rate(old->pulls, slot.pulls);
      w.pull_bytes_per_s = iv.rate(old->pull_bytes, slot.pull_bytes);
      w.wait_fraction = iv.fraction(old->wait_ns, slot.wait_ns);
      w.backpressure_fraction = iv.fraction(old->backpressure_ns, slot.backpressure_ns);
      pushes_per_s += w.pushes_per_s.value_or(0);
    }
    if (slot.status != "free") w.heartbeat_age_s = age_s(now.mono_ns, slot.heartbeat_ns);
    w.ring_depth = slot.ring_tail - slot.ring_head;
    w.ring_fill = slot.ring_capacity ? static_cast<double>(w.ring_depth) / static_cast<double>(slot.ring_capacity) : 0.0;
    if (slot.status == "alive" || slot.status == "suspect") ++m.workers_alive;
    m.workers.push_back(std::move(w));
  }
  if (comparable) m.pushes_per_s = pushes_per_s;

  for (std::size_t i = 0; i < now.params.size(); ++i) {
    const ParamSample& param = now.params[i];
    ParamMetrics p;
    p.now = param;
    const ParamSample* old =
        comparable && i < before->params.size() && before->params[i].name == param.name ? &before->params[i] : nullptr;
    if (old) {
      p.updates_per_s = iv.rate(old->slice_updates, param.slice_updates);
      p.pushes_per_s = iv.rate(old->pushes, param.pushes);
      if (param.table_rows != 0) p.rows_per_s = iv.rate(old->rows_updated, param.rows_updated);
    }
    p.grad_norm = std::sqrt(std::max(param.grad_sq_norm, 0.0));
    p.value_norm = std::sqrt(std::max(param.value_sq_norm, 0.0));
    m.params.push_back(std::move(p));
  }
  return m;
}

}  // namespace shmps::top
