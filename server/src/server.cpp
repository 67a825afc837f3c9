#include "shmps/server/server.hpp"

#include <spdlog/spdlog.h>
#include <tbb/task_arena.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/checkpoint.hpp>
#include <shmps/server/initialise.hpp>
#include <shmps/server/optimizer.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/futex.hpp>
#include <shmps/shm/killpoint.hpp>
#include <shmps/shm/liveness.hpp>
#include <shmps/shm/membership.hpp>
#include <shmps/shm/memory.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/pages.hpp>
#include <shmps/shm/proc.hpp>
#include <shmps/shm/ring.hpp>
#include <shmps/shm/seqlock.hpp>

#include "parallel.hpp"

namespace shmps::server {

using namespace shmps::shm;

namespace {

// A hash of everything that fixes the model's layout, so that a server restarted with a spec
// for another model refuses the existing segment instead of misreading it. The ring size is not
// in it: an automatic ring depends on the consistency mode the server starts in, and a segment
// keeps the rings it was made with (recover_segment checks an explicit ring_bytes on its own).
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
  mix(request.state_arrays);
  return h;
}

// "" when the rings of a segment hold one BSP step of every parameter, else what to do.
std::string bsp_ring_note(const Segment& segment) {
  const LayoutPlan plan = plan_of(segment);
  const std::uint64_t need = bsp_step_ring_bytes(plan.params);
  if (plan.ring_bytes >= need) return {};
  return "each worker's ring holds " + std::to_string(plan.ring_bytes) + " bytes, less than one BSP step that pushes "
         "every parameter (" + std::to_string(need) + " bytes): such a step fails in the worker with what to do; push "
         "less per step, or make the job again with ring_bytes >= " + std::to_string(need) +
         " (or with consistency = \"bsp\" in the spec, which sizes the rings for a step)";
}

// Pre-faults the values and optimizer state in parallel, and in a new segment allocates them:
// the arena's threads each take a contiguous block of slices, so that (first touch) each
// thread's pages are on its NUMA node and the model is spread over the nodes the server runs
// on. The apply itself takes slices dynamically (a oneTBB parallel_for over the slices a round
// touches), so no block stays with one thread; the blocks spread the pages, they do not pin them.
void prefault_model(Segment& segment, tbb::task_arena& arena) {
  const SegmentHeader& h = segment.header();
  if (h.slice_count == 0) return;
  const std::uint64_t blocks = std::min<std::uint64_t>(static_cast<std::uint64_t>(arena.max_concurrency()), h.slice_count);
  std::mutex mutex;
  std::string error;
  parallel_for_index(arena, blocks, [&](std::size_t b, std::size_t) {
    const std::uint64_t first = h.slice_count * b / blocks, last = h.slice_count * (b + 1) / blocks;
    if (first == last) return;
    const SliceEntry& s0 = segment.slice(first);
    const SliceEntry& s1 = segment.slice(last - 1);
    const ParamEntry& p0 = segment.param(s0.param);
    const ParamEntry& p1 = segment.param(s1.param);
    auto reserve = [&](std::uint64_t offset0, std::uint64_t offset1, const char* what) {
      const std::uint64_t begin = offset0 + s0.first * sizeof(float);
      const std::uint64_t end = offset1 + (s1.first + s1.count) * sizeof(float);
      segment.reserve(begin, end - begin, what);
    };
    try {
      reserve(p0.values_offset, p1.values_offset, "its values");
      for (std::uint32_t a = 0; a < h.state_arrays; ++a) reserve(p0.state_offset[a], p1.state_offset[a], "optimizer state");
    } catch (const Error& e) {
      const std::lock_guard lock(mutex);
      if (error.empty()) error = e.what();
    }
  });
  if (!error.empty()) throw Error(error);
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
  // Per slot, for the round being built: where its ring's head moves to, the last push sequence
  // number the server is then done with, and how many pushes were applied or discarded.
  std::vector<std::uint64_t> round_end;
  std::vector<char> round_moved;  // per slot: whether this round moved its ring's head
  std::vector<std::uint64_t> leading_padding_end;  // BSP: a ring's head moved past padding in front
  std::vector<std::uint64_t> round_last_seq;
  std::vector<std::uint64_t> round_records;
  std::vector<std::uint64_t> round_discarded;
  std::vector<std::uint64_t> seen_tail;  // per slot: the committed tail the last round looked at
  std::vector<Contribution> contributions;
  std::vector<std::size_t> run_starts;
  std::unique_ptr<tbb::task_arena> arena;
  std::atomic<bool> stop_requested{false};
  bool recovered = false;
  bool restored = false;
  std::optional<PretrainedValues> pretrained;  // loaded when the segment is created from the spec
  std::uint64_t workers_died = 0;
  std::vector<std::uint64_t> round_clock;  // per slot: the clock after the newest clock record this round consumes
  std::vector<std::uint64_t> latency_sampled_seq;  // per slot: the newest push whose latency was sampled

  // Checkpoints: at most one is being written (by `thread`) at a time; the snapshot's buffers are
  // reused from one checkpoint to the next.
  struct Checkpoint {
    Snapshot snapshot;
    std::thread thread;
    std::atomic<bool> finished{false};
    std::filesystem::path path;
    bool in_dir = false;       // one of the directory's rotation (pruned to `keep`)
    bool for_mailbox = false;  // asked by shmps-ctl checkpoint: answer when durable
    std::string error;
    std::uint64_t started_ns = 0, pause_ns = 0;
  } checkpoint;
  std::optional<CheckpointDir> checkpoint_dir;
  bool mailbox_checkpoint_pending = false;  // accepted; starts once the writer is free
  bool mailbox_checkpoint_running = false;
  std::filesystem::path mailbox_checkpoint_path;
  std::chrono::steady_clock::time_point next_checkpoint_time{};
  std::uint64_t next_checkpoint_clock = 0;
  std::uint64_t checkpointed_work = UINT64_MAX;  // work_done() at the last snapshot
  std::uint64_t checkpoints_written = 0;

  SegmentHeader& header() { return segment.header(); }

  void create_segment(const LayoutRequest& request, const LayoutPlan& plan, std::uint64_t hash, const Snapshot* restore);
  void copy_in(RedoEntry& e);
  void recover_segment(std::uint64_t hash);
  void check_liveness();
  bool participating(std::uint32_t rank);
  void admit_new_workers();
  void keep_resume_state(std::uint32_t rank, const PushRecord* clock_record);
  void sample_latency(std::uint32_t rank, std::uint64_t applied_at);
  std::vector<const PushRecord*> step_states;  // per slot: the newest state-carrying clock record of a BSP step
  bool add_contributions(std::uint32_t rank, const PushRecord* record);
  void collect_all();
  bool collect_bsp_step(std::uint64_t step);
  void apply_contributions(bool sum_per_slice, std::uint64_t& floats, std::uint64_t& skipped);
  void set_policy(Consistency mode, std::uint32_t staleness);
  void handle_mailbox();
  void reply_mailbox(int status, const std::string& reply);
  bool checkpoint_busy() const { return checkpoint.thread.joinable(); }
  void start_checkpoint(const std::filesystem::path& path, bool in_dir, bool for_mailbox);
  void finish_checkpoint(bool wait);
  void checkpoint_if_due();
  std::uint64_t job_clock();
  std::uint64_t work_done();
  bool nothing_new();
  void sleep_until_work(std::chrono::microseconds bound);
};

Server::Server(ServerOptions options) : impl_(std::make_unique<Impl>()) { impl_->options = std::move(options); }
Server::~Server() {
  if (impl_ && impl_->checkpoint_busy()) impl_->checkpoint.thread.join();
}

const Segment& Server::segment() const noexcept { return impl_->segment; }
bool Server::recovered() const noexcept { return impl_->recovered; }

ServerStats Server::stats() const noexcept {
  const auto& h = impl_->segment.header();
  return ServerStats{load_counter(h.records_applied), load_counter(h.floats_applied), load_counter(h.apply_rounds),
                     impl_->workers_died, impl_->checkpoints_written, impl_->restored};
}

void Server::start() {
  Impl& s = *impl_;
  const ModelSpec& spec = s.options.spec;
  check_segment_name(spec.name);
  if (auto problem = validate_optimizer_settings(spec.optimizer); !problem.empty())
    throw Error(spec.source + ": optimizer: " + problem);

  // 1. Lay out the model; check for room before anything is created (a lock file included).
  const LayoutRequest request = layout_request(s.options);
  const LayoutPlan plan = plan_layout(request);
  const std::uint64_t hash = layout_hash(request, plan);
  // The apply threads (each needs its own redo entry): they also pre-fault the model below.
  unsigned threads = s.options.threads ? s.options.threads : spec.server_threads;
  if (threads == 0) threads = std::max(1U, std::thread::hardware_concurrency());
  threads = std::min(threads, request.redo_entries);
  s.arena = std::make_unique<tbb::task_arena>(static_cast<int>(threads));

  // A checkpoint to restore is read and checked whole before anything is touched: a damaged or
  // foreign file changes nothing.
  std::optional<Snapshot> restore;
  std::filesystem::path restore_from;
  auto refuse_restore_over_segment = [&] {
    throw Error("segment '" + spec.name + "' exists, and its state is newer than any checkpoint: --restore would "
                "replace it. To go back to " + s.options.restore.string() + ", stop its server and remove the segment "
                "(shmps-ctl destroy " + spec.name + "), then restore; or drop --restore to continue the segment");
  };
  if (!s.options.restore.empty()) {
    restore_from = s.options.restore;
    restore = read_checkpoint(restore_from);
    check_restorable(*restore, restore_from, spec, plan);
    if (Segment::exists(spec.name)) refuse_restore_over_segment();
  }
  if (!s.options.checkpoint_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(s.options.checkpoint_dir, ec);
    if (!std::filesystem::is_directory(s.options.checkpoint_dir))
      throw Error("--checkpoint-dir " + s.options.checkpoint_dir.string() + ": not a directory and cannot be created" +
                  (ec ? ": " + ec.message() : ""));
    s.checkpoint_dir.emplace(s.options.checkpoint_dir, spec.name);
    if (!restore && !Segment::exists(spec.name)) {
      std::vector<std::string> skipped;
      if (auto found = s.checkpoint_dir->newest_valid(skipped)) {
        for (const auto& why : skipped)
          spdlog::warn("event=checkpoint_skipped segment={} reason=\"{}\"", spec.name, why);
        check_restorable(found->snapshot, found->path, spec, plan);
        restore_from = found->path;
        restore = std::move(found->snapshot);
      }
    }
  }

  // Pretrained initial values are read and checked (names, shapes, dtypes) before anything is
  // created, too.
  if (!restore && !Segment::exists(spec.name)) s.pretrained = load_pretrained(spec);

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

  // 3. Create (from the spec, or from a checkpoint), or recover what is there.
  if (s.checkpoint_dir) {
    if (const std::size_t n = s.checkpoint_dir->remove_temporaries())
      spdlog::warn("event=checkpoint_temporaries_removed segment={} count={} note=\"left by a server killed while "
                   "writing a checkpoint; the checkpoints before them are intact\"", spec.name, n);
  }
  if (Segment::exists(spec.name) && restore && !s.options.restore.empty()) refuse_restore_over_segment();
  if (Segment::exists(spec.name)) {
    Segment existing = Segment::open(spec.name, Access::read_write);
    if (load_acquire(existing.header().state) == static_cast<std::uint32_t>(SegmentState::creating)) {
      // We hold the server lock, so nobody is creating it now: its creator died midway.
      spdlog::warn("event=recreate segment={} reason=\"left half-created by a server that died during creation\"",
                   spec.name);
      existing = Segment();
      std::filesystem::remove(segment_path(spec.name));  // the segment only: we hold its lock files
      s.create_segment(request, plan, hash, restore ? &*restore : nullptr);
    } else {
      s.segment = std::move(existing);
      s.recover_segment(hash);
    }
  } else {
    s.create_segment(request, plan, hash, restore ? &*restore : nullptr);
  }
  if (s.restored)
    spdlog::info("event=restored segment={} file={} model_clock={} epoch={} slots={} note=\"restarted workers resume "
                 "from their committed state\"", spec.name, restore_from.string(), restore->model_clock, restore->epoch,
                 restore->slots.size());

  // 4. Views, workers' lock file, threads.
  s.slots_lock = LockFile::open(slots_lock_path(spec.name), true, s.options.mode);
  const auto& h = s.header();
  for (std::uint32_t r = 0; r < h.max_workers; ++r)
    s.consumers.emplace_back(&s.segment.ring(r), s.segment.ring_data(r));
  s.round_end.assign(h.max_workers, 0);
  s.round_moved.assign(h.max_workers, 0);
  s.leading_padding_end.assign(h.max_workers, 0);
  s.round_last_seq.assign(h.max_workers, 0);
  s.round_records.assign(h.max_workers, 0);
  s.round_discarded.assign(h.max_workers, 0);
  s.seen_tail.assign(h.max_workers, 0);
  s.step_states.assign(h.max_workers, nullptr);
  s.round_clock.assign(h.max_workers, 0);
  s.latency_sampled_seq.assign(h.max_workers, 0);
  if (threads > h.redo_count) {  // a recovered segment made for fewer threads
    threads = h.redo_count;
    s.arena = std::make_unique<tbb::task_arena>(static_cast<int>(threads));
  }

  // Values and optimizer state: allocated (a new segment) and mapped by the apply threads, so
  // that the first rounds pay no page faults. Then what the segment got, for the log and ctl.
  if (s.recovered) prefault_model(s.segment, *s.arena);  // a new segment's were, in create_segment
  {
    const HugePageSupport huge = huge_page_support();
    SegmentHeader& hh = s.header();
    const std::uint64_t huge_bytes = huge_mapped_bytes(s.segment.base());
    store_release(hh.huge_mount, static_cast<std::uint32_t>(huge.mount));
    store_release(hh.huge_sysfs, static_cast<std::uint32_t>(huge.sysfs));
    store_release(hh.huge_bytes, huge_bytes);
    const MemoryBreakdown m = memory_breakdown(plan_of(s.segment));
    spdlog::info("event=memory segment={} total_bytes={} values_bytes={} state_bytes={} rings_bytes={} "
                 "ring_each={} overhead_bytes={} overhead_pct={:.1f} huge_pages=\"{}\"",
                 spec.name, m.total_bytes, m.values_bytes, m.state_bytes, m.bytes_of("rings"), m.ring_each_bytes,
                 m.overhead_bytes(), m.overhead_percent(), huge_page_text(huge, huge_bytes, m.total_bytes));
    if (!s.recovered) spdlog::info("event=ring_size segment={} ring_bytes={} rule=\"{}\"", spec.name, plan.ring_bytes,
                                   plan.ring_rule);
  }

  // 5. Identity, a new epoch, and "ready" last.
  SegmentHeader& hw = s.header();
  store_release(hw.server_pid, static_cast<std::int32_t>(::getpid()));
  store_release(hw.server_start_time, process_start_time(::getpid()));
  store_release(hw.server_started_unix_ns, unix_ns());
  store_release(hw.server_heartbeat_ns, monotonic_ns());
  store_release(hw.server_epoch, load_own(hw.server_epoch) + 1);
  store_release(hw.state, static_cast<std::uint32_t>(SegmentState::ready));
  s.check_liveness();
  if (load_own(hw.consistency) == static_cast<std::uint32_t>(Consistency::bsp)) {
    if (const std::string note = bsp_ring_note(s.segment); !note.empty())
      spdlog::warn("event=bsp_ring segment={} note=\"{}\"", spec.name, note);
  }
  spdlog::info("event=ready segment={} epoch={} recovered={} params={} slices={} slice_floats={} workers={} "
               "ring_bytes={} segment_bytes={} optimizer={} lr={} threads={} consistency={} staleness={} "
               "bsp_aggregate={} on_worker_death={}",
               spec.name, load_own(hw.server_epoch), s.recovered, hw.param_count, hw.slice_count, hw.slice_floats,
               hw.max_workers, hw.ring_bytes, hw.total_bytes, to_string(hw.optimizer.kind), hw.optimizer.lr, threads,
               to_string(static_cast<Consistency>(load_own(hw.consistency))), load_own(hw.staleness),
               to_string(static_cast<BspAggregate>(load_own(hw.bsp_aggregate))),
               to_string(static_cast<OnWorkerDeath>(load_own(hw.on_worker_death))));
}

LayoutRequest layout_request(const ServerOptions& options) {
  const ModelSpec& spec = options.spec;
  LayoutRequest request;
  for (const auto& p : spec.params) request.params.push_back({p.name, p.shape});
  request.slice_bytes = spec.slice_bytes;
  request.max_workers = spec.max_workers;
  request.ring_bytes = spec.ring_bytes;
  request.bsp = spec.consistency == Consistency::bsp;
  request.state_arrays = static_cast<std::uint32_t>(optimizer_state_arrays(spec.optimizer.kind));
  // One redo entry per apply thread a server may ever use here (a later server with more
  // threads than that uses only as many).
  request.redo_entries = std::clamp<std::uint32_t>(
      std::max({std::thread::hardware_concurrency(), options.threads, spec.server_threads}), 1U, 1024U);
  return request;
}

LayoutPlan plan_for(const ServerOptions& options) {
  if (auto problem = validate_optimizer_settings(options.spec.optimizer); !problem.empty())
    throw Error(options.spec.source + ": optimizer: " + problem);
  return plan_layout(layout_request(options));
}

void Server::Impl::create_segment(const LayoutRequest& request, const LayoutPlan& plan, std::uint64_t hash,
                                  const Snapshot* restore) {
  const ModelSpec& spec = options.spec;
  if (!restore && !pretrained) pretrained = load_pretrained(spec);  // a half-created segment being recreated
  // The server reserves its tables now; the values and optimizer state are reserved by the
  // apply threads (prefault_model), and each ring's records by its worker when it attaches (the
  // ring's writer: first touch places them on its NUMA node, in its memory cgroup). Nothing else
  // touches those pages before. Alignment padding is touched by nobody: no memory behind it.
  const std::uint64_t slots_end = plan.slots_offset + request.max_workers * sizeof(WorkerSlot);
  const std::uint64_t rings_end = plan.rings_offset + request.max_workers * plan.ring_stride;
  std::vector<ByteRange> deferred{{slots_end, plan.rings_offset - slots_end},
                                  {rings_end, plan.total_bytes - rings_end}};
  for (std::uint32_t r = 0; r < request.max_workers; ++r)
    deferred.push_back({plan.rings_offset + r * plan.ring_stride + sizeof(RingHeader), plan.ring_stride - sizeof(RingHeader)});
  segment = Segment::create(spec.name, plan.total_bytes, options.mode, deferred);
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
  h.redo_offset = plan.redo_offset;
  h.redo_stride = plan.redo_stride;
  h.param_stats_offset = plan.param_stats_offset;
  h.rejected_offset = plan.rejected_offset;
  h.rejected_stride = plan.rejected_stride;
  h.redo_count = request.redo_entries;
  h.optimizer = spec.optimizer;
  h.state_arrays = request.state_arrays;
  store_release(h.consistency, static_cast<std::uint32_t>(spec.consistency));
  store_release(h.staleness, spec.staleness);
  store_release(h.bsp_aggregate, static_cast<std::uint32_t>(spec.bsp_aggregate));
  store_release(h.on_worker_death, static_cast<std::uint32_t>(spec.on_worker_death));

  for (std::size_t i = 0; i < plan.params.size(); ++i) {
    ParamEntry& p = segment.param(i);
    p = plan.params[i];
    for (std::uint64_t k = 0; k < p.slice_count; ++k) {
      SliceEntry& slice = segment.slice(p.first_slice + k);
      slice.param = i;
      slice.first = k * plan.slice_floats;
      slice.count = std::min(plan.slice_floats, p.size - slice.first);
    }
  }
  prefault_model(segment, *arena);  // before anything writes a value: first touch by the apply threads
  for (std::size_t i = 0; i < plan.params.size() && !restore; ++i) {
    const ParamEntry& p = segment.param(i);
    initialise(spec.params[i], std::span<float>(segment.values(p), p.size), *pretrained);
  }
  for (std::uint32_t r = 0; r < request.max_workers; ++r) segment.ring(r).capacity = plan.ring_bytes;
  if (restore) {
    restore_into(segment, *restore);
    if (options.override_policy) {
      set_policy(spec.consistency, spec.staleness);
      store_release(h.bsp_aggregate, static_cast<std::uint32_t>(spec.bsp_aggregate));
      store_release(h.on_worker_death, static_cast<std::uint32_t>(spec.on_worker_death));
    }
    restored = true;
  }
  h.magic = kMagic;  // identity complete; "ready" is stored by start() after the epoch
}

void Server::Impl::recover_segment(std::uint64_t hash) {
  const ModelSpec& spec = options.spec;
  SegmentHeader& h = segment.header();
  if (h.spec_hash != hash)
    throw Error("segment '" + spec.name + "' already exists and holds another model than " + spec.source +
                " (parameter names, shapes, slice size, worker slots or optimizer kind differ): give this "
                "job another name (--name), or remove the old segment with `shmps-ctl destroy " + spec.name + "`");
  // An automatic ring size takes the segment's rings as they are; an explicit one must match.
  if (spec.ring_bytes != 0 && align_up(spec.ring_bytes, kCacheLine) != h.ring_bytes)
    throw Error("segment '" + spec.name + "' already exists with rings of " + std::to_string(h.ring_bytes) +
                " bytes, but ring_bytes " + std::to_string(spec.ring_bytes) + " was asked for: leave ring_bytes out (0) "
                "to continue the segment with its rings, or remove the segment (`shmps-ctl destroy " + spec.name +
                "`, after a checkpoint if its state matters) to make it again with other rings");
  // A redo entry still marked valid: the previous server died while copying a slice in. Copy it
  // in again (idempotent) so the slice holds exactly its new values and its redo-table row.
  std::uint64_t replayed = 0;
  for (std::uint32_t i = 0; i < h.redo_count; ++i) {
    RedoEntry& e = segment.redo(i);
    if (load_acquire(e.valid) == 0) continue;
    copy_in(e);
    ++replayed;
  }
  // With the redo log every odd word has a valid entry; an odd word without one is damage.
  std::uint64_t odd = 0;
  for (std::uint64_t i = 0; i < h.slice_count; ++i) {
    SliceEntry& slice = segment.slice(i);
    const std::uint64_t v = load_own(slice.version);
    if (v & 1U) {
      store_release(slice.version, v + 1);
      ++odd;
    }
  }
  if (replayed)
    spdlog::warn("event=redo segment={} slices_replayed={} note=\"the previous server died while writing them; their "
                 "updates are now complete, applied once\"",
                 spec.name, replayed);
  if (odd)
    spdlog::error("event=repair segment={} slices_without_redo={} note=\"version words left odd with no redo entry: "
                  "those slices may mix two updates\"",
                  spec.name, odd);
  if (options.override_policy) {
    set_policy(spec.consistency, spec.staleness);
    store_release(h.bsp_aggregate, static_cast<std::uint32_t>(spec.bsp_aggregate));
    store_release(h.on_worker_death, static_cast<std::uint32_t>(spec.on_worker_death));
  }
  recovered = true;
}

// Whether anything was committed since the last round looked (a BSP step may be waiting for
// a slow worker with records in the rings: that is no reason to spin).
bool Server::Impl::nothing_new() {
  for (std::size_t r = 0; r < consumers.size(); ++r)
    if (consumers[r].committed() != seen_tail[r]) return false;
  if (mailbox_checkpoint_pending || mailbox_checkpoint_running) return true;  // being answered
  return load_acquire(header().mailbox_state) != static_cast<std::uint32_t>(MailboxState::submitted);
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
  if (nothing_new() && !stop_requested.load(std::memory_order_acquire)) {
    // A worker's FUTEX_WAKE that lands between the check above and the wait is lost (the worker
    // writes nothing here, DESIGN.md); the bound keeps that rare case to a short delay.
    futex_wait(h.server_wake, word, bound);
  }
  store_release(h.server_sleeping, 0U);
}

// Copies a redo entry into its slice under the slice's seqlock: values, optimizer state, the
// redo-table row and the step count, then the new version word. Idempotent, so a restarted
// server can do it again for an entry its predecessor left valid.
void Server::Impl::copy_in(RedoEntry& e) {
  SliceEntry& slice = segment.slice(e.slice);
  const ParamEntry& p = segment.param(slice.param);
  const std::uint32_t workers = header().max_workers;
  const int arrays = static_cast<int>(header().state_arrays);
  const std::uint64_t half = e.count / 2;
  const std::uint64_t word = load_own(slice.version);
  if ((word & 1U) == 0) seqlock_write_begin(slice.version);  // a replay finds it odd already
  float* values = segment.values(p) + slice.first;
  std::memcpy(values, segment.redo_values(e), half * sizeof(float));
  kill_point("apply.mid_copy");
  std::memcpy(values + half, segment.redo_values(e) + half, (e.count - half) * sizeof(float));
  for (int a = 0; a < arrays; ++a)
    std::memcpy(segment.state(p, a) + slice.first, segment.redo_state(e, a), e.count * sizeof(float));
  std::memcpy(&segment.last_applied(e.slice, 0), segment.redo_last_applied(e), workers * sizeof(std::uint64_t));
  slice.step = e.step_after;
  store_release(slice.version, e.version_after);
}

// Commit -> applied latency of the newest push worker `rank` committed, if this round applied it
// (once per push; a push whose commit time was overwritten by a newer one meanwhile is skipped).
void Server::Impl::sample_latency(std::uint32_t rank, std::uint64_t applied_at) {
  const WorkerSlot& slot = segment.slot(rank);
  const std::uint64_t seq = load_acquire(slot.last_commit_seq);
  const std::uint64_t committed_at = load_acquire(slot.last_commit_ns);
  if (seq == 0 || seq != load_acquire(slot.last_commit_seq) || seq > round_last_seq[rank] ||
      seq <= latency_sampled_seq[rank] || committed_at > applied_at)
    return;
  latency_sampled_seq[rank] = seq;
  const std::uint64_t ns = std::max<std::uint64_t>(applied_at - committed_at, 1);
  const std::size_t bucket = std::min<std::size_t>(static_cast<std::size_t>(std::bit_width(ns)) - 1, kLatencyBuckets - 1);
  SegmentHeader& h = header();
  bump_counter(h.latency_buckets[bucket], std::uint64_t{1});
  bump_counter(h.latency_samples, std::uint64_t{1});
}

// Keeps the resume state a clock record carries in its slot, for a restarted worker.
void Server::Impl::keep_resume_state(std::uint32_t rank, const PushRecord* clock_record) {
  if (clock_record->offset == 0) return;
  WorkerSlot& slot = segment.slot(rank);
  const std::uint64_t before = seqlock_write_begin(slot.resume_version);
  std::memcpy(slot.resume, record_payload(clock_record), clock_record->offset);
  store_release(slot.resume_bytes, static_cast<std::uint32_t>(clock_record->offset));
  store_release(slot.resume_clock, clock_record->clock);
  seqlock_write_end(slot.resume_version, before, 1);
}

// Admits every newly attached generation: its entry clock is the step being collected (BSP) or
// the clock it brought (never lower than the one its slot reached).
void Server::Impl::admit_new_workers() {
  const SegmentHeader& h = header();
  for (std::uint32_t r = 0; r < h.max_workers; ++r) {
    WorkerSlot& slot = segment.slot(r);
    if (load_acquire(slot.state) != static_cast<std::uint32_t>(SlotState::attached)) continue;
    const std::uint64_t generation = load_acquire(slot.generation);
    if (load_own(slot.admitted_generation) == generation) continue;
    std::uint64_t entry = load_acquire(slot.clock);
    if (load_own(h.consistency) == static_cast<std::uint32_t>(Consistency::bsp))
      entry = std::max(entry, load_own(h.model_clock));
    store_release(slot.admitted_clock, entry);
    store_release(slot.admitted_generation, generation);
    store_release(slot.progress, load_own(slot.progress) + 1);
    fence_store_load();
    if (load_acquire(slot.waiting)) futex_wake_all(slot.progress);
  }
}

bool Server::Impl::participating(std::uint32_t rank) { return counts_for_group(header(), segment.slot(rank)); }

// Adds the slices a push record touches; false if the record is malformed (then it is skipped).
bool Server::Impl::add_contributions(std::uint32_t rank, const PushRecord* rec) {
  const SegmentHeader& h = header();
  if (rec->param >= h.param_count || rec->count == 0 || rec->offset + rec->count > segment.param(rec->param).size) {
    spdlog::error("event=bad_record segment={} rank={} seq={} reason=\"range outside its parameter\"", h.name, rank,
                  rec->seq);
    return false;
  }
  const ParamEntry& p = segment.param(rec->param);
  const std::uint64_t first = p.first_slice + rec->offset / h.slice_floats;
  const std::uint64_t last = p.first_slice + (rec->offset + rec->count - 1) / h.slice_floats;
  for (std::uint64_t slice = first; slice <= last; ++slice) contributions.push_back({slice, rank, rec});
  return true;
}

// ASP and SSP: every committed push, as it comes. Clock records only move the cursor.
void Server::Impl::collect_all() {
  const std::uint32_t workers = header().max_workers;
  for (std::uint32_t r = 0; r < workers; ++r) {
    RingConsumer& ring = consumers[r];
    const std::uint64_t tail = ring.committed();
    std::uint64_t pos = ring.head();
    while (pos < tail) {
      if (!ring.plausible(pos, tail)) {
        spdlog::error("event=bad_record segment={} rank={} position={} action=\"discarding the rest of this ring\"",
                      header().name, r, pos);
        pos = tail;
        break;
      }
      const PushRecord* rec = ring.record_at(pos);
      pos += rec->record_bytes;
      if (rec->kind == RecordKind::clock) {
        keep_resume_state(r, rec);  // before the head moves past it
        round_clock[r] = std::max(round_clock[r], rec->clock + 1);
      }
      if (rec->kind != RecordKind::push) continue;
      add_contributions(r, rec);
      round_last_seq[r] = rec->seq;
      ++round_records[r];
    }
    round_end[r] = pos;
  }
}

// BSP: the pushes of step `step` from every ring, if every participating worker has finished
// that step; false (and nothing collected) otherwise.
//
// A ring holds groups of pushes, each closed by the clock record of the step it belongs to. A
// group counts in the step its clock record names (an older step's late group counts in the
// current one). A group with no clock record counts only once it gets one; if its generation
// died (the slot's holder is proven dead, or a newer generation wrote after it) it is discarded
// whole: a worker killed in the middle of a step contributes none of that step.
bool Server::Impl::collect_bsp_step(std::uint64_t step) {
  const std::uint32_t workers = header().max_workers;
  bool everyone_finished = true;
  std::fill(step_states.begin(), step_states.end(), nullptr);
  for (std::uint32_t r = 0; r < workers; ++r) {
    RingConsumer& ring = consumers[r];
    const WorkerSlot& slot = segment.slot(r);
    // The worker stores its clock after committing the clock record that ends the step, so a
    // clock read before the tail guarantees that record is inside [head, tail) or was consumed
    // earlier (in ASP or SSP, before a switch to BSP).
    const std::uint64_t worker_clock = load_acquire(slot.clock);
    const std::uint64_t tail = ring.committed();
    std::uint64_t pos = ring.head();
    std::uint64_t consumed = pos;  // the end of the groups taken (counted or discarded)
    std::uint64_t free_to = pos;   // the end of the padding in front of the first group
    std::size_t group_begin = contributions.size();
    std::uint64_t group_generation = 0, group_records = 0, group_last_seq = 0;
    bool finished = false;
    auto drop_group = [&](std::uint64_t end) {
      contributions.resize(group_begin);
      round_discarded[r] += group_records;
      round_last_seq[r] = std::max(round_last_seq[r], group_last_seq);
      consumed = end;
      group_records = 0;
    };
    while (pos < tail) {
      if (!ring.plausible(pos, tail)) {
        spdlog::error("event=bad_record segment={} rank={} position={} action=\"discarding the rest of this ring\"",
                      header().name, r, pos);
        drop_group(tail);
        pos = tail;
        break;
      }
      const PushRecord* rec = ring.record_at(pos);
      const std::uint64_t next = pos + rec->record_bytes;
      // Padding in front of everything else carries nothing: give it back even if the step is
      // not complete (a ring that starts over puts one in front of a step, RingProducer).
      if (rec->kind == RecordKind::padding && pos == free_to) free_to = next;
      if (rec->kind == RecordKind::push) {
        if (group_records != 0 && rec->generation != group_generation) drop_group(pos);  // its writer died mid-step
        if (group_records == 0) group_begin = contributions.size();
        if (add_contributions(r, rec)) {
          ++group_records;
          group_generation = rec->generation;
          group_last_seq = rec->seq;
        }
      } else if (rec->kind == RecordKind::clock) {
        // A clock record closes only its own generation's pushes.
        if (group_records != 0 && rec->generation != group_generation) drop_group(pos);
        if (rec->clock > step) {  // a later step: the worker has finished this one
          contributions.resize(group_begin);  // the open group belongs to that later step
          group_records = 0;
          finished = true;
          break;
        }
        round_records[r] += group_records;
        round_last_seq[r] = std::max(round_last_seq[r], group_last_seq);
        group_records = 0;
        group_begin = contributions.size();
        consumed = next;
        round_clock[r] = std::max(round_clock[r], rec->clock + 1);
        if (rec->offset != 0) step_states[r] = rec;
        if (rec->clock == step) finished = true;
      }
      pos = next;
    }
    if (group_records != 0) {
      // An open group: its clock record may still come, unless its generation is dead.
      const bool writer_dead = load_acquire(slot.dead_generation) == group_generation ||
                               load_acquire(slot.generation) != group_generation;
      if (writer_dead && pos == tail)
        drop_group(tail);
      else
        contributions.resize(group_begin);
    }
    round_end[r] = std::max(consumed, free_to);
    leading_padding_end[r] = free_to;
    if (worker_clock > step) finished = true;
    if (!finished && participating(r)) everyone_finished = false;
  }
  if (everyone_finished) {
    for (std::uint32_t r = 0; r < workers; ++r)
      if (step_states[r] != nullptr) keep_resume_state(r, step_states[r]);
  } else {
    contributions.clear();
    for (std::uint32_t r = 0; r < workers; ++r) round_end[r] = leading_padding_end[r];
    std::fill(round_last_seq.begin(), round_last_seq.end(), 0);
    std::fill(round_records.begin(), round_records.end(), 0);
    std::fill(round_discarded.begin(), round_discarded.end(), 0);
    std::fill(round_clock.begin(), round_clock.end(), 0);
    return false;
  }
  return true;
}

// Applies the collected contributions, in parallel over slices. Each slice belongs to exactly one
// task in a round, which is what makes it that slice's lock: no two server threads ever write one
// slice at once. With sum_per_slice (BSP) a slice's contributions are summed in rank order and the
// optimizer runs once; otherwise (ASP, SSP) it runs once per contribution, in rank order.
void Server::Impl::apply_contributions(bool sum_per_slice, std::uint64_t& floats_out, std::uint64_t& skipped_out) {
  std::stable_sort(contributions.begin(), contributions.end(),
                   [](const Contribution& a, const Contribution& b) { return a.slice < b.slice; });
  run_starts.clear();
  for (std::size_t i = 0; i < contributions.size(); ++i)
    if (i == 0 || contributions[i].slice != contributions[i - 1].slice) run_starts.push_back(i);
  run_starts.push_back(contributions.size());

  const SegmentHeader& h = header();
  const OptimizerSettings settings = h.optimizer;
  const bool mean = load_acquire(h.bsp_aggregate) == static_cast<std::uint32_t>(BspAggregate::mean);
  std::atomic<std::uint64_t> floats{0}, skipped{0};
  const std::uint32_t workers = h.max_workers;
  const int arrays = static_cast<int>(h.state_arrays);
  // Each slice is computed in the applying thread's redo entry (in cache), then copied in under
  // the seqlock (see RedoEntry in layout.hpp). A slice whose contributions were all applied
  // before a server restart is left alone.
  auto apply_slice = [&](std::size_t run, std::size_t thread) {
    const std::size_t begin = run_starts[run], end = run_starts[run + 1];
    const std::uint64_t slice_index = contributions[begin].slice;
    SliceEntry& slice = segment.slice(slice_index);
    const ParamEntry& p = segment.param(slice.param);
    RedoEntry& redo = segment.redo(thread);
    std::uint64_t* last = segment.redo_last_applied(redo);
    float* values = segment.redo_values(redo);
    float* state[2] = {arrays > 0 ? segment.redo_state(redo, 0) : nullptr, arrays > 1 ? segment.redo_state(redo, 1) : nullptr};
    const float* slice_values = segment.values(p) + slice.first;
    const float* slice_state[2] = {arrays > 0 ? segment.state(p, 0) + slice.first : nullptr,
                                   arrays > 1 ? segment.state(p, 1) + slice.first : nullptr};
    std::memcpy(last, &segment.last_applied(slice_index, 0), workers * sizeof(std::uint64_t));
    auto state_span = [&](int a, std::uint64_t lo, std::size_t n) {
      return a < arrays ? std::span<float>(state[a] + lo, n) : std::span<float>();
    };
    // The first update that covers the whole slice reads the old values and state straight
    // from the segment and writes the new ones into the redo entry (one pass over the slice);
    // any other first update needs the slice copied into the entry before it.
    bool in_redo = false;
    auto old_of_slice = [&] {
      return UpdateInputs{{slice_values, slice.count},
                          arrays > 0 ? std::span<const float>(slice_state[0], slice.count) : std::span<const float>(),
                          arrays > 1 ? std::span<const float>(slice_state[1], slice.count) : std::span<const float>()};
    };
    auto copy_slice_to_redo = [&] {
      std::memcpy(values, slice_values, slice.count * sizeof(float));
      for (int a = 0; a < arrays; ++a) std::memcpy(state[a], slice_state[a], slice.count * sizeof(float));
      in_redo = true;
    };

    thread_local std::vector<float> sum;
    std::uint64_t updates = 0, applied_floats = 0, skipped_here = 0, ranks = 0, step = slice.step;
    std::int64_t last_rank = -1;
    for (std::size_t i = begin; i < end; ++i) {
      const Contribution& c = contributions[i];
      if (c.record->seq <= last[c.rank]) {  // applied before a server restart: exactly once
        ++skipped_here;
        continue;
      }
      // The part of the record inside this slice, relative to the slice's first element.
      const std::uint64_t lo = std::max(slice.first, c.record->offset) - slice.first;
      const std::uint64_t hi = std::min(slice.first + slice.count, c.record->offset + c.record->count) - slice.first;
      const std::size_t n = hi - lo;
      const float* grad = record_payload(c.record) + (slice.first + lo - c.record->offset);
      const float scale = static_cast<float>(clip_norm_scale(settings, c.record->grad_sq_norm));
      last[c.rank] = c.record->seq;
      applied_floats += n;
      if (!sum_per_slice) {
        if (!in_redo && n == slice.count) {
          apply_update(settings, std::span<float>(values, n), std::span<const float>(grad, n), state_span(0, 0, n),
                       state_span(1, 0, n), ++step, scale, old_of_slice());
          in_redo = true;
        } else {
          if (!in_redo) copy_slice_to_redo();
          apply_update(settings, std::span<float>(values + lo, n), std::span<const float>(grad, n),
                       state_span(0, lo, n), state_span(1, lo, n), ++step, scale);
        }
        ++updates;
        continue;
      }
      const bool first = ranks == 0;
      if (static_cast<std::int64_t>(c.rank) != last_rank) {
        ++ranks;
        last_rank = c.rank;
      }
      if (first && n == slice.count) {  // the first whole-slice gradient starts the sum: no zeroing pass
        sum.resize(slice.count);
        for (std::size_t k = 0; k < n; ++k) sum[k] = scale * grad[k];
        continue;
      }
      if (first) sum.assign(slice.count, 0.0f);
      for (std::size_t k = 0; k < n; ++k) sum[lo + k] += scale * grad[k];
    }
    if (sum_per_slice && ranks != 0) {
      if (mean) {
        const float inv = 1.0f / static_cast<float>(ranks);
        for (float& g : sum) g *= inv;
      }
      apply_update(settings, std::span<float>(values, slice.count), std::span<const float>(sum.data(), slice.count),
                   state_span(0, 0, slice.count), state_span(1, 0, slice.count), ++step, 1.0f, old_of_slice());
      updates = 1;
    }
    if (updates != 0) {
      const std::uint64_t version_before = load_own(slice.version);
      redo.slice = slice_index;
      redo.count = slice.count;
      redo.version_after = version_before + 2 * updates;
      redo.step_after = step;
      store_release(redo.valid, 1U);  // from here on, a restarted server finishes this copy
      copy_in(redo);
      store_release(redo.valid, 0U);
      // For the monitor: the slice's value norm, sampled every 8th update (and the first), from
      // the copy still in this thread's cache.
      if (version_before == 0 || version_before / 16 != redo.version_after / 16) {
        const double sq = squared_norm(std::span<const float>(values, slice.count));
        store_release(slice.value_sq_norm, std::bit_cast<std::uint64_t>(sq));
      }
      ParamStats& stats = segment.param_stats(slice.param);
      stats.slice_updates.fetch_add(updates, std::memory_order_relaxed);
      stats.floats_applied.fetch_add(applied_floats, std::memory_order_relaxed);
    }
    floats.fetch_add(applied_floats, std::memory_order_relaxed);
    skipped.fetch_add(skipped_here, std::memory_order_relaxed);
  };
  parallel_for_index(*arena, run_starts.size() - 1, apply_slice);
  floats_out = floats.load(std::memory_order_relaxed);
  skipped_out = skipped.load(std::memory_order_relaxed);
}

std::uint64_t Server::apply_round() {
  Impl& s = *impl_;
  SegmentHeader& h = s.header();
  const std::uint32_t workers = h.max_workers;
  for (std::uint32_t r = 0; r < workers; ++r) {
    s.seen_tail[r] = s.consumers[r].committed();
    s.round_end[r] = s.consumers[r].head();
    s.round_last_seq[r] = 0;
    s.round_records[r] = 0;
    s.round_discarded[r] = 0;
    s.round_clock[r] = 0;
  }
  s.contributions.clear();
  s.admit_new_workers();

  const bool bsp = load_acquire(h.consistency) == static_cast<std::uint32_t>(Consistency::bsp);
  const std::uint64_t step = load_own(h.model_clock);
  bool step_complete = false;
  if (bsp) {
    step_complete = s.collect_bsp_step(step);
  } else {
    s.collect_all();
  }

  const std::uint64_t round_started = s.contributions.empty() ? 0 : monotonic_ns();
  // For the monitor: each push record taken this round (its contributions are adjacent until
  // apply_contributions sorts them by slice), and its gradient norm.
  for (std::size_t i = 0; i < s.contributions.size(); ++i) {
    const PushRecord* rec = s.contributions[i].record;
    if (i != 0 && s.contributions[i - 1].record == rec) continue;
    ParamStats& stats = s.segment.param_stats(rec->param);
    store_release(stats.pushes, load_own(stats.pushes) + 1);
    store_release(stats.last_grad_sq_norm, std::bit_cast<std::uint64_t>(rec->grad_sq_norm));
    store_release(stats.last_grad_floats, rec->count);
  }
  std::uint64_t floats = 0, skipped = 0;
  s.apply_contributions(bsp, floats, skipped);

  std::uint64_t records = 0, discarded = 0;
  for (std::uint32_t r = 0; r < workers; ++r) {
    records += s.round_records[r];
    discarded += s.round_discarded[r];
  }
  // A BSP step is complete when every participating worker finished it; it moves the clocks even
  // when nobody pushed (the workers' pulls for the next step wait for that). With no worker at
  // all, there is no step.
  bool advanced = false;
  if (bsp && step_complete) {
    bool anyone = records != 0 || discarded != 0;
    for (std::uint32_t r = 0; r < workers && !anyone; ++r) anyone = s.participating(r);
    if (anyone) {
      for (std::uint64_t i = 0; i < h.slice_count; ++i) store_release(s.segment.slice(i).clock, step + 1);
      store_release(h.model_clock, step + 1);
      bump_counter(h.steps, std::uint64_t{1});
      advanced = true;
    }
  }

  // Give the bytes back to the producers, count, then publish what is done and wake sleepers.
  // Counting after the release keeps a record counted once when a server dies in between (its
  // successor does not read it again). Counting before `applied` moves means a worker whose
  // wait_applied() returned, or a monitor that sees `applied`, reads counters that include it.
  if (records != 0) kill_point("apply.before_release");
  const std::uint64_t applied_at = monotonic_ns();
  for (std::uint32_t r = 0; r < workers; ++r) {
    RingConsumer& ring = s.consumers[r];
    WorkerSlot& slot = s.segment.slot(r);
    if (s.round_clock[r] > load_own(slot.consumed_clock)) store_release(slot.consumed_clock, s.round_clock[r]);
    s.round_moved[r] = s.round_end[r] != ring.head();
    if (s.round_moved[r]) ring.release_to(s.round_end[r]);
  }
  if (records || discarded) {
    bump_counter(h.records_applied, records);
    bump_counter(h.records_discarded, discarded);
    bump_counter(h.floats_applied, floats);
    bump_counter(h.records_skipped, skipped);
    bump_counter(h.apply_rounds, std::uint64_t{1});
    if (round_started != 0) bump_counter(h.apply_busy_ns, applied_at - round_started);
  }
  for (std::uint32_t r = 0; r < workers; ++r) {
    WorkerSlot& slot = s.segment.slot(r);
    if (s.round_records[r]) s.sample_latency(r, applied_at);
    if (s.round_records[r] || s.round_discarded[r]) {
      bump_counter(slot.records_applied, s.round_records[r]);
      bump_counter(slot.records_discarded, s.round_discarded[r]);
      store_release(slot.applied, std::max(load_own(slot.applied), s.round_last_seq[r]));
    }
    if (s.round_moved[r] || advanced) {
      store_release(slot.progress, load_own(slot.progress) + 1);
      fence_store_load();
      if (load_acquire(slot.waiting)) futex_wake_all(slot.progress);
    }
  }
  if (discarded)
    spdlog::warn("event=step_discarded segment={} step={} records={} reason=\"their worker died before finishing the step\"",
                 h.name, step, discarded);
  return records + discarded + (advanced ? 1 : 0);
}

void Server::Impl::set_policy(Consistency mode, std::uint32_t staleness) {
  SegmentHeader& h = header();
  const auto old = static_cast<Consistency>(load_own(h.consistency));
  if (mode == Consistency::bsp && old != Consistency::bsp) {
    // BSP starts at the clock of the slowest participating worker: faster workers wait for it at
    // their next pull, and nobody's finished steps are collected twice.
    std::uint64_t start = UINT64_MAX;
    for (std::uint32_t r = 0; r < h.max_workers; ++r)
      if (participating(r)) start = std::min(start, load_acquire(segment.slot(r).clock));
    if (start == UINT64_MAX) start = load_own(h.model_clock);
    for (std::uint64_t i = 0; i < h.slice_count; ++i) store_release(segment.slice(i).clock, start);
    store_release(h.model_clock, start);
  }
  store_release(h.staleness, staleness);
  store_release(h.consistency, static_cast<std::uint32_t>(mode));
}

void Server::Impl::reply_mailbox(int status, const std::string& reply) {
  SegmentHeader& h = header();
  const std::string request(h.mailbox_request, ::strnlen(h.mailbox_request, kMailboxBytes));
  h.mailbox_status = status;
  std::memset(h.mailbox_reply, 0, kMailboxBytes);
  std::memcpy(h.mailbox_reply, reply.data(), std::min(reply.size(), kMailboxBytes - 1));
  store_release(h.mailbox_state, static_cast<std::uint32_t>(MailboxState::done));
  spdlog::info("event=command segment={} request=\"{}\" status={} reply=\"{}\"", h.name, request, status, reply);
}

void Server::Impl::handle_mailbox() {
  SegmentHeader& h = header();
  if (mailbox_checkpoint_pending || mailbox_checkpoint_running) return;  // answered when the file is durable
  if (load_acquire(h.mailbox_state) != static_cast<std::uint32_t>(MailboxState::submitted)) return;
  const std::string request(h.mailbox_request, ::strnlen(h.mailbox_request, kMailboxBytes));
  std::string reply;
  int status = 1;
  const auto eq = request.find('=');
  const std::string key = request.substr(0, eq), value = eq == std::string::npos ? "" : request.substr(eq + 1);
  if (key == "checkpoint") {
    // "checkpoint" (into the checkpoint directory) or "checkpoint=/absolute/path".
    if (value.empty() && !checkpoint_dir) {
      reply_mailbox(1, "this server has no checkpoint directory (shmps-server --checkpoint-dir DIR): give the file, "
                       "shmps-ctl checkpoint " + std::string(h.name) + " PATH");
      return;
    }
    if (!value.empty() && value.front() != '/') {
      reply_mailbox(1, "checkpoint path must be absolute, got '" + value + "'");
      return;
    }
    mailbox_checkpoint_path = value;
    mailbox_checkpoint_pending = true;  // started by checkpoint_if_due() as soon as the writer is free
    return;
  }
  if (eq == std::string::npos) {
    reply = "expected KEY=VALUE (consistency=bsp|ssp:N|asp, bsp_aggregate=sum|mean, on_worker_death=proceed|wait), got '" +
            request + "'";
  } else if (key == "consistency") {
    Consistency mode{};
    std::uint32_t bound = 0;
    reply = parse_consistency(value, mode, bound);
    if (reply.empty()) {
      const auto old = static_cast<Consistency>(load_own(h.consistency));
      set_policy(mode, bound);
      status = 0;
      reply = "consistency is now " + value + " (was " + std::string(to_string(old)) + ")" +
              (mode == Consistency::bsp ? ", from clock " + std::to_string(load_own(h.model_clock)) : "");
      if (mode == Consistency::bsp) {
        if (const std::string note = bsp_ring_note(segment); !note.empty()) reply += "; note: " + note;
      }
    } else {
      reply = "consistency: " + reply;
    }
  } else if (key == "bsp_aggregate") {
    BspAggregate a{};
    reply = parse_bsp_aggregate(value, a);
    if (reply.empty()) {
      store_release(h.bsp_aggregate, static_cast<std::uint32_t>(a));
      status = 0;
      reply = "bsp_aggregate is now " + value;
    } else {
      reply = "bsp_aggregate: " + reply;
    }
  } else if (key == "on_worker_death") {
    OnWorkerDeath d{};
    reply = parse_on_worker_death(value, d);
    if (reply.empty()) {
      store_release(h.on_worker_death, static_cast<std::uint32_t>(d));
      status = 0;
      reply = "on_worker_death is now " + value;
    } else {
      reply = "on_worker_death: " + reply;
    }
  } else {
    reply = "unknown setting '" + key + "': settable are consistency, bsp_aggregate, on_worker_death";
  }
  reply_mailbox(status, reply);
}

// ---- Checkpoints ----------------------------------------------------------------------------

// The clock a periodic "every N clocks" counts: BSP's model clock; in ASP and SSP the clock of
// the slowest worker that counts (what the staleness bound is about).
std::uint64_t Server::Impl::job_clock() {
  const SegmentHeader& h = header();
  if (load_own(h.consistency) == static_cast<std::uint32_t>(Consistency::bsp)) return load_own(h.model_clock);
  std::uint64_t slowest = UINT64_MAX;
  for (std::uint32_t r = 0; r < h.max_workers; ++r)
    if (participating(r)) slowest = std::min(slowest, load_own(segment.slot(r).consumed_clock));
  return slowest == UINT64_MAX ? 0 : slowest;
}

// Changes whenever the state a checkpoint holds may have changed.
std::uint64_t Server::Impl::work_done() {
  const SegmentHeader& h = header();
  return load_own(h.records_applied) + load_own(h.records_discarded) + load_own(h.steps) + load_own(h.model_clock) +
         load_own(h.consistency);
}

// Takes the snapshot now (between two apply rounds: one consistent state of the whole job, at a
// clock boundary in BSP), then writes it in the background while the server goes on applying.
// Training pauses only for the copy.
void Server::Impl::start_checkpoint(const std::filesystem::path& path, bool in_dir, bool for_mailbox) {
  Checkpoint& c = checkpoint;
  c.path = path;
  c.in_dir = in_dir;
  c.for_mailbox = for_mailbox;
  c.error.clear();
  c.started_ns = monotonic_ns();
  try {
    take_snapshot(segment, *arena, c.snapshot);
  } catch (const std::exception& e) {  // std::bad_alloc: no room for the copy
    c.error = std::string("cannot copy the job's state for the checkpoint: ") + e.what();
    c.finished.store(true, std::memory_order_release);
    c.thread = std::thread([] {});
    return;
  }
  c.pause_ns = monotonic_ns() - c.started_ns;
  checkpointed_work = work_done();
  c.finished.store(false, std::memory_order_release);
  c.thread = std::thread([&c] {
    try {
      write_checkpoint(c.snapshot, c.path);
    } catch (const std::exception& e) {
      c.error = e.what();
    }
    c.finished.store(true, std::memory_order_release);
  });
}

// Collects a finished checkpoint (or waits for it): records it, prunes the directory, answers
// shmps-ctl.
void Server::Impl::finish_checkpoint(bool wait) {
  Checkpoint& c = checkpoint;
  if (!checkpoint_busy() || (!wait && !c.finished.load(std::memory_order_acquire))) return;
  c.thread.join();
  SegmentHeader& h = header();
  const std::uint64_t took_ns = monotonic_ns() - c.started_ns;
  const double seconds = static_cast<double>(took_ns) / 1e9;
  const std::uint64_t bytes = c.snapshot.data_bytes();
  std::string reply;
  if (c.error.empty()) {
    ++checkpoints_written;
    bump_counter(h.checkpoints, std::uint64_t{1});
    store_release(h.last_checkpoint_unix_ns, c.snapshot.taken_unix_ns);
    store_release(h.last_checkpoint_duration_ns, took_ns);
    store_release(h.last_checkpoint_clock, c.snapshot.model_clock);
    std::size_t pruned = 0;
    if (c.in_dir) pruned = checkpoint_dir->prune(options.keep);
    char rate[64];
    std::snprintf(rate, sizeof rate, "%.2f s, %.0f MB/s", seconds, seconds > 0 ? static_cast<double>(bytes) / 1e6 / seconds : 0.0);
    spdlog::info("event=checkpoint segment={} path={} bytes={} model_clock={} pause_ms={:.1f} seconds={:.3f} pruned={}",
                 h.name, c.path.string(), bytes, c.snapshot.model_clock, static_cast<double>(c.pause_ns) / 1e6, seconds,
                 pruned);
    reply = "checkpoint of '" + std::string(h.name) + "' at model clock " + std::to_string(c.snapshot.model_clock) +
            " written to " + c.path.string() + " (" + std::to_string(bytes) + " bytes, " + rate + ")";
  } else {
    bump_counter(h.checkpoint_failures, std::uint64_t{1});
    spdlog::error("event=checkpoint_failed segment={} path={} error=\"{}\" note=\"training goes on; the previous "
                  "checkpoints are intact\"", h.name, c.path.string(), c.error);
    reply = c.error;
  }
  if (c.for_mailbox) {
    mailbox_checkpoint_running = false;
    reply_mailbox(c.error.empty() ? 0 : 1, reply);
  }
}

// Starts what is due, if the writer is free: a checkpoint asked for by shmps-ctl first, then a
// periodic one.
void Server::Impl::checkpoint_if_due() {
  finish_checkpoint(false);
  if (checkpoint_busy()) return;
  if (mailbox_checkpoint_pending) {
    mailbox_checkpoint_pending = false;
    mailbox_checkpoint_running = true;
    const bool in_dir = mailbox_checkpoint_path.empty();
    start_checkpoint(in_dir ? checkpoint_dir->next_path() : mailbox_checkpoint_path, in_dir, true);
    return;
  }
  if (!checkpoint_dir) return;
  const CheckpointEvery& every = options.checkpoint_every;
  bool due = false;
  const auto now = std::chrono::steady_clock::now();
  if (every.period.count() > 0) {
    if (next_checkpoint_time == std::chrono::steady_clock::time_point{}) next_checkpoint_time = now + every.period;
    due = now >= next_checkpoint_time;
  }
  std::uint64_t clock = 0;
  if (every.clocks > 0) {
    clock = job_clock();
    if (next_checkpoint_clock == 0) next_checkpoint_clock = (clock / every.clocks + 1) * every.clocks;
    due = due || clock >= next_checkpoint_clock;
  }
  if (!due) return;
  if (every.period.count() > 0) next_checkpoint_time = now + every.period;
  if (every.clocks > 0) next_checkpoint_clock = (clock / every.clocks + 1) * every.clocks;
  if (work_done() == checkpointed_work) return;  // nothing changed since the last one
  start_checkpoint(checkpoint_dir->next_path(), true, false);
}

void Server::run() {
  Impl& s = *impl_;
  using clock = std::chrono::steady_clock;
  auto next_liveness = clock::now();
  clock::time_point idle_since{};
  bool idle = false;
  SegmentHeader& h = s.header();
  while (true) {
    store_release(h.server_heartbeat_ns, monotonic_ns());
    s.handle_mailbox();
    const auto now = clock::now();
    if (now >= next_liveness) {
      s.check_liveness();
      next_liveness = now + s.options.liveness_interval;
    }
    const std::uint64_t applied = apply_round();
    s.checkpoint_if_due();
    if (applied) {
      idle = false;
      continue;
    }
    if (s.stop_requested.load(std::memory_order_acquire)) {
      // Drained: everything committed before the stop request has been applied (the last round
      // found nothing). Pushes committed from now on stay in the rings for the next server.
      break;
    }
    // Idle: keep polling for options.idle_poll (a push is often microseconds away), yielding the
    // core at every turn, then sleep on the futex.
    if (!idle) {
      idle = true;
      idle_since = now;
    }
    if (now - idle_since < s.options.idle_poll) {
      std::this_thread::yield();
      continue;
    }
    s.sleep_until_work(std::chrono::microseconds(2000));
    idle = false;
  }
  // Drained: finish the checkpoint being written, answer a waiting shmps-ctl, and write the last
  // checkpoint of this run (unless nothing changed since the previous one).
  s.finish_checkpoint(true);
  if (s.mailbox_checkpoint_pending) {
    s.checkpoint_if_due();
    s.finish_checkpoint(true);
  }
  if (s.checkpoint_dir && s.work_done() != s.checkpointed_work) {
    s.start_checkpoint(s.checkpoint_dir->next_path(), true, false);
    s.finish_checkpoint(true);
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
