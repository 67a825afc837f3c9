// What shmps-top shows: one Sample, and the rates between it and the previous one.
//
// A rate is (counter now - counter before) / (time between the two samples). It is absent when
// there is no comparable previous sample (the first one, or one of another segment file); a
// counter that went down (torn read, slot reused) gives a rate of 0, never a negative one.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "sample.hpp"

namespace shmps::top {

struct WorkerMetrics {
  SlotSample now;
  std::optional<double> pushes_per_s, push_bytes_per_s, pulls_per_s, pull_bytes_per_s;
  std::optional<double> wait_fraction;          // of wall time over the interval, 0..1
  std::optional<double> backpressure_fraction;  // of wall time over the interval, 0..1
  std::optional<double> heartbeat_age_s;        // none if it never beat
  std::uint64_t ring_depth = 0;                 // bytes committed and not yet applied
  double ring_fill = 0;                         // ring_depth / capacity, 0..1
};

struct ParamMetrics {
  ParamSample now;
  std::optional<double> updates_per_s, pushes_per_s;
  std::optional<double> rows_per_s;  // a table: rows updated per second
  double grad_norm = 0;   // L2 norm of the newest push
  double value_norm = 0;  // L2 norm of the values (sampled by the server)
};

// Commit -> applied latency quantiles from the server's power-of-two histogram.
struct Latency {
  std::string window = "none";  // "interval" (samples since the previous sample), "cumulative", "none"
  std::uint64_t samples = 0;    // in that window
  std::optional<double> p50_ns, p99_ns;
};

struct Metrics {
  Sample now;
  std::optional<double> interval_s;  // between the previous sample and this one
  std::optional<double> uptime_s;    // of the current server (epoch)
  std::optional<double> server_heartbeat_age_s;
  std::optional<double> records_per_s, floats_per_s;
  std::optional<double> apply_busy_fraction;  // of wall time over the interval, 0..1
  std::optional<double> pushes_per_s;         // over every worker
  Latency latency;
  std::optional<double> checkpoint_age_s, checkpoint_duration_s;
  std::optional<double> sync_age_s;  // server groups: since the last sync round had every answer back
  // Per peer (Sample::peers, same order): how old this replica's copy of the slices homed at the
  // peer is (since the round whose answer came back last began: the sync's lag), and how long the
  // oldest delta to it has been in flight.
  struct PeerLag {
    std::optional<double> lag_s, oldest_in_flight_s;
  };
  std::vector<PeerLag> peers;
  unsigned workers_alive = 0;  // alive or suspect
  std::vector<WorkerMetrics> workers;  // every slot, free ones too
  std::vector<ParamMetrics> params;
};

// `before` may be null (no previous sample): rates are then absent.
Metrics compute_metrics(const Sample* before, const Sample& now);

// The value below which a fraction q (0..1) of the histogram's samples fall, interpolated within
// its bucket (bucket i holds [2^i, 2^(i+1)) ns; the last one everything above). None if empty.
std::optional<double> histogram_quantile(const std::uint64_t* buckets, std::size_t count, double q);

}  // namespace shmps::top
