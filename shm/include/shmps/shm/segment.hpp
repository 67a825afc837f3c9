// Mapping a segment, and typed access to its parts (layout.hpp says what they are).
//
//   server:  Segment::create (only while holding the server lock), or Segment::open(read_write)
//   worker:  Segment::open(read_write)    — writes only its own slot and ring
//   tools:   Segment::open(read_only)     — a read-only mapping: they cannot write by mistake
//
// No Boost segment manager is used: the header at offset 0 is the root directory of offsets, so
// nobody ever needs a lock to find anything (ARCHITECTURE.md rule 2).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <shmps/shm/layout.hpp>

namespace shmps::shm {

// What the server needs to lay out a segment.
struct LayoutRequest {
  struct Param {
    std::string name;
    std::vector<std::uint64_t> shape;
    bool init_put = false;  // ParamEntry::init_put
    std::uint32_t table_dim = 0;  // ParamEntry::table_dim: a table's row width (shape {rows, dim}), 0 if dense
    DType dtype = DType::f32;     // ParamEntry::dtype: how its values are stored
    // ParamEntry::optimizer: the job's, or a table's own (its state_dtype is the request's).
    OptimizerSettings optimizer{};
    // A table with keys = "u64" (ParamEntry::key_slots_offset): open-ended keys in slots.
    bool keyed = false;
    std::uint32_t admit_after = 1;  // ParamEntry::admit_after
    KeyedInit keyed_init{};         // ParamEntry::keyed_init
  };
  std::vector<Param> params;
  std::uint64_t slice_bytes = 65536;
  std::uint32_t max_workers = 8;
  std::uint32_t workers_per_group = 0;  // 0: every worker in one group (SegmentHeader::workers_per_group)
  std::uint64_t ring_bytes = 0;  // 0: automatic (see kMinRingBytes and plan_layout)
  // The job starts in BSP: an automatic ring then holds one whole step (bsp_step_ring_bytes).
  bool bsp = false;
  // How every parameter's state arrays are stored (bf16: 2 bytes an element). How many each has,
  // and whether a table keeps row words, follow from its optimizer.
  StateDType state_dtype = StateDType::f32;
  std::uint32_t redo_entries = 1;  // the most apply threads any server may use on it
  // Server groups: this segment is the replica of group server_group of server_groups (1: none).
  std::uint32_t server_group = 0;
  std::uint32_t server_groups = 1;
};

// Where everything goes. Computed once by the server and stored in the header; plan_of() gives
// it back from a live segment.
struct LayoutPlan {
  std::uint64_t slice_floats = 0;
  std::uint64_t slice_count = 0;
  std::uint32_t max_workers = 0;
  std::uint32_t workers_per_group = 0, group_count = 0;
  std::uint32_t state_arrays = 0;
  StateDType state_dtype = StateDType::f32;
  std::uint32_t redo_count = 0;
  std::uint64_t ring_bytes = 0;
  std::uint64_t ring_stride = 0;
  std::string ring_rule;  // why ring_bytes is what it is (plan_layout only; empty from plan_of)
  std::uint64_t params_offset = 0, slices_offset = 0, applied_offset = 0, slots_offset = 0;
  std::uint64_t rings_offset = 0, values_offset = 0, state_offset = 0, total_bytes = 0;
  std::uint64_t redo_offset = 0, redo_stride = 0;
  std::uint64_t param_stats_offset = 0, rejected_offset = 0, rejected_stride = 0, groups_offset = 0;
  std::uint64_t step_sums_offset = 0, step_sums_bytes = 0;  // 0: the rings hold a whole BSP step
  std::uint32_t server_group = 0, server_groups = 1;
  // Server groups: SyncSlice[], the home's exactly-once table, and the base and sent arrays (0: none).
  std::uint64_t sync_offset = 0, sync_applied_offset = 0, sync_base_offset = 0, sync_sent_offset = 0, sync_bytes = 0;
  std::uint64_t redo_key_slots_at = 0;  // SegmentHeader::redo_key_slots_at (0: no table with keys = "u64")
  std::vector<ParamEntry> params;  // values/state offsets and slice ranges filled in
};

// The automatic ring size (ring_bytes = 0), per worker:
//   - room for two records of the largest parameter, because one record may use at most half a
//     ring (RingProducer::max_record_floats): a whole-parameter push fits one record, and the
//     worker can write the next push while the server applies the previous one;
//   - but at most kMaxAutoRingBytes: a push bigger than half a ring streams through it in chunks
//     (Worker::push), each applied as it comes, so the rings do not grow with workers x model;
//   - in BSP (LayoutRequest::bsp), room for one whole step: a push of every parameter, the clock
//     record, and one largest record of slack for the padding at the wrap
//     (bsp_step_ring_bytes), because the server takes a step's pushes only once the step has
//     ended. In ASP and SSP pushes are applied as they come, so a ring never needs a whole step;
//   - at least kMinRingBytes.
// For a 1 GiB model of 256 parameters of 4 MiB with 8 workers: 8 MiB per ring (64 MiB in all,
// 6% of the values) in ASP and SSP, and a whole step of 1 GiB per ring in BSP. For one 1 GiB
// parameter with 64 workers: 32 MiB per ring (2 GiB in all) in ASP and SSP.
inline constexpr std::uint64_t kMinRingBytes = std::uint64_t{1} << 20;
// 32 MiB: chunks of up to 16 MiB, big enough that a record's fixed costs (a header, a commit, a
// wake-up, a sort entry on the server) vanish against copying it, small enough that 64 workers'
// rings take 2 GiB.
inline constexpr std::uint64_t kMaxAutoRingBytes = std::uint64_t{32} << 20;
std::uint64_t bsp_step_ring_bytes(std::span<const ParamEntry> params) noexcept;

// Regions of kBigRegionBytes or more (all the rings, the values, the optimizer state; and each
// ring) start on a kHugePageBytes boundary, so that where /dev/shm offers transparent huge pages
// they are made of whole ones; the padding costs less than 2 MiB per region (at most 3%).
inline constexpr std::uint64_t kHugePageBytes = std::uint64_t{2} << 20;
inline constexpr std::uint64_t kBigRegionBytes = std::uint64_t{64} << 20;

// Throws shmps::Error for an impossible request (sizes, names).
LayoutPlan plan_layout(const LayoutRequest& request);

// A byte range of a segment.
struct ByteRange {
  std::uint64_t offset = 0;
  std::uint64_t bytes = 0;
};

enum class Access { read_only, read_write };

class Segment {
 public:
  // Creates /dev/shm/shmps.<name> (mode `mode`), sized, and checks that /dev/shm has room for
  // all of it. Every page outside `deferred` is reserved here, by the calling thread (see
  // reserve()), so that a full /dev/shm is an error here and never a SIGBUS later. The pages of
  // `deferred` are left for their first user to reserve, so that the thread that uses them
  // allocates them (first touch: on its own NUMA node, in its own memory cgroup): whoever touches
  // a deferred page must reserve() it first. Writes nothing inside: the caller fills the header
  // and sets state "ready" last. Throws shmps::Error if it exists or does not fit.
  static Segment create(std::string_view name, std::uint64_t total_bytes, unsigned mode = 0600,
                        std::span<const ByteRange> deferred = {});
  // A segment of `total_bytes` zeros in anonymous memory, with no name and no /dev/shm object:
  // for the server's components used on their own (the unit tests of the apply engine and the
  // collectors lay a model out in one, with no server process). Shared with children forked
  // after it, invisible to every other process.
  static Segment anonymous(std::uint64_t total_bytes);
  // Maps an existing segment and validates magic, layout version, fingerprint and size. Throws
  // shmps::Error saying what is wrong. A segment still in "creating" is returned unvalidated:
  // wait for header().state to leave "creating", then call validate().
  static Segment open(std::string_view name, Access access);
  // Read-write mappings (create, and open with read_write) are madvised MADV_HUGEPAGE, so that
  // where /dev/shm offers transparent huge pages (pages.hpp) the segment gets them; nothing
  // fails where it does not.

  // Allocates the pages of [offset, offset + bytes) that are not yet allocated, by the calling
  // thread, and maps them all into this process for writing (MADV_POPULATE_WRITE), so that the
  // first writes pay no page faults. On a kernel without MADV_POPULATE_WRITE (before 5.14) it
  // reserves them with posix_fallocate instead. Throws shmps::Error, naming `what`, if /dev/shm
  // has no room for them. Read-write mappings only.
  void reserve(std::uint64_t offset, std::uint64_t bytes, std::string_view what);
  // Maps the pages of [offset, offset + bytes) into this process for reading
  // (MADV_POPULATE_READ), so that the first reads pay no page faults. Best effort: does nothing
  // where the kernel cannot.
  void prefault_read(std::uint64_t offset, std::uint64_t bytes) const noexcept;
  // The checks open() makes, for a segment that open() returned while it was still "creating".
  void validate() const;
  static bool exists(std::string_view name);
  // Throws shmps::Error, saying what to do, if /dev/shm has no room for `total_bytes`.
  static void check_room(std::string_view name, std::uint64_t total_bytes);
  // Removes the segment, its lock files and, for a server group's replica, its sync segment
  // (whoever still maps them keeps the mapping).
  static void remove(std::string_view name);

  Segment();
  ~Segment();
  Segment(Segment&&) noexcept;
  Segment& operator=(Segment&&) noexcept;

  const std::string& name() const noexcept { return name_; }
  bool writable() const noexcept { return writable_; }
  std::byte* base() noexcept { return base_; }
  const std::byte* base() const noexcept { return base_; }
  std::uint64_t size() const noexcept { return size_; }

  SegmentHeader& header() noexcept { return *at<SegmentHeader>(base_, 0); }
  const SegmentHeader& header() const noexcept { return *at<SegmentHeader>(base_, 0); }
  ParamEntry& param(std::uint64_t i) noexcept { return at<ParamEntry>(base_, header().params_offset)[i]; }
  const ParamEntry& param(std::uint64_t i) const noexcept { return at<ParamEntry>(base_, header().params_offset)[i]; }
  SliceEntry& slice(std::uint64_t i) noexcept { return at<SliceEntry>(base_, header().slices_offset)[i]; }
  const SliceEntry& slice(std::uint64_t i) const noexcept { return at<SliceEntry>(base_, header().slices_offset)[i]; }
  WorkerSlot& slot(std::uint64_t r) noexcept { return at<WorkerSlot>(base_, header().slots_offset)[r]; }
  const WorkerSlot& slot(std::uint64_t r) const noexcept { return at<WorkerSlot>(base_, header().slots_offset)[r]; }
  RingHeader& ring(std::uint64_t r) noexcept { return *at<RingHeader>(base_, header().rings_offset + r * header().ring_stride); }
  const RingHeader& ring(std::uint64_t r) const noexcept { return *at<RingHeader>(base_, header().rings_offset + r * header().ring_stride); }
  std::byte* ring_data(std::uint64_t r) noexcept { return reinterpret_cast<std::byte*>(&ring(r) + 1); }
  const std::byte* ring_data(std::uint64_t r) const noexcept { return reinterpret_cast<const std::byte*>(&ring(r) + 1); }
  // The values of a float32 parameter (p.dtype == DType::f32). A bf16 or fp16 parameter's values
  // are 2-byte elements: values16().
  float* values(const ParamEntry& p) noexcept { return at<float>(base_, p.values_offset); }
  const float* values(const ParamEntry& p) const noexcept { return at<float>(base_, p.values_offset); }
  std::uint16_t* values16(const ParamEntry& p) noexcept { return at<std::uint16_t>(base_, p.values_offset); }
  const std::uint16_t* values16(const ParamEntry& p) const noexcept { return at<std::uint16_t>(base_, p.values_offset); }
  // Optimizer state array `array` of p: header().optimizer.state_dtype elements (float32 or bf16),
  // state_elem_bytes() each.
  std::byte* state_bytes(const ParamEntry& p, int array) noexcept { return at<std::byte>(base_, p.state_offset[array]); }
  const std::byte* state_bytes(const ParamEntry& p, int array) const noexcept {
    return at<std::byte>(base_, p.state_offset[array]);
  }
  std::uint64_t state_elem_bytes() const noexcept { return state_dtype_bytes(header().optimizer.state_dtype); }
  // Streamed BSP steps: the sums of the step's pushes, laid out as float32 values (at
  // ParamEntry::f32_offset), whatever the values' or the state's dtype: they are gradients.
  bool streams_bsp_steps() const noexcept { return header().step_sums_offset != 0; }
  float* step_sums(const ParamEntry& p) noexcept { return at<float>(base_, header().step_sums_offset + p.f32_offset); }
  // The exactly-once redo table: last push sequence number of slot r applied to slice s.
  std::uint64_t& last_applied(std::uint64_t s, std::uint64_t r) noexcept {
    return at<std::uint64_t>(base_, header().applied_offset)[s * header().max_workers + r];
  }

  ParamStats& param_stats(std::uint64_t i) noexcept { return at<ParamStats>(base_, header().param_stats_offset)[i]; }
  const ParamStats& param_stats(std::uint64_t i) const noexcept { return at<ParamStats>(base_, header().param_stats_offset)[i]; }
  // NaN/Inf gradients worker r had refused for parameter p (worker r writes its own row).
  std::atomic<std::uint64_t>& rejected(std::uint64_t r, std::uint64_t p) noexcept {
    return at<std::atomic<std::uint64_t>>(base_, header().rejected_offset + r * header().rejected_stride)[p];
  }
  const std::atomic<std::uint64_t>& rejected(std::uint64_t r, std::uint64_t p) const noexcept {
    return at<std::atomic<std::uint64_t>>(base_, header().rejected_offset + r * header().rejected_stride)[p];
  }

  // Worker groups: rank r is in group r / workers_per_group; group g has ranks [first, end).
  GroupEntry& group(std::uint64_t g) noexcept { return at<GroupEntry>(base_, header().groups_offset)[g]; }
  const GroupEntry& group(std::uint64_t g) const noexcept { return at<GroupEntry>(base_, header().groups_offset)[g]; }
  std::uint32_t group_of(std::uint64_t rank) const noexcept {
    return static_cast<std::uint32_t>(rank / header().workers_per_group);
  }
  std::uint32_t group_first_rank(std::uint64_t g) const noexcept {
    return static_cast<std::uint32_t>(g * header().workers_per_group);
  }
  std::uint32_t group_end_rank(std::uint64_t g) const noexcept {
    const std::uint64_t end = (g + 1) * header().workers_per_group;
    return static_cast<std::uint32_t>(end < header().max_workers ? end : header().max_workers);
  }

  // Server groups (SegmentHeader::server_groups > 1; SyncSlice in layout.hpp).
  bool has_server_groups() const noexcept { return header().server_groups > 1; }
  SyncSlice& sync_slice(std::uint64_t s) noexcept { return at<SyncSlice>(base_, header().sync_offset)[s]; }
  const SyncSlice& sync_slice(std::uint64_t s) const noexcept { return at<SyncSlice>(base_, header().sync_offset)[s]; }
  // The home group's exactly-once table: the last delta sequence number of group g added to slice s.
  std::uint64_t& sync_applied(std::uint64_t s, std::uint64_t g) noexcept {
    return at<std::uint64_t>(base_, header().sync_applied_offset)[s * header().server_groups + g];
  }
  std::uint64_t sync_applied(std::uint64_t s, std::uint64_t g) const noexcept {
    return at<std::uint64_t>(base_, header().sync_applied_offset)[s * header().server_groups + g];
  }
  // A slice's values at its last sync, and its delta in flight, laid out as float32 values (f32_offset).
  float* sync_base(const ParamEntry& p) noexcept {
    return at<float>(base_, header().sync_base_offset + p.f32_offset);
  }
  const float* sync_base(const ParamEntry& p) const noexcept {
    return at<float>(base_, header().sync_base_offset + p.f32_offset);
  }
  float* sync_sent(const ParamEntry& p) noexcept {
    return at<float>(base_, header().sync_sent_offset + p.f32_offset);
  }
  const float* sync_sent(const ParamEntry& p) const noexcept {
    return at<float>(base_, header().sync_sent_offset + p.f32_offset);
  }
  RedoEntry& redo(std::uint64_t i) noexcept { return *at<RedoEntry>(base_, header().redo_offset + i * header().redo_stride); }
  std::uint64_t* redo_last_applied(RedoEntry& e) noexcept { return reinterpret_cast<std::uint64_t*>(&e + 1); }
  RedoInput* redo_inputs(RedoEntry& e) noexcept {
    return reinterpret_cast<RedoInput*>(redo_last_applied(e) + align_up(header().max_workers, 8));
  }
  float* redo_values(RedoEntry& e) noexcept {
    return reinterpret_cast<float*>(reinterpret_cast<std::byte*>(redo_inputs(e)) +
                                    redo_inputs_bytes(header().max_workers));
  }
  // The entry's state arrays, in the segment's state dtype (state_elem_bytes() per element).
  std::byte* redo_state(RedoEntry& e, int array) noexcept {
    return reinterpret_cast<std::byte*>(redo_values(e) + header().slice_floats) +
           static_cast<std::uint64_t>(array) * header().slice_floats * state_elem_bytes();
  }
  // A table slice's new row words (a table whose optimizer keeps them; layout.hpp, RedoEntry).
  std::uint64_t* redo_row_words(RedoEntry& e) noexcept {
    std::byte* after = redo_state(e, static_cast<int>(header().state_arrays));
    if (header().server_groups > 1) after += header().slice_floats * sizeof(float);  // a sync_take's fresh values
    return reinterpret_cast<std::uint64_t*>(after);
  }
  // Table p's row words (p.row_words_offset != 0), one per row: lazy Adam's step counts, or
  // row-wise AdaGrad's accumulators as the bits of doubles.
  std::uint64_t* row_words(const ParamEntry& p) noexcept { return at<std::uint64_t>(base_, p.row_words_offset); }
  const std::uint64_t* row_words(const ParamEntry& p) const noexcept {
    return at<std::uint64_t>(base_, p.row_words_offset);
  }

  // A keyed table's slots (ParamEntry::key_slots_offset != 0): which key each row holds.
  KeySlot* key_slots(const ParamEntry& p) noexcept { return at<KeySlot>(base_, p.key_slots_offset); }
  const KeySlot* key_slots(const ParamEntry& p) const noexcept { return at<KeySlot>(base_, p.key_slots_offset); }
  // Its key index: the header (the seqlock word), then p.key_buckets buckets.
  KeyIndexHeader& key_index(const ParamEntry& p) noexcept { return *at<KeyIndexHeader>(base_, p.key_index_offset); }
  const KeyIndexHeader& key_index(const ParamEntry& p) const noexcept {
    return *at<KeyIndexHeader>(base_, p.key_index_offset);
  }
  KeyBucket* key_buckets(const ParamEntry& p) noexcept {
    return at<KeyBucket>(base_, p.key_index_offset + sizeof(KeyIndexHeader));
  }
  const KeyBucket* key_buckets(const ParamEntry& p) const noexcept {
    return at<KeyBucket>(base_, p.key_index_offset + sizeof(KeyIndexHeader));
  }
  // A keyed table slice's new KeySlots in a redo entry (layout.hpp, RedoEntry).
  KeySlot* redo_key_slots(RedoEntry& e) noexcept {
    return reinterpret_cast<KeySlot*>(reinterpret_cast<std::byte*>(&e) + header().redo_key_slots_at);
  }

  // A sync_take entry's fresh values (the slice's new sync_base), after the state arrays.
  float* redo_sync_base(RedoEntry& e) noexcept {
    return reinterpret_cast<float*>(redo_state(e, static_cast<int>(header().state_arrays)));
  }
  // Index of the parameter called `name`, or -1.
  std::int64_t find_param(std::string_view name) const noexcept;

  // Where slot r's ring lies: its RingHeader and records (not the padding after them, up to the
  // next ring, which nobody touches).
  ByteRange ring_range(std::uint64_t r) const noexcept {
    return {header().rings_offset + r * header().ring_stride, sizeof(RingHeader) + header().ring_bytes};
  }

 private:
  std::string name_;
  std::shared_ptr<void> mapping_;  // owns the Boost mapped_region
  std::byte* base_ = nullptr;
  std::uint64_t size_ = 0;
  bool writable_ = false;
};

// The plan of a live segment, from its header and parameter table (ring_rule left empty).
LayoutPlan plan_of(const Segment& segment);

std::string_view param_name(const ParamEntry& p) noexcept;
std::string shape_string(const ParamEntry& p);  // "[256, 784]"

}  // namespace shmps::shm
