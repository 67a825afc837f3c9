#include "bootstrap.hpp"

#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <thread>

#include <shmps/error.hpp>
#include <shmps/server/initialise.hpp>
#include <shmps/server/optimizer.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/dtype.hpp>
#include <shmps/shm/memory.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/pages.hpp>
#include <shmps/shm/proc.hpp>

#include "consistency.hpp"
#include "parallel.hpp"
#include "recovery.hpp"

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
    if (p.init_put) mix(0x9074ULL);  // pulls wait for a put: part of the layout; others keep their hash
    if (p.table_dim != 0) mix(0x7ab1e0000ULL + p.table_dim);  // a table: reached by row
    if (p.dtype != DType::f32) mix(0xd7e00000ULL + static_cast<std::uint64_t>(p.dtype));  // f32 keeps its hash
    if (p.keyed) mix(0x6e7500000ULL + p.admit_after);  // keys in slots: KeySlots and an index
  }
  mix(plan.slice_floats);
  mix(request.max_workers);
  // Groups change the layout (the group table); one group adds nothing, so older jobs keep their hash.
  if (plan.group_count > 1) mix(0x67700000ULL + plan.workers_per_group);
  mix(plan.state_arrays);
  // Server groups add the sync tables; none adds nothing.
  if (plan.server_groups > 1) mix(0x5e7960000ULL + plan.server_groups);
  // The state dtype changes the layout; f32 adds nothing, so f32 segments keep their hash.
  if (request.state_dtype != StateDType::f32) mix(0x5d7e0000ULL + static_cast<std::uint64_t>(request.state_dtype));
  // Each parameter's optimizer kind (the job's, or a table's own): it fixes the parameter's state
  // arrays and a table's row words.
  for (const auto& p : plan.params) mix(0x0b7000000ULL + static_cast<std::uint64_t>(p.optimizer.kind));
  return h;
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
    // elem0, elem1: bytes per element where the block starts and ends (the values' dtype may differ).
    auto reserve = [&](std::uint64_t offset0, std::uint64_t offset1, std::uint64_t elem0, std::uint64_t elem1,
                       const char* what) {
      const std::uint64_t begin = offset0 + s0.first * elem0;
      const std::uint64_t end = offset1 + (s1.first + s1.count) * elem1;
      segment.reserve(begin, end - begin, what);
    };
    try {
      reserve(p0.values_offset, p1.values_offset, dtype_bytes(p0.dtype), dtype_bytes(p1.dtype), "its values");
      // State array a of the block's parameters that keep it (laid out one after the other): from
      // the first one's part in the block to the last one's.
      const std::uint64_t state_elem = segment.state_elem_bytes();
      for (int a = 0; a < static_cast<int>(h.state_arrays); ++a) {
        std::uint64_t begin = 0, end = 0;
        for (std::uint64_t i = s0.param; i <= s1.param; ++i) {
          const ParamEntry& p = segment.param(i);
          if (a >= state_arrays_of(p)) continue;
          if (begin == 0) begin = p.state_offset[a] + (i == s0.param ? s0.first : 0) * state_elem;
          end = p.state_offset[a] + (i == s1.param ? s1.first + s1.count : p.size) * state_elem;
        }
        if (begin != 0) segment.reserve(begin, end - begin, "optimizer state");
      }
      if (h.step_sums_offset != 0)  // float32 gradient sums, at the parameters' f32_offset
        reserve(h.step_sums_offset + p0.f32_offset, h.step_sums_offset + p1.f32_offset, sizeof(float), sizeof(float),
                "BSP step sums");
    } catch (const Error& e) {
      const std::lock_guard lock(mutex);
      if (error.empty()) error = e.what();
    }
  });
  if (!error.empty()) throw Error(error);
  // The tables' row words (8 bytes a row) and a keyed table's KeySlots and key index: small,
  // reserved whole, one table at a time.
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const ParamEntry& p = segment.param(i);
    if (p.row_words_offset != 0) segment.reserve(p.row_words_offset, p.shape[0] * sizeof(std::uint64_t), "table row words");
    if (is_keyed(p)) {
      segment.reserve(p.key_slots_offset, p.shape[0] * sizeof(KeySlot), "table key slots");
      segment.reserve(p.key_index_offset, sizeof(KeyIndexHeader) + p.key_buckets * sizeof(KeyBucket), "table key index");
    }
  }
}

[[noreturn]] void refuse_restore_over_segment(const ServerOptions& options) {
  const std::string& name = options.spec.name;
  throw Error("segment '" + name + "' exists, and its state is newer than any checkpoint: --restore would "
              "replace it. To go back to " + options.restore.string() + ", stop its server and remove the segment "
              "(shmps-ctl destroy " + name + "), then restore; or drop --restore to continue the segment");
}

// What the segment is made from when it is made from a checkpoint.
struct RestoreSource {
  std::optional<Snapshot> snapshot;
  std::filesystem::path path;
};

// --restore FILE, or else (with --checkpoint-dir and no segment) the directory's newest valid
// checkpoint. Read and checked whole before anything is touched: a damaged or foreign file
// changes nothing. Opens the checkpoint directory into `dir`.
RestoreSource find_restore(const ServerOptions& options, const LayoutPlan& plan, std::optional<CheckpointDir>& dir) {
  const ModelSpec& spec = options.spec;
  RestoreSource source;
  if (!options.restore.empty()) {
    source.path = options.restore;
    source.snapshot = read_checkpoint(source.path);
    check_restorable(*source.snapshot, source.path, spec, plan);
    if (Segment::exists(spec.name)) refuse_restore_over_segment(options);
  }
  if (options.checkpoint_dir.empty()) return source;
  std::error_code ec;
  std::filesystem::create_directories(options.checkpoint_dir, ec);
  if (!std::filesystem::is_directory(options.checkpoint_dir))
    throw Error("--checkpoint-dir " + options.checkpoint_dir.string() + ": not a directory and cannot be created" +
                (ec ? ": " + ec.message() : ""));
  dir.emplace(options.checkpoint_dir, spec.name);
  if (source.snapshot || Segment::exists(spec.name)) return source;
  std::vector<std::string> skipped;
  auto found = dir->newest_valid(skipped);
  // Said also when nothing was usable: a directory of unreadable or foreign checkpoints must not
  // look like an empty one while the job starts afresh.
  for (const auto& why : skipped) spdlog::warn("event=checkpoint_skipped segment={} reason=\"{}\"", spec.name, why);
  if (!found && !skipped.empty())
    spdlog::warn("event=checkpoint_none_usable segment={} dir={} skipped={} action=\"starting from the spec's initial "
                 "values\"", spec.name, options.checkpoint_dir.string(), skipped.size());
  if (found) {
    check_restorable(found->snapshot, found->path, spec, plan);
    source.path = found->path;
    source.snapshot = std::move(found->snapshot);
  }
  return source;
}

// A server continues only a segment of its own user: one of another user at the job's path was
// not made by this job's servers (even --group shares a segment with the group's workers and
// tools, not its serving), and taking it would let that user feed this server a forged header.
void refuse_foreign_segment(const std::string& name) {
  struct stat st {};
  const std::string path = segment_path(name);
  if (::lstat(path.c_str(), &st) != 0 || S_ISLNK(st.st_mode)) return;  // Segment::open says why for a link
  if (st.st_uid != ::geteuid())
    throw Error("segment '" + name + "' (" + path + ") belongs to another user (uid " + std::to_string(st.st_uid) +
                ", not " + std::to_string(::geteuid()) + "): a server continues only its own user's segments; refusing "
                "it (run the server as that user, or have that user remove it)");
}

LockFile take_server_lock(const ServerOptions& options) {
  const std::string& name = options.spec.name;
  LockFile lock = LockFile::open(server_lock_path(name), true, options.mode);
  if (lock.try_lock(0)) return lock;
  std::string who;
  if (Segment::exists(name)) {
    try {
      auto existing = Segment::open(name, Access::read_only);
      who = " (pid " + std::to_string(load_acquire(existing.header().server_pid)) + ")";
    } catch (const Error&) {
    }
  }
  throw Error("segment '" + name + "' is already served by a live server" + who +
              ": stop that server first, or give this job another name (--name)");
}

// The identity and geometry of a new segment, from its plan.
void write_geometry(SegmentHeader& h, const ModelSpec& spec, const LayoutRequest& request, const LayoutPlan& plan,
                    std::uint64_t hash) {
  h.layout_version = kLayoutVersion;
  h.header_bytes = sizeof(SegmentHeader);
  h.fingerprint = kLayoutFingerprint;
  h.total_bytes = plan.total_bytes;
  h.spec_hash = hash;
  h.created_unix_ns = unix_ns();
  std::memcpy(h.name, spec.name.data(), std::min(spec.name.size(), kMaxNameBytes - 1));
  h.param_count = static_cast<std::uint32_t>(plan.params.size());
  h.max_workers = request.max_workers;
  h.workers_per_group = plan.workers_per_group;
  h.group_count = plan.group_count;
  h.groups_offset = plan.groups_offset;
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
  h.step_sums_offset = plan.step_sums_offset;
  h.step_sums_bytes = plan.step_sums_bytes;
  h.server_group = plan.server_group;
  h.server_groups = plan.server_groups;
  h.sync_offset = plan.sync_offset;
  h.sync_applied_offset = plan.sync_applied_offset;
  h.sync_base_offset = plan.sync_base_offset;
  h.sync_sent_offset = plan.sync_sent_offset;
  h.redo_key_slots_at = plan.redo_key_slots_at;
  h.redo_count = request.redo_entries;
  h.optimizer = spec.optimizer;
  h.state_arrays = plan.state_arrays;
  store_release(h.consistency, static_cast<std::uint32_t>(spec.consistency));
  store_release(h.staleness, spec.staleness);
  store_release(h.bsp_aggregate, static_cast<std::uint32_t>(spec.bsp_aggregate));
  store_release(h.on_worker_death, static_cast<std::uint32_t>(spec.on_worker_death));
}

// Server groups: every slice's home group (round-robin over the slices, SINGA's slice2group
// spreading them evenly), and its sync base: the values every replica starts from (the spec's
// initialisers are deterministic, and a restore gives each group the same file).
void lay_out_sync_tables(Segment& segment) {
  const SegmentHeader& h = segment.header();
  for (std::uint64_t s = 0; s < h.slice_count; ++s) segment.sync_slice(s).home = static_cast<std::uint32_t>(s % h.server_groups);
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const ParamEntry& p = segment.param(i);
    std::memcpy(segment.sync_base(p), segment.values(p), p.size * sizeof(float));
  }
}

// The parameter and slice tables.
void write_tables(Segment& segment, const LayoutPlan& plan) {
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
}

// A new segment, from the spec's initialisers (or pretrained values) or from a checkpoint.
Segment create_segment(const ServerOptions& options, const LayoutRequest& request, const LayoutPlan& plan,
                       std::uint64_t hash, const Snapshot* restore, const PretrainedValues& pretrained,
                       tbb::task_arena& arena) {
  const ModelSpec& spec = options.spec;
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
  Segment segment = Segment::create(spec.name, plan.total_bytes, options.mode, deferred);
  // The file is all zeros: state reads "creating" until the very end.
  SegmentHeader& h = segment.header();
  lay_out_segment(segment, spec, request, plan, hash);
  prefault_model(segment, arena);  // before anything writes a value: first touch by the apply threads
  for (std::size_t i = 0; i < plan.params.size() && !restore; ++i) {
    const ParamEntry& p = segment.param(i);
    if (p.dtype == DType::f32) {
      initialise(spec.params[i], std::span<float>(segment.values(p), p.size), pretrained);
      continue;
    }
    // A bf16 or fp16 parameter: the initial values computed in float32, rounded to nearest even.
    std::vector<float> values(p.size);
    initialise(spec.params[i], std::span<float>(values), pretrained);
    narrow(p.dtype, values.data(), segment.values16(p), p.size);
  }
  if (restore) {
    restore_into(segment, *restore);
    if (options.override_policy) apply_spec_policy(segment, spec);
  }
  if (segment.has_server_groups()) {
    lay_out_sync_tables(segment);
    if (restore && options.restore_sync_tables) restore_sync_tables(segment, *restore);
  }
  h.magic = kMagic;  // identity complete; "ready" is stored by announce_ready() after the epoch
  return segment;
}

void log_memory(Segment& segment, const ModelSpec& spec, const LayoutPlan& plan, bool recovered) {
  const HugePageSupport huge = huge_page_support();
  SegmentHeader& h = segment.header();
  const std::uint64_t huge_bytes = huge_mapped_bytes(segment.base());
  store_release(h.huge_mount, static_cast<std::uint32_t>(huge.mount));
  store_release(h.huge_sysfs, static_cast<std::uint32_t>(huge.sysfs));
  store_release(h.huge_bytes, huge_bytes);
  const MemoryBreakdown m = memory_breakdown(plan_of(segment));
  spdlog::info("event=memory segment={} total_bytes={} values_bytes={} state_bytes={} rings_bytes={} "
               "ring_each={} overhead_bytes={} overhead_pct={:.1f} huge_pages=\"{}\"",
               spec.name, m.total_bytes, m.values_bytes, m.state_bytes, m.bytes_of("rings"), m.ring_each_bytes,
               m.overhead_bytes(), m.overhead_percent(), huge_page_text(huge, huge_bytes, m.total_bytes));
  if (!recovered)
    spdlog::info("event=ring_size segment={} ring_bytes={} rule=\"{}\"", spec.name, plan.ring_bytes, plan.ring_rule);
}

}  // namespace

void lay_out_segment(Segment& segment, const ModelSpec& spec, const LayoutRequest& request, const LayoutPlan& plan,
                     std::uint64_t spec_hash) {
  write_geometry(segment.header(), spec, request, plan, spec_hash);
  write_tables(segment, plan);
  for (std::uint32_t r = 0; r < request.max_workers; ++r) segment.ring(r).capacity = plan.ring_bytes;
}

LayoutRequest layout_request(const ServerOptions& options) {
  const ModelSpec& spec = options.spec;
  LayoutRequest request;
  for (const auto& p : spec.params) {
    request.params.push_back(
        {p.name, p.shape, p.init.kind == InitSpec::Kind::put, static_cast<std::uint32_t>(p.table_dim), p.dtype,
         p.optimizer.value_or(spec.optimizer)});
    if (p.keyed) {
      LayoutRequest::Param& keyed = request.params.back();
      keyed.keyed = true;
      keyed.admit_after = p.admit_after;
      keyed.keyed_init.kind = p.init.kind == InitSpec::Kind::constant ? 1U : p.init.kind == InitSpec::Kind::u24 ? 2U : 0U;
      keyed.keyed_init.value = p.init.value;
      keyed.keyed_init.stream = p.init.stream;
      keyed.keyed_init.scale = p.init.scale;
    }
  }
  request.slice_bytes = spec.slice_bytes;
  request.max_workers = spec.max_workers;
  request.workers_per_group = spec.workers_per_group;
  request.ring_bytes = spec.ring_bytes;
  request.bsp = spec.consistency == Consistency::bsp;
  request.state_dtype = spec.optimizer.state_dtype;
  request.server_group = options.server_group;
  request.server_groups = options.server_groups;
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

Bootstrapped bootstrap(const ServerOptions& options) {
  const ModelSpec& spec = options.spec;
  check_segment_name(spec.name);
  if (auto problem = validate_optimizer_settings(spec.optimizer); !problem.empty())
    throw Error(spec.source + ": optimizer: " + problem);
  Bootstrapped b;

  // 1. Lay out the model; check for room before anything is created (a lock file included).
  const LayoutRequest request = layout_request(options);
  const LayoutPlan plan = plan_layout(request);
  const std::uint64_t hash = layout_hash(request, plan);
  // The apply threads (each needs its own redo entry): they also pre-fault the model.
  b.threads = options.threads ? options.threads : spec.server_threads;
  if (b.threads == 0) b.threads = std::max(1U, std::thread::hardware_concurrency());
  b.threads = std::min(b.threads, request.redo_entries);
  b.arena = std::make_unique<tbb::task_arena>(static_cast<int>(b.threads));
  RestoreSource restore = find_restore(options, plan, b.checkpoint_dir);
  // Pretrained initial values are read and checked (names, shapes, dtypes) before anything is
  // created, too.
  std::optional<PretrainedValues> pretrained;
  if (!restore.snapshot && !Segment::exists(spec.name)) pretrained = load_pretrained(spec);
  if (!Segment::exists(spec.name)) Segment::check_room(spec.name, plan.total_bytes);

  // 2. The server lock: exactly one server per segment, for its whole life.
  b.server_lock = take_server_lock(options);

  // 3. Create (from the spec, or from a checkpoint), or recover what is there.
  if (b.checkpoint_dir) {
    if (const std::size_t n = b.checkpoint_dir->remove_temporaries())
      spdlog::warn("event=checkpoint_temporaries_removed segment={} count={} note=\"left by a server killed while "
                   "writing a checkpoint; the checkpoints before them are intact\"", spec.name, n);
  }
  if (Segment::exists(spec.name) && restore.snapshot && !options.restore.empty()) refuse_restore_over_segment(options);
  auto create = [&] {
    if (!restore.snapshot && !pretrained) pretrained = load_pretrained(spec);  // a half-created segment being recreated
    b.segment = create_segment(options, request, plan, hash, restore.snapshot ? &*restore.snapshot : nullptr,
                               pretrained ? *pretrained : PretrainedValues{}, *b.arena);
    b.restored = restore.snapshot.has_value();
  };
  if (!Segment::exists(spec.name)) {
    create();
  } else {
    refuse_foreign_segment(spec.name);
    Segment existing = Segment::open(spec.name, Access::read_write);
    if (load_acquire(existing.header().state) == static_cast<std::uint32_t>(SegmentState::creating)) {
      // We hold the server lock, so nobody is creating it now: its creator died midway.
      spdlog::warn("event=recreate segment={} reason=\"left half-created by a server that died during creation\"",
                   spec.name);
      existing = Segment();
      std::filesystem::remove(segment_path(spec.name));  // the segment only: we hold its lock files
      create();
    } else {
      b.segment = std::move(existing);
      recover_segment(b.segment, options, hash);
      b.recovered = true;
    }
  }
  if (b.restored)
    spdlog::info("event=restored segment={} file={} model_clock={} epoch={} slots={} note=\"restarted workers resume "
                 "from their committed state\"", spec.name, restore.path.string(), restore.snapshot->model_clock,
                 restore.snapshot->epoch, restore.snapshot->slots.size());

  // 4. A segment made for fewer apply threads than asked limits them; values and optimizer state
  // are mapped by the apply threads, so that the first rounds pay no page faults.
  if (b.threads > b.segment.header().redo_count) {
    b.threads = b.segment.header().redo_count;
    b.arena = std::make_unique<tbb::task_arena>(static_cast<int>(b.threads));
  }
  if (b.recovered) prefault_model(b.segment, *b.arena);  // a new segment's were, in create_segment
  log_memory(b.segment, spec, plan, b.recovered);
  return b;
}

void announce_ready(Segment& segment) {
  SegmentHeader& h = segment.header();
  store_release(h.server_pid, static_cast<std::int32_t>(::getpid()));
  store_release(h.server_start_time, process_start_time(::getpid()));
  store_release(h.server_started_unix_ns, unix_ns());
  store_release(h.server_heartbeat_ns, monotonic_ns());
  store_release(h.server_epoch, load_own(h.server_epoch) + 1);
  store_release(h.state, static_cast<std::uint32_t>(SegmentState::ready));
}

}  // namespace shmps::server
