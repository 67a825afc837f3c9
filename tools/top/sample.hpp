// One reading of a segment, as shmps-top sees it: every counter the layout offers for the monitor,
// copied out of a read-only mapping without any lock.
//
// A Sample is not a consistent snapshot: each word is loaded once, on its own, while the job runs.
// The counters are independent and only grow, so a reading of two of them at slightly different
// moments is still right for each; Metrics (metrics.hpp) turns two Samples into rates.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <sys/types.h>

#include <shmps/shm/layout.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::top {

struct SlotSample {
  unsigned rank = 0;
  unsigned group = 0;  // its worker group (rank / workers_per_group)
  std::string status;  // free, alive, suspect, dead, left (as shmps-ctl workers says)
  std::int32_t pid = 0;
  std::uint64_t generation = 0;
  std::uint64_t clock = 0;
  std::uint64_t published = 0;  // pushes committed, all generations
  std::uint64_t applied = 0;    // the last of them the server is done with
  std::uint64_t push_bytes = 0;
  std::uint64_t pulls = 0;
  std::uint64_t pull_bytes = 0;
  std::uint64_t pushes_rejected = 0;
  std::uint64_t last_staleness = 0;
  std::uint64_t max_staleness = 0;
  std::uint64_t wait_ns = 0;
  std::uint64_t backpressure_ns = 0;
  std::uint64_t heartbeat_ns = 0;  // CLOCK_MONOTONIC, 0 if never
  std::uint64_t ring_head = 0;
  std::uint64_t ring_tail = 0;
  std::uint64_t ring_capacity = 0;
};

struct ParamSample {
  std::string name;
  std::vector<std::uint64_t> shape;
  std::uint64_t elements = 0;
  std::uint64_t slices = 0;
  std::uint64_t version_min = 0, version_max = 0;  // updates applied per slice (version / 2)
  std::uint64_t clock_min = 0, clock_max = 0;
  std::uint64_t pushes = 0;         // push records applied to it
  std::uint64_t slice_updates = 0;  // optimizer steps over its slices
  std::uint64_t floats_applied = 0;
  double grad_sq_norm = 0;   // of the newest push
  double value_sq_norm = 0;  // sum over its slices, as last sampled by the server
  std::uint64_t rejected = 0;  // NaN/Inf gradients refused, over every worker
  // A table (0 rows for a dense parameter): rows updated in all (one per distinct row per round),
  // distinct rows of the newest round that touched it, and its most updated slices (whole rows:
  // the hot rows are in them), most updated first.
  std::uint64_t table_rows = 0, table_dim = 0;
  std::string optimizer;  // a table's optimizer kind (its own, or the job's)
  float optimizer_lr = 0;
  std::uint64_t rows_updated = 0, round_rows = 0;
  // A table with keys = "u64": admit_after, and the keys admitted, evicted, held now, and the
  // pushed rows dropped because their key was not admitted (ParamStats). keyed false otherwise.
  bool keyed = false;
  std::uint64_t admit_after = 0, keys_admitted = 0, keys_evicted = 0, keys_held = 0, keys_refused_rows = 0;
  struct HotSlice {
    std::uint64_t first_row = 0, last_row = 0, updates = 0;
  };
  std::vector<HotSlice> hottest;
};

// Where the segment stands, as far as the monitor can tell.
enum class Presence {
  missing,     // no /dev/shm/shmps.<name>
  unreadable,  // exists, but cannot be used (another layout version, another user, damaged)
  creating,    // its server is still creating it (or died doing so)
  ready,       // mapped and validated: everything below is filled in
};

struct Sample {
  std::string segment;
  Presence presence = Presence::missing;
  std::string problem;  // why not ready (missing, unreadable, creating), for the user
  std::uint64_t mono_ns = 0;  // when it was taken (CLOCK_MONOTONIC and CLOCK_REALTIME)
  std::uint64_t unix_ns = 0;
  std::uint64_t mapping_id = 0;  // which file was mapped (its inode): another one is another job

  bool server_alive = false;  // a live process holds <name>.server.lock (probed, not locked)

  // Header.
  std::string state;  // creating, ready, stopping, stopped
  std::int32_t server_pid = 0;
  std::uint64_t epoch = 0;
  std::uint64_t server_started_unix_ns = 0;
  std::uint64_t server_heartbeat_ns = 0;
  std::uint64_t created_unix_ns = 0;
  std::uint64_t total_bytes = 0;
  std::uint32_t layout_version = 0;
  std::uint32_t max_workers = 0;
  std::uint64_t slice_count = 0;
  std::uint64_t slice_floats = 0;
  std::uint64_t ring_bytes = 0;
  Consistency consistency = Consistency::asp;
  std::uint32_t staleness = 0;
  BspAggregate bsp_aggregate = BspAggregate::sum;
  OnWorkerDeath on_worker_death = OnWorkerDeath::proceed;
  std::uint32_t straggler_timeout_ms = 0;  // BSP: stragglers are evicted after this (0: never)
  std::uint64_t stragglers_evicted = 0;
  std::uint64_t model_clock = 0;  // BSP: the slowest worker group's clock
  std::uint64_t steps = 0;
  // Worker groups (GroupEntry): BSP steps and SSP bounds hold inside each.
  struct Group {
    std::uint64_t clock = 0, steps = 0, records = 0, discarded = 0;
  };
  std::uint32_t workers_per_group = 0;
  std::vector<Group> groups;
  // Server groups: this segment is the replica of group server_group of server_groups (1: none),
  // home of home_slices slices; its sync counters (SegmentHeader) and slices in flight now.
  std::uint32_t server_group = 0, server_groups = 1;
  std::uint64_t home_slices = 0, sync_in_flight = 0;
  std::uint64_t sync_rounds = 0, sync_sent = 0, sync_taken = 0, sync_added = 0, sync_duplicates = 0, sync_bytes = 0;
  std::uint64_t last_sync_unix_ns = 0;
  // Per peer group (the other groups; on several hosts, the other ranks): the slices homed there,
  // those of them in flight now, the round of the oldest one in flight, and the round whose answer
  // from that peer came back last (round numbers are their start times, unix ns; 0: none).
  struct Peer {
    std::uint32_t group = 0;
    std::uint64_t home_slices = 0, in_flight = 0;
    std::uint64_t oldest_in_flight_unix_ns = 0, last_answer_round_unix_ns = 0;
  };
  std::vector<Peer> peers;
  OptimizerSettings optimizer;
  std::uint64_t records_applied = 0;
  std::uint64_t floats_applied = 0;
  std::uint64_t apply_rounds = 0;
  std::uint64_t records_skipped = 0;
  std::uint64_t records_discarded = 0;
  std::uint64_t checkpoints = 0;
  std::uint64_t checkpoint_failures = 0;
  std::uint64_t last_checkpoint_unix_ns = 0;
  std::uint64_t last_checkpoint_duration_ns = 0;
  std::uint64_t last_checkpoint_clock = 0;
  std::array<std::uint64_t, shm::kLatencyBuckets> latency_buckets{};
  std::uint64_t latency_samples = 0;
  std::uint64_t apply_busy_ns = 0;

  std::vector<SlotSample> slots;  // every slot, free ones too
  std::vector<ParamSample> params;
};

// Reads a mapped, validated segment (no locks; the lock files are only probed).
Sample read_sample(const shm::Segment& segment);

// The segment called `name` as the monitor follows it: mapped read-only on first use, and mapped
// again when it is replaced by another (a new job under the same name) or comes back after it was
// removed. Never throws for a segment that is missing or unusable: the Sample says so.
class Source {
 public:
  explicit Source(std::string name) : name_(std::move(name)) {}

  const std::string& name() const noexcept { return name_; }
  Sample sample();

 private:
  std::string name_;
  std::optional<shm::Segment> segment_;
  std::uint64_t inode_ = 0;
};

std::string presence_name(Presence p);

}  // namespace shmps::top
