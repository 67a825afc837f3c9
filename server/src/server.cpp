#include "shmps/server/server.hpp"

#include <spdlog/spdlog.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/initialise.hpp>
#include <shmps/server/optimizer.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/futex.hpp>
#include <shmps/shm/liveness.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/proc.hpp>
#include <shmps/shm/ring.hpp>
#include <shmps/shm/seqlock.hpp>

namespace shmps::server {

using namespace shmps::shm;

namespace {

// A hash of everything that fixes the segment's layout, so that a server restarted with a spec
// for another model refuses the existing segment instead of misreading it.
std::uint64_t layout_hash(const LayoutRequest& request, const LayoutPlan& plan) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  auto mix = [&h](std::uint64_t v) { h = shm::detail::fnv1a(h, v); };
  for (const auto& p : request.params) {
    h = shm::detail::fnv1a_str(h, p.name.c_str());
    mix(p.shape.size());
    for (auto d : p.shape) mix(d);
  }
  mix(plan.slice_floats);
  mix(request.max_workers);
  mix(plan.ring_bytes);
  mix(request.state_arrays);
  return h;
}

// One piece of work for a slice: the part of one push record that falls into it.
struct Contribution {
  std::uint64_t slice;
  std::uint32_t rank;
  const PushRecord* record;
};

}  // namespace

struct Server::Impl {
  ServerOptions options;
  LockFile server_lock;
  LockFile slots_lock;
  Segment segment;
  std::vector<RingConsumer> consumers;
  std::vector<std::uint64_t> round_end;      // per slot: ring position after this round's records
  std::vector<std::uint64_t> round_last_seq; // per slot: last sequence number of this round
  std::vector<std::uint64_t> round_records;  // per slot: records in this round
  std::vector<Contribution> contributions;
  std::vector<std::size_t> run_starts;
  std::unique_ptr<tbb::task_arena> arena;
  std::atomic<bool> stop_requested{false};
  bool recovered = false;
  std::uint64_t workers_died = 0;

  SegmentHeader& header() { return segment.header(); }

  void create_segment(const LayoutRequest& request, const LayoutPlan& plan, std::uint64_t hash);
  void recover_segment(std::uint64_t hash);
  void check_liveness();
  bool rings_empty();
  void sleep_until_work(std::chrono::microseconds bound);
};

Server::Server(ServerOptions options) : impl_(std::make_unique<Impl>()) { impl_->options = std::move(options); }
Server::~Server() = default;

const Segment& Server::segment() const noexcept { return impl_->segment; }
bool Server::recovered() const noexcept { return impl_->recovered; }

ServerStats Server::stats() const noexcept {
  const auto& h = impl_->segment.header();
  return ServerStats{load_counter(h.records_applied), load_counter(h.floats_applied), load_counter(h.apply_rounds),
                     impl_->workers_died};
}

void Server::start() {
  Impl& s = *impl_;
  const ModelSpec& spec = s.options.spec;
  check_segment_name(spec.name);
  if (auto problem = validate_optimizer_settings(spec.optimizer); !problem.empty())
    throw Error(spec.source + ": optimizer: " + problem);
  if (spec.consistency != Consistency::asp)
    throw Error(spec.source + ": consistency '" + std::string(to_string(spec.consistency)) +
                "' is not available yet; this version applies pushes asynchronously: use consistency = \"asp\"");

  // 1. Lay out the model; check for room before anything is created (a lock file included).
  LayoutRequest request;
  for (const auto& p : spec.params) request.params.push_back({p.name, p.shape});
  request.slice_bytes = spec.slice_bytes;
  request.max_workers = spec.max_workers;
  request.ring_bytes = spec.ring_bytes;
  request.state_arrays = static_cast<std::uint32_t>(optimizer_state_arrays(spec.optimizer.kind));
  const LayoutPlan plan = plan_layout(request);
  const std::uint64_t hash = layout_hash(request, plan);

  if (!Segment::exists(spec.name)) Segment::check_room(spec.name, plan.total_bytes);

  // 2. The server lock: exactly one server per segment, for its whole life.
  s.server_lock = LockFile::open(server_lock_path(spec.name), true, s.options.mode);
  if (!s.server_lock.try_lock(0)) {
    std::string who;
    if (Segment::exists(spec.name)) {
      try {
        auto existing = Segment::open(spec.name, Access::read_only);
        who = " (pid " + std::to_string(load_acquire(existing.header().server_pid)) + ")";
      } catch (const Error&) {
      }
    }
    throw Error("segment '" + spec.name + "' is already served by a live server" + who +
                ": stop that server first, or give this job another name (--name)");
  }

  // 3. Create, or recover what is there.
  if (Segment::exists(spec.name)) {
    Segment existing = Segment::open(spec.name, Access::read_write);
    if (load_acquire(existing.header().state) == static_cast<std::uint32_t>(SegmentState::creating)) {
      // We hold the server lock, so nobody is creating it now: its creator died midway.
      spdlog::warn("event=recreate segment={} reason=\"left half-created by a server that died during creation\"",
                   spec.name);
      existing = Segment();
      std::filesystem::remove(segment_path(spec.name));  // the segment only: we hold its lock files
      s.create_segment(request, plan, hash);
    } else {
      s.segment = std::move(existing);
      s.recover_segment(hash);
    }
  } else {
    s.create_segment(request, plan, hash);
  }

  // 4. Views, workers' lock file, threads.
  s.slots_lock = LockFile::open(slots_lock_path(spec.name), true, s.options.mode);
  const auto& h = s.header();
  for (std::uint32_t r = 0; r < h.max_workers; ++r)
    s.consumers.emplace_back(&s.segment.ring(r), s.segment.ring_data(r));
  s.round_end.assign(h.max_workers, 0);
  s.round_last_seq.assign(h.max_workers, 0);
  s.round_records.assign(h.max_workers, 0);
  unsigned threads = s.options.threads ? s.options.threads : spec.server_threads;
  if (threads == 0) threads = std::max(1U, std::thread::hardware_concurrency());
  s.arena = std::make_unique<tbb::task_arena>(static_cast<int>(threads));

  // 5. Identity, a new epoch, and "ready" last.
  SegmentHeader& hw = s.header();
  store_release(hw.server_pid, static_cast<std::int32_t>(::getpid()));
  store_release(hw.server_start_time, process_start_time(::getpid()));
  store_release(hw.server_started_unix_ns, unix_ns());
  store_release(hw.server_heartbeat_ns, monotonic_ns());
  store_release(hw.server_epoch, load_own(hw.server_epoch) + 1);
  store_release(hw.state, static_cast<std::uint32_t>(SegmentState::ready));
  s.check_liveness();
  spdlog::info("event=ready segment={} epoch={} recovered={} params={} slices={} slice_floats={} workers={} "
               "ring_bytes={} segment_bytes={} optimizer={} lr={} threads={}",
               spec.name, load_own(hw.server_epoch), s.recovered, hw.param_count, hw.slice_count, hw.slice_floats,
               hw.max_workers, hw.ring_bytes, hw.total_bytes, to_string(hw.optimizer.kind), hw.optimizer.lr, threads);
}

void Server::Impl::create_segment(const LayoutRequest& request, const LayoutPlan& plan, std::uint64_t hash) {
  const ModelSpec& spec = options.spec;
  segment = Segment::create(spec.name, plan.total_bytes, options.mode);
  // The file is all zeros: state reads "creating" until the very end.
  SegmentHeader& h = segment.header();
  h.layout_version = kLayoutVersion;
  h.header_bytes = sizeof(SegmentHeader);
  h.fingerprint = kLayoutFingerprint;
  h.total_bytes = plan.total_bytes;
  h.spec_hash = hash;
  h.created_unix_ns = unix_ns();
  std::memcpy(h.name, spec.name.data(), std::min(spec.name.size(), kMaxNameBytes - 1));
  h.param_count = static_cast<std::uint32_t>(plan.params.size());
  h.max_workers = request.max_workers;
  h.slice_count = plan.slice_count;
  h.slice_floats = plan.slice_floats;
  h.ring_bytes = plan.ring_bytes;
  h.params_offset = plan.params_offset;
  h.slices_offset = plan.slices_offset;
  h.applied_offset = plan.applied_offset;
  h.slots_offset = plan.slots_offset;
  h.rings_offset = plan.rings_offset;
  h.ring_stride = plan.ring_stride;
  h.values_offset = plan.values_offset;
  h.state_offset = plan.state_offset;
  h.optimizer = spec.optimizer;
  h.consistency = spec.consistency;
  h.staleness = spec.staleness;
  h.state_arrays = request.state_arrays;

  for (std::size_t i = 0; i < plan.params.size(); ++i) {
    ParamEntry& p = segment.param(i);
    p = plan.params[i];
    for (std::uint64_t k = 0; k < p.slice_count; ++k) {
      SliceEntry& slice = segment.slice(p.first_slice + k);
      slice.param = i;
      slice.first = k * plan.slice_floats;
      slice.count = std::min(plan.slice_floats, p.size - slice.first);
    }
    initialise(spec.params[i].init, std::span<float>(segment.values(p), p.size));
  }
  for (std::uint32_t r = 0; r < request.max_workers; ++r) segment.ring(r).capacity = plan.ring_bytes;
  h.magic = kMagic;  // identity complete; "ready" is stored by start() after the epoch
}

void Server::Impl::recover_segment(std::uint64_t hash) {
  const ModelSpec& spec = options.spec;
  SegmentHeader& h = segment.header();
  if (h.spec_hash != hash)
    throw Error("segment '" + spec.name + "' already exists and holds another model than " + spec.source +
                " (parameter names, shapes, slice size, worker slots, ring size or optimizer kind differ): give this "
                "job another name (--name), or remove the old segment with `shmps-ctl destroy " + spec.name + "`");
  // A version word left odd means the previous server died while writing that slice.
  std::uint64_t repaired = 0;
  for (std::uint64_t i = 0; i < h.slice_count; ++i) {
    SliceEntry& slice = segment.slice(i);
    const std::uint64_t v = load_own(slice.version);
    if (v & 1U) {
      store_release(slice.version, v + 1);
      ++repaired;
    }
  }
  if (repaired)
    spdlog::warn("event=repair segment={} slices_left_mid_write={} note=\"the previous server died while writing them\"",
                 spec.name, repaired);
  recovered = true;
}

bool Server::Impl::rings_empty() {
  for (auto& c : consumers)
    if (c.committed() != c.head()) return false;
  return true;
}

void Server::Impl::check_liveness() {
  SegmentHeader& h = header();
  for (std::uint32_t r = 0; r < h.max_workers; ++r) {
    WorkerSlot& slot = segment.slot(r);
    if (load_acquire(slot.state) != static_cast<std::uint32_t>(SlotState::attached)) continue;
    const std::uint64_t generation = load_acquire(slot.generation);
    if (load_own(slot.dead_generation) == generation) continue;
    if (slots_lock.probe(r) != Holder::none) continue;
    // The lock is free. A worker attaching right now takes the lock before it bumps the
    // generation, so an unchanged generation means this holder is certainly gone.
    if (load_acquire(slot.generation) != generation) continue;
    store_release(slot.dead_generation, generation);
    ++workers_died;
    spdlog::warn("event=worker_dead segment={} rank={} pid={} generation={} published={} applied={}", options.spec.name,
                 r, load_acquire(slot.pid), generation, load_acquire(slot.published), load_own(slot.applied));
  }
}

void Server::Impl::sleep_until_work(std::chrono::microseconds bound) {
  SegmentHeader& h = header();
  const std::uint32_t word = load_acquire(h.server_wake);
  store_release(h.server_sleeping, 1U);
  fence_store_load();  // pairs with the worker's fence between its commit and its look at server_sleeping
  if (rings_empty() && !stop_requested.load(std::memory_order_acquire)) {
    // A worker's FUTEX_WAKE that lands between the check above and the wait is lost (the worker
    // writes nothing here, DESIGN.md); the bound keeps that rare case to a short delay.
    futex_wait(h.server_wake, word, bound);
  }
  store_release(h.server_sleeping, 0U);
}

std::uint64_t Server::apply_round() {
  Impl& s = *impl_;
  Segment& seg = s.segment;
  const SegmentHeader& h = seg.header();
  const std::uint32_t workers = h.max_workers;

  // 1. Collect the committed records of every ring, in rank order, each ring in sequence order.
  s.contributions.clear();
  std::uint64_t records = 0;
  for (std::uint32_t r = 0; r < workers; ++r) {
    RingConsumer& ring = s.consumers[r];
    const std::uint64_t head = ring.head();
    const std::uint64_t tail = ring.committed();
    s.round_end[r] = head;
    s.round_records[r] = 0;
    if (head == tail) continue;
    std::uint64_t pos = head;
    while (pos < tail) {
      if (!ring.plausible(pos, tail)) {
        spdlog::error("event=bad_record segment={} rank={} position={} action=\"discarding the rest of this ring\"",
                      h.name, r, pos);
        pos = tail;
        break;
      }
      const PushRecord* rec = ring.record_at(pos);
      pos += rec->record_bytes;
      if (rec->kind != RecordKind::push) continue;
      if (rec->param >= h.param_count || rec->offset + rec->count > seg.param(rec->param).size || rec->count == 0) {
        spdlog::error("event=bad_record segment={} rank={} seq={} reason=\"range outside its parameter\"", h.name, r,
                      rec->seq);
        continue;
      }
      const ParamEntry& p = seg.param(rec->param);
      const std::uint64_t first = p.first_slice + rec->offset / h.slice_floats;
      const std::uint64_t last = p.first_slice + (rec->offset + rec->count - 1) / h.slice_floats;
      for (std::uint64_t slice = first; slice <= last; ++slice) s.contributions.push_back({slice, r, rec});
      s.round_last_seq[r] = rec->seq;
      ++s.round_records[r];
      ++records;
    }
    s.round_end[r] = pos;
  }
  // 2. Group by slice, keeping rank-then-sequence order inside each slice (deterministic).
  std::stable_sort(s.contributions.begin(), s.contributions.end(),
                   [](const Contribution& a, const Contribution& b) { return a.slice < b.slice; });
  s.run_starts.clear();
  for (std::size_t i = 0; i < s.contributions.size(); ++i)
    if (i == 0 || s.contributions[i].slice != s.contributions[i - 1].slice) s.run_starts.push_back(i);
  s.run_starts.push_back(s.contributions.size());

  // 3. Apply, in parallel over slices. Each slice belongs to exactly one task in a round, which
  //    is what makes it that slice's lock: no two server threads ever write one slice at once.
  std::atomic<std::uint64_t> floats{0}, skipped{0};
  const OptimizerSettings settings = h.optimizer;
  auto apply_slice = [&](std::size_t run) {
    const std::size_t begin = s.run_starts[run], end = s.run_starts[run + 1];
    const std::uint64_t slice_index = s.contributions[begin].slice;
    SliceEntry& slice = seg.slice(slice_index);
    const ParamEntry& p = seg.param(slice.param);
    float* values = seg.values(p);
    float* state0 = p.state_offset[0] ? seg.state(p, 0) : nullptr;
    float* state1 = p.state_offset[1] ? seg.state(p, 1) : nullptr;
    std::uint64_t updates = 0, applied_floats = 0, skipped_here = 0;
    const std::uint64_t before = seqlock_write_begin(slice.version);
    for (std::size_t i = begin; i < end; ++i) {
      const Contribution& c = s.contributions[i];
      std::uint64_t& last = seg.last_applied(slice_index, c.rank);
      if (c.record->seq <= last) {  // applied before a server restart: exactly once
        ++skipped_here;
        continue;
      }
      const std::uint64_t lo = std::max(slice.first, c.record->offset);
      const std::uint64_t hi = std::min(slice.first + slice.count, c.record->offset + c.record->count);
      const std::size_t n = hi - lo;
      const float* grad = record_payload(c.record) + (lo - c.record->offset);
      const float scale = static_cast<float>(clip_norm_scale(settings, c.record->grad_sq_norm));
      slice.step += 1;
      apply_update(settings, std::span<float>(values + lo, n), std::span<const float>(grad, n),
                   state0 ? std::span<float>(state0 + lo, n) : std::span<float>(),
                   state1 ? std::span<float>(state1 + lo, n) : std::span<float>(), slice.step, scale);
      last = c.record->seq;
      ++updates;
      applied_floats += n;
    }
    if (updates)
      seqlock_write_end(slice.version, before, updates);
    else
      store_release(slice.version, before);  // nothing changed: back to the old, even word
    floats.fetch_add(applied_floats, std::memory_order_relaxed);
    skipped.fetch_add(skipped_here, std::memory_order_relaxed);
  };
  const std::size_t runs = s.run_starts.size() - 1;
  if (runs == 1) {
    apply_slice(0);
  } else if (runs > 1) {
    s.arena->execute([&] {
      tbb::parallel_for(std::size_t{0}, runs, [&](std::size_t run) { apply_slice(run); });
    });
  }

  // 4. Give the bytes back to the producers, publish what is applied, wake sleepers.
  SegmentHeader& hw = seg.header();
  for (std::uint32_t r = 0; r < workers; ++r) {
    RingConsumer& ring = s.consumers[r];
    if (s.round_end[r] == ring.head()) continue;
    ring.release_to(s.round_end[r]);
    WorkerSlot& slot = seg.slot(r);
    if (s.round_records[r]) {
      store_release(slot.applied, s.round_last_seq[r]);
      bump_counter(slot.records_applied, s.round_records[r]);
    }
    store_release(slot.progress, load_own(slot.progress) + 1);
    fence_store_load();
    if (load_acquire(slot.waiting)) futex_wake_all(slot.progress);
  }
  if (records) {
    bump_counter(hw.records_applied, records);
    bump_counter(hw.floats_applied, floats.load(std::memory_order_relaxed));
    bump_counter(hw.records_skipped, skipped.load(std::memory_order_relaxed));
    bump_counter(hw.apply_rounds, std::uint64_t{1});
  }
  return records;
}

void Server::run() {
  Impl& s = *impl_;
  using clock = std::chrono::steady_clock;
  auto next_liveness = clock::now();
  std::uint32_t idle_rounds = 0;
  SegmentHeader& h = s.header();
  while (true) {
    store_release(h.server_heartbeat_ns, monotonic_ns());
    const auto now = clock::now();
    if (now >= next_liveness) {
      s.check_liveness();
      next_liveness = now + s.options.liveness_interval;
    }
    const std::uint64_t applied = apply_round();
    if (applied) {
      idle_rounds = 0;
      continue;
    }
    if (s.stop_requested.load(std::memory_order_acquire)) {
      // Drained: everything committed before the stop request has been applied (the last round
      // found nothing). Pushes committed from now on stay in the rings for the next server.
      break;
    }
    // Idle: spin briefly (a push is often a few microseconds away), then sleep on the futex.
    if (++idle_rounds < 64) {
      std::this_thread::yield();
      continue;
    }
    s.sleep_until_work(std::chrono::microseconds(2000));
  }
  store_release(h.state, static_cast<std::uint32_t>(SegmentState::stopped));
  const ServerStats st = stats();
  spdlog::info("event=stopped segment={} records_applied={} floats_applied={} rounds={} removed={}", s.options.spec.name,
               st.records_applied, st.floats_applied, st.rounds, s.options.remove_on_stop);
  if (s.options.remove_on_stop) Segment::remove(s.options.spec.name);
}

void Server::stop() noexcept {
  impl_->stop_requested.store(true, std::memory_order_release);
  if (impl_->segment.base()) {
    // Our own word: bump it so a sleeping run() wakes (no lost wake-up), then wake.
    auto& word = impl_->segment.header().server_wake;
    word.fetch_add(1, std::memory_order_acq_rel);
    futex_wake_all(word);
  }
}

}  // namespace shmps::server
