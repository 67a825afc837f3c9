#include "sample.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <bit>
#include <filesystem>
#include <memory>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/membership.hpp>
#include <shmps/shm/liveness.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/proc.hpp>

#include "status.hpp"

namespace shmps::top {

using namespace shmps::shm;

namespace {

// The inode of /dev/shm/shmps.<name>, or 0 if there is none; and its size.
std::uint64_t inode_of(const std::string& path, std::uint64_t* size = nullptr) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return 0;
  if (size) *size = static_cast<std::uint64_t>(st.st_size);
  return static_cast<std::uint64_t>(st.st_ino);
}

double as_double(std::uint64_t bits) { return std::bit_cast<double>(bits); }

// A sample of a segment that is not (or not yet) usable: when, what is wrong, and whether a
// server holds its lock anyway (one that is creating it, or one that refused it).
Sample empty_sample(const std::string& name, Presence presence, std::string problem) {
  Sample s;
  s.segment = name;
  s.presence = presence;
  s.problem = std::move(problem);
  s.mono_ns = monotonic_ns();
  s.unix_ns = shm::unix_ns();
  tools::holder(server_lock_path(name), 0, s.server_alive);
  return s;
}

}  // namespace

std::string presence_name(Presence p) {
  switch (p) {
    case Presence::missing: return "missing";
    case Presence::unreadable: return "unreadable";
    case Presence::creating: return "creating";
    case Presence::ready: return "ready";
  }
  return "?";
}

Sample read_sample(const Segment& seg) {
  const SegmentHeader& h = seg.header();
  Sample s;
  s.segment = seg.name();
  s.presence = Presence::ready;
  s.mono_ns = monotonic_ns();
  s.unix_ns = shm::unix_ns();
  tools::holder(server_lock_path(seg.name()), 0, s.server_alive);

  s.state = tools::state_name(load_acquire(h.state));
  s.server_pid = load_acquire(h.server_pid);
  s.epoch = load_acquire(h.server_epoch);
  s.server_started_unix_ns = load_acquire(h.server_started_unix_ns);
  s.server_heartbeat_ns = load_acquire(h.server_heartbeat_ns);
  s.created_unix_ns = h.created_unix_ns;
  s.total_bytes = h.total_bytes;
  s.layout_version = h.layout_version;
  s.max_workers = h.max_workers;
  s.slice_count = h.slice_count;
  s.slice_floats = h.slice_floats;
  s.ring_bytes = h.ring_bytes;
  s.consistency = static_cast<Consistency>(load_acquire(h.consistency));
  s.staleness = load_acquire(h.staleness);
  s.bsp_aggregate = static_cast<BspAggregate>(load_acquire(h.bsp_aggregate));
  s.on_worker_death = static_cast<OnWorkerDeath>(load_acquire(h.on_worker_death));
  s.straggler_timeout_ms = load_acquire(h.straggler_timeout_ms);
  s.stragglers_evicted = load_counter(h.stragglers_evicted);
  s.model_clock = slowest_group_clock(seg);
  s.workers_per_group = h.workers_per_group;
  s.groups.resize(h.group_count);
  for (std::uint32_t g = 0; g < h.group_count; ++g) {
    const GroupEntry& e = seg.group(g);
    s.groups[g] = {load_acquire(e.clock), load_counter(e.steps), load_counter(e.records), load_counter(e.discarded)};
  }
  s.server_group = h.server_group;
  s.server_groups = h.server_groups;
  if (seg.has_server_groups()) {
    s.peers.resize(h.server_groups);
    for (std::uint32_t g = 0; g < h.server_groups; ++g) s.peers[g].group = g;
    for (std::uint64_t i = 0; i < h.slice_count; ++i) {
      const SyncSlice& sync = seg.sync_slice(i);
      const std::uint64_t sent = load_acquire(sync.sent_seq), synced = load_acquire(sync.synced_seq);
      s.home_slices += sync.home == h.server_group;
      s.sync_in_flight += sent > synced;
      if (sync.home >= h.server_groups || sync.home == h.server_group) continue;
      Sample::Peer& peer = s.peers[sync.home];
      ++peer.home_slices;
      if (sent > synced) {
        ++peer.in_flight;
        if (peer.oldest_in_flight_unix_ns == 0 || sent < peer.oldest_in_flight_unix_ns) peer.oldest_in_flight_unix_ns = sent;
      }
      peer.last_answer_round_unix_ns = std::max(peer.last_answer_round_unix_ns, synced);
    }
    s.peers.erase(s.peers.begin() + h.server_group);
    s.sync_rounds = load_counter(h.sync_rounds);
    s.sync_sent = load_counter(h.sync_sent);
    s.sync_taken = load_counter(h.sync_taken);
    s.sync_added = load_counter(h.sync_added);
    s.sync_duplicates = load_counter(h.sync_duplicates);
    s.sync_bytes = load_counter(h.sync_bytes);
    s.last_sync_unix_ns = load_acquire(h.last_sync_unix_ns);
  }
  s.steps = load_counter(h.steps);
  s.optimizer = h.optimizer;
  s.records_applied = load_counter(h.records_applied);
  s.floats_applied = load_counter(h.floats_applied);
  s.apply_rounds = load_counter(h.apply_rounds);
  s.records_skipped = load_counter(h.records_skipped);
  s.records_discarded = load_counter(h.records_discarded);
  s.checkpoints = load_acquire(h.checkpoints);
  s.checkpoint_failures = load_acquire(h.checkpoint_failures);
  s.last_checkpoint_unix_ns = load_acquire(h.last_checkpoint_unix_ns);
  s.last_checkpoint_duration_ns = load_acquire(h.last_checkpoint_duration_ns);
  s.last_checkpoint_clock = load_acquire(h.last_checkpoint_clock);
  for (std::size_t i = 0; i < kLatencyBuckets; ++i) s.latency_buckets[i] = load_counter(h.latency_buckets[i]);
  s.latency_samples = load_counter(h.latency_samples);
  s.apply_busy_ns = load_counter(h.apply_busy_ns);

  // Worker slots: the kernel's lock says who is alive (a probe, never a lock).
  std::unique_ptr<LockFile> slots_lock;
  try {
    if (std::filesystem::exists(slots_lock_path(seg.name())))
      slots_lock = std::make_unique<LockFile>(LockFile::open_for_probe(slots_lock_path(seg.name())));
  } catch (const Error&) {
    slots_lock.reset();  // unreadable: like shmps-ctl, judge from the segment's words only
  }
  s.slots.reserve(h.max_workers);
  for (unsigned r = 0; r < h.max_workers; ++r) {
    const WorkerSlot& slot = seg.slot(r);
    const RingHeader& ring = seg.ring(r);
    SlotSample w;
    w.rank = r;
    w.group = seg.group_of(r);
    w.status = tools::slot_status(seg, r, slots_lock.get());
    w.pid = load_acquire(slot.pid);
    w.generation = load_acquire(slot.generation);
    w.clock = load_acquire(slot.clock);
    w.published = load_acquire(slot.published);
    w.applied = load_acquire(slot.applied);
    w.push_bytes = load_counter(slot.push_bytes);
    w.pulls = load_counter(slot.pulls);
    w.pull_bytes = load_counter(slot.pull_bytes);
    w.pushes_rejected = load_counter(slot.pushes_rejected);
    w.last_staleness = load_counter(slot.last_staleness);
    w.max_staleness = load_counter(slot.max_staleness);
    w.wait_ns = load_counter(slot.wait_ns);
    w.backpressure_ns = load_counter(slot.backpressure_ns);
    w.heartbeat_ns = load_acquire(slot.heartbeat_ns);
    // Head first: the tail read after it is at least as new, so the depth is never negative.
    w.ring_head = load_acquire(ring.head);
    w.ring_tail = std::max(load_acquire(ring.tail), w.ring_head);
    w.ring_capacity = ring.capacity;
    s.slots.push_back(std::move(w));
  }

  s.params.reserve(h.param_count);
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const ParamEntry& p = seg.param(i);
    const ParamStats& stats = seg.param_stats(i);
    ParamSample ps;
    ps.name = std::string(param_name(p));
    ps.shape.assign(p.shape, p.shape + std::min<std::uint64_t>(p.ndim, kMaxDims));
    ps.elements = p.size;
    ps.slices = p.slice_count;
    ps.version_min = ps.clock_min = UINT64_MAX;
    constexpr std::size_t kHottest = 5;
    for (std::uint64_t k = 0; k < p.slice_count; ++k) {
      const SliceEntry& slice = seg.slice(p.first_slice + k);
      const std::uint64_t version = load_acquire(slice.version) / 2;
      if (p.table_dim != 0 && version != 0 &&
          (ps.hottest.size() < kHottest || version > ps.hottest.back().updates)) {
        const ParamSample::HotSlice hot{slice.first / p.table_dim, (slice.first + slice.count) / p.table_dim - 1, version};
        auto at = std::find_if(ps.hottest.begin(), ps.hottest.end(), [&](const auto& other) { return other.updates < version; });
        ps.hottest.insert(at, hot);
        if (ps.hottest.size() > kHottest) ps.hottest.pop_back();
      }
      const std::uint64_t clock = load_acquire(slice.clock);
      ps.version_min = std::min(ps.version_min, version);
      ps.version_max = std::max(ps.version_max, version);
      ps.clock_min = std::min(ps.clock_min, clock);
      ps.clock_max = std::max(ps.clock_max, clock);
      ps.value_sq_norm += as_double(load_acquire(slice.value_sq_norm));
    }
    if (p.slice_count == 0) ps.version_min = ps.clock_min = 0;
    ps.pushes = load_acquire(stats.pushes);
    ps.slice_updates = load_counter(stats.slice_updates);
    ps.floats_applied = load_counter(stats.floats_applied);
    ps.grad_sq_norm = as_double(load_acquire(stats.last_grad_sq_norm));
    if (p.table_dim != 0) {
      ps.table_rows = p.shape[0];
      ps.table_dim = p.table_dim;
      ps.optimizer = std::string(to_string(p.optimizer.kind));
      ps.optimizer_lr = p.optimizer.lr;
      ps.rows_updated = load_counter(stats.rows_updated);
      ps.round_rows = load_acquire(stats.round_rows);
      if (is_keyed(p)) {
        ps.keyed = true;
        ps.admit_after = p.admit_after;
        ps.keys_admitted = load_acquire(stats.keys_admitted);
        ps.keys_evicted = load_acquire(stats.keys_evicted);
        ps.keys_held = load_acquire(stats.keys_held);
        ps.keys_refused_rows = load_acquire(stats.keys_refused_rows);
      }
    }
    for (unsigned r = 0; r < h.max_workers; ++r) ps.rejected += load_counter(seg.rejected(r, i));
    s.params.push_back(std::move(ps));
  }
  return s;
}

Sample Source::sample() {
  const std::string path = segment_path(name_);
  const std::uint64_t inode = inode_of(path);
  if (inode == 0) {
    segment_.reset();
    return empty_sample(name_, Presence::missing,
                        "segment '" + name_ + "' does not exist (no " + path + "); see `shmps-ctl list`");
  }
  if (segment_ && inode != inode_) segment_.reset();  // removed and made again: another job
  if (!segment_) {
    try {
      Segment seg = Segment::open(name_, Access::read_only);
      // Only a file that was there both before and after the mapping is known to be the one mapped.
      if (inode_of(path) != inode)
        return empty_sample(name_, Presence::creating, "segment '" + name_ + "' is being replaced");
      segment_.emplace(std::move(seg));
      inode_ = inode;
    } catch (const Error& e) {
      std::uint64_t size = 0;
      if (inode_of(path, &size) == 0)
        return empty_sample(name_, Presence::missing,
                            "segment '" + name_ + "' does not exist (no " + path + "); see `shmps-ctl list`");
      Sample s = empty_sample(name_, Presence::unreadable, e.what());
      if (size < sizeof(SegmentHeader) && s.server_alive) {  // not sized yet: its server is creating it
        s.presence = Presence::creating;
        s.problem = "segment '" + name_ + "' is being created by its server";
        s.state = "creating";
      }
      return s;
    }
  }
  if (load_acquire(segment_->header().state) == static_cast<std::uint32_t>(SegmentState::creating)) {
    segment_.reset();  // mapped again, and validated, once it is ready
    Sample s = empty_sample(name_, Presence::creating, "");
    s.problem = "segment '" + name_ + "' is being created" +
                (s.server_alive ? std::string(" by its server") : std::string(" (its creator died midway)"));
    s.state = "creating";
    return s;
  }
  Sample s = read_sample(*segment_);
  s.mapping_id = inode_;
  return s;
}

}  // namespace shmps::top
