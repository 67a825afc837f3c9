// The shmps segment: every shared-memory type, where it sits, and who may write each field.
//
// This is the one header that describes the shared layout. Any change to a type here changes
// kLayoutFingerprint, and a process whose fingerprint differs refuses to map the segment.
//
// Each shared type is followed by its field list (SHMPS_<TYPE>_FIELDS): every field and every
// padding gap, in order. The fingerprint is computed from these lists (name, offset, size and
// kind of every field), and a static_assert proves each list tiles its struct byte for byte, so
// a field added to a struct but not to its list does not compile. Adding a field: add it to the
// list too, and shrink the PAD after it by its size (the static_assert says where it is off).
//
// One segment per training job, created by the server only, at /dev/shm/shmps.<name>:
//
//   offset 0        +--------------------------------------------+
//                   | SegmentHeader   identity, geometry, state,  |  server writes;
//                   |                 server liveness, counters   |  everyone reads
//   params_offset   +--------------------------------------------+
//                   | ParamEntry[param_count]                     |  written once at creation
//   slices_offset   +--------------------------------------------+
//                   | SliceEntry[slice_count]   seqlock version,  |  server writes
//                   |                           clock, step       |
//   applied_offset  +--------------------------------------------+
//                   | u64 last_applied_seq[slice_count][max_workers] | server only: the
//                   |   exactly-once redo table (a record already applied to a slice is skipped) |
//   redo_offset     +--------------------------------------------+
//                   | RedoEntry[redo_count]: one per server apply thread: a slice's new | server only:
//                   |   values, optimizer state and redo-table row, copied in under the | a server killed
//                   |   seqlock; replayed by the next server if still marked valid      | mid-apply is redone
//   param_stats_offset +-----------------------------------------+
//                   | ParamStats[param_count]   updates, norms    |  server writes (monitor)
//   rejected_offset +--------------------------------------------+
//                   | u64 rejected[max_workers][param_count]      |  each worker its own row
//                   |   (NaN/Inf gradients refused), rows padded to 64 bytes |  (monitor)
//   groups_offset   +--------------------------------------------+
//                   | GroupEntry[group_count]   a worker group's   |  server writes
//                   |                           step clock, counts |
//   slots_offset    +--------------------------------------------+
//                   | WorkerSlot[max_workers]   worker-owned lines | each worker its own slot;
//                   |                           + server-owned line| the server its own line
//   rings_offset    +--------------------------------------------+
//                   | per slot: RingHeader + ring_bytes of records | worker writes records and
//                   |   (PushRecord header + float payload)       | tail; server writes head.
//                   |   A worker allocates its ring's pages itself, when it attaches (first touch)
//   values_offset   +--------------------------------------------+
//                   | parameter values, 64-byte aligned per parameter, each in |  server writes
//                   |   its ParamEntry::dtype: float32, or bf16 / fp16 (2 bytes) |
//   state_offset    +--------------------------------------------+
//                   | optimizer state arrays, float32 or bf16     |  server only
//                   |   (optimizer.state_dtype), 64-byte aligned  |
//   sync_offset     +--------------------------------------------+  only in a replica of a job
//                   | SyncSlice[slice_count]  home group, seqs    |  with server groups
//                   | u64 sync_applied[slice_count][server_groups]|  (server_groups > 1):
//                   |   home: last delta sequence added per origin|  server only
//                   | float sync_base[values], sync_sent[values]  |
//                   |   non-home slices: values at the last sync, |
//                   |   and the delta in flight to the home group |
//                   |   (float32 for every parameter: at ParamEntry::f32_offset) |
//                   +--------------------------------------------+  total_bytes
//
// Server groups (SINGA's): one replica segment per group (<job>.g0, <job>.g1, ...), and one sync
// segment per group (SyncSegmentHeader, below: <job>.g<k>.sync, written by servers only) that
// carries its sync records to the other groups' servers.
//
// Rules (ARCHITECTURE.md): workers take no lock; a worker writes only its own slot's worker lines
// and its own ring's records and tail; tools map the segment read-only. Everything here is
// fixed-size, standard-layout, fixed-width; addresses are offsets from the segment base.
// Lines that different processes write concurrently are padded to 64 bytes apart.
//
// Regions of 64 MiB or more (all the rings, each ring, the values, the optimizer state) start on
// a 2 MiB boundary, so that where /dev/shm offers transparent huge pages they are backed by whole
// ones (plan_layout; the padding is under 2 MiB per region, at most 3% of it). What each part
// costs: memory.hpp (shmps-server --plan, shmps-ctl inspect).
//
// ---- False sharing: who writes which hot word (audit) -----------------------------------
// A cache line written by one process and read or written by another moves between their
// cores on every write. Words written often are grouped by writer and by rate, and a group
// that another process reads on a hot path has its own line (static_asserts at the end):
//
//   SegmentHeader  identity and geometry: written once before "ready", read by all: shared freely.
//                  policy line: the server writes the mode at a live switch; workers read
//                    consistency on every push and pull.
//                  liveness line: the server writes its heartbeat every loop; only tools read
//                    it (a worker reads `state` once, when it attaches).
//                  sleep line: the server writes server_sleeping around each sleep; workers read
//                    it after every commit (true sharing; their wake-up is a syscall, no store).
//                  counters, checkpoints, latency: the server writes every round; tools read.
//                  mailbox: a tool and the server, once per command.
//   SliceEntry     one line per slice: the server writes version/clock/step/norm in the update
//                  that pulls must see; adjacent slices never share a line.
//   applied table  server only. (Rows of fewer than 8 workers share lines between slices: two
//                  apply threads of the one server may then write one line; not cross-process.)
//   ParamStats     server only (its apply threads add; the monitor reads).
//   GroupEntry     one line per worker group: the server writes its clock once per BSP step of
//                  the group; the group's workers read it on BSP pulls (true sharing: they need
//                  the new value); other groups' workers never touch it.
//   rejected rows  one 64-byte-padded row per worker, written by that worker only.
//   WorkerSlot     six groups, each on its own line(s), see below: the worker's identity, its
//                  step clock (read by every other worker on every pull), its hand-off to the
//                  server (per push), its statistics (per push and pull, monitors only); the
//                  server's progress (per round, the worker waits on it) and its membership
//                  words (rare, read by every worker on every pull); the resume blob.
//   RingHeader     tail (worker, per push), capacity (read-only), head (server, per round), each
//                  on its own line, with tail and head also in different 128-byte pairs (the
//                  adjacent-line prefetcher of x86 fetches lines in pairs).
//   ring records   written by the ring's worker only; the server only reads them.
//   RedoEntry      one per server thread, server only.
#pragma once

#include <atomic>
#include <boost/version.hpp>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <shmps/shm/settings.hpp>

namespace shmps::shm {

inline constexpr std::size_t kCacheLine = 64;
inline constexpr std::uint64_t kMagic = 0x3153504d48530a7fULL;  // "\x7f\nSHMPS1" little-endian
// 3: pushes stream through bounded rings (WorkerSlot::stream_*), BSP step sums;
// 4: optimizer state in bf16 (OptimizerSettings::state_dtype; state arrays and redo entries sized by it);
// 5: chunked apply (RedoEntry modes and inputs, RedoInput)
// 6: put (RecordKind::put, ParamEntry::init_put, ParamStats::put_rank, WorkerSlot::put_refused_seq)
// 7: worker groups (GroupEntry, SegmentHeader::workers_per_group; the header's model_clock is
//    now each group's GroupEntry::clock)
// 8: server groups (SegmentHeader::server_group(s), sync tables and counters, SyncSlice,
//    RedoTarget::sync_add / sync_take, RecordKind::sync_delta / sync_fresh, SyncSegmentHeader)
// 9: tables (ParamEntry::table_dim, RecordKind::rows)
// 10: values in bf16 or fp16 (DType::bf16 / fp16, ParamEntry::f32_offset)
// 11: stragglers (SegmentHeader::straggler_timeout_ms and stragglers_evicted,
//     WorkerSlot::evicted_generation and evicted_behind_ms, GroupEntry::straggler_since_ns and evictions)
// 12: bf16 / fp16 tables (ParamEntry::dtype on a table), a 2-byte parameter's slices updated
//     chunk by chunk (RedoEntry), and lazy Adam on tables (ParamEntry::row_words_offset, a redo
//     entry's row steps)
// 13: a parameter's own optimizer (ParamEntry::optimizer: a table's may differ from the job's),
//     state arrays per parameter (SegmentHeader::state_arrays is the most any has), and the
//     row words of lazy Adam and row-wise AdaGrad (ParamEntry::row_words_offset)
// 14: tables with open-ended 64-bit keys (keys = "u64": ParamEntry::key_slots_offset and the
//     key index, KeySlot, KeyIndexHeader, KeyBucket, KeyedInit, SegmentHeader::redo_key_slots_at,
//     the ParamStats key counters)
inline constexpr std::uint32_t kLayoutVersion = 14;
// The most server groups one job may have (each replica keeps one exactly-once entry per group
// and slice; each sync segment one ring per group).
inline constexpr std::uint32_t kMaxServerGroups = 64;
inline constexpr std::size_t kMaxNameBytes = 64;  // including the terminating NUL
inline constexpr std::size_t kMaxDims = 8;
inline constexpr std::size_t kResumeBlobBytes = 1024;
inline constexpr std::size_t kMailboxBytes = 4352;
inline constexpr std::size_t kLatencyBuckets = 40;  // bucket i: [2^i, 2^(i+1)) ns; the last holds the rest  // a request holds a path (checkpoint=/abs/path)

static_assert(std::atomic<std::uint64_t>::is_always_lock_free, "a lock-based atomic is useless across processes");
static_assert(std::atomic<std::uint32_t>::is_always_lock_free, "a lock-based atomic is useless across processes");
static_assert(std::atomic<std::int32_t>::is_always_lock_free, "a lock-based atomic is useless across processes");
static_assert(sizeof(std::atomic<std::uint64_t>) == 8 && sizeof(std::atomic<std::uint32_t>) == 4);

constexpr std::uint64_t align_up(std::uint64_t n, std::uint64_t to) noexcept { return (n + to - 1) / to * to; }

// Objects that live in the segment are used in place and never copied or moved: a copy would be
// a snapshot of words other processes keep changing (possibly torn), and no longer shared. The
// default constructor stays (trivially zero-initialising for unit tests of a slot in memory).
#define SHMPS_SHARED_IN_PLACE(Type)          \
  Type() = default;                          \
  Type(const Type&) = delete;                \
  Type(Type&&) = delete;                     \
  Type& operator=(const Type&) = delete;     \
  Type& operator=(Type&&) = delete

// ---- Field lists: what the fingerprint and the tiling check are computed from ---------------
namespace detail {

// One entry of a field list: a named field, or (name == nullptr) `size` bytes of padding.
struct FieldInfo {
  const char* name;
  std::uint64_t offset;     // of a field; unused for padding (it follows the previous entry)
  std::uint64_t size;
  std::uint64_t type_code;  // field_type_code: what kind of value the bytes hold
};

// is_atomic<T>::value, and ::value_type: the value an atomic holds, or T itself.
template <class T>
struct is_atomic : std::false_type {
  using value_type = T;
};
template <class T>
struct is_atomic<std::atomic<T>> : std::true_type {
  static_assert(std::atomic<T>::is_always_lock_free, "a lock-based atomic is useless across processes");
  using value_type = T;
};

// What kind of value a field holds, packed into one number, so that retyping a field (u64 to
// double, atomic to plain, 4 elements to 8) changes the fingerprint even where the size does not.
template <class Field>
constexpr std::uint64_t field_type_code() noexcept {
  using Element = std::remove_all_extents_t<Field>;
  using Value = typename is_atomic<Element>::value_type;
  std::uint64_t code = sizeof(Value);
  code |= std::uint64_t{is_atomic<Element>::value} << 16;
  code |= std::uint64_t{std::is_floating_point_v<Value>} << 17;
  code |= std::uint64_t{std::is_signed_v<Value>} << 18;
  code |= std::uint64_t{std::is_enum_v<Value>} << 19;
  code |= std::uint64_t{std::is_class_v<Value>} << 20;  // a nested struct (it has its own list)
  code |= std::uint64_t{sizeof(Field) / sizeof(Element)} << 32;  // elements of an array, else 1
  return code;
}

// The index of the first entry of `fields` that does not start where the previous one ended,
// or fields.size() if the list ends short of or past `type_size`; npos if the list tiles the
// type exactly: every byte a listed field or listed padding. A field missing from a list leaves
// a hole that no PAD covers, so the next field starts "too late", even inside a padded line.
inline constexpr std::uint64_t kTiles = ~std::uint64_t{0};
template <std::size_t N>
constexpr std::uint64_t first_untiled(const FieldInfo (&fields)[N], std::uint64_t type_size) noexcept {
  std::uint64_t end = 0;
  for (std::size_t i = 0; i < N; ++i) {
    if (fields[i].name != nullptr) {
      if (fields[i].offset != end) return i;
      end = fields[i].offset;
    }
    end += fields[i].size;
  }
  return end == type_size ? kTiles : N;
}

constexpr std::uint64_t fnv1a(std::uint64_t h, std::uint64_t v) noexcept {
  for (int i = 0; i < 8; ++i) {
    h ^= (v >> (8 * i)) & 0xff;
    h *= 0x100000001b3ULL;
  }
  return h;
}
constexpr std::uint64_t fnv1a_str(std::uint64_t h, const char* s) noexcept {
  for (; *s; ++s) {
    h ^= static_cast<unsigned char>(*s);
    h *= 0x100000001b3ULL;
  }
  return h;
}

// One type's part of the fingerprint: its name, size and alignment, and every entry of its list
// in order (name, offset, size, kind). Swapping two fields of one type swaps their offsets
// against their names, so it changes the result.
template <std::size_t N>
constexpr std::uint64_t type_fingerprint(std::uint64_t h, const char* type_name, std::uint64_t size,
                                         std::uint64_t align, const FieldInfo (&fields)[N]) noexcept {
  h = fnv1a(fnv1a(fnv1a_str(h, type_name), size), align);
  for (const FieldInfo& f : fields) {
    h = f.name != nullptr ? fnv1a(fnv1a_str(h, f.name), f.offset) : fnv1a(h, ~std::uint64_t{0});
    h = fnv1a(fnv1a(h, f.size), f.type_code);
  }
  return h;
}

// FieldsOf<T>::list: the field list of shared type T, made by SHMPS_DESCRIBE_FIELDS below.
template <class T>
struct FieldsOf;

}  // namespace detail

// Turns a field list macro into FieldsOf<Type>: FIELD(f) becomes {"f", offsetof, sizeof, kind},
// PAD(n) becomes n bytes of padding. Checks at compile time that the list tiles the type.
#define SHMPS_FIELD_INFO(f) \
  ::shmps::shm::detail::FieldInfo{#f, offsetof(T, f), sizeof(T::f), ::shmps::shm::detail::field_type_code<decltype(T::f)>()},
#define SHMPS_PADDING_INFO(n) ::shmps::shm::detail::FieldInfo{nullptr, 0, n, 0},
#define SHMPS_DESCRIBE_FIELDS(Type, LIST)                                                       \
  template <>                                                                                   \
  struct detail::FieldsOf<Type> {                                                               \
    using T = Type;                                                                             \
    static constexpr const char* name = #Type;                                                  \
    static constexpr FieldInfo list[] = {LIST(SHMPS_FIELD_INFO, SHMPS_PADDING_INFO)};          \
  };                                                                                            \
  static_assert(detail::first_untiled(detail::FieldsOf<Type>::list, sizeof(Type)) == detail::kTiles, \
                #Type ": its field list (" #LIST ") misses a field, or a PAD is off: see detail::first_untiled")

// The life of a segment. "ready" is written last at creation; a segment found in "creating"
// with no live server was left by a server that died while creating it, and is recreated.
enum class SegmentState : std::uint32_t { creating = 0, ready = 1, stopping = 2, stopped = 3 };

// ---------------------------------------------------------------------------------------------
// SegmentHeader, at offset 0.
struct SegmentHeader {
  SHMPS_SHARED_IN_PLACE(SegmentHeader);

  // Identity and geometry: written once by the server before state becomes "ready".
  std::uint64_t magic;           // kMagic
  std::uint32_t layout_version;  // kLayoutVersion
  std::uint32_t header_bytes;    // sizeof(SegmentHeader)
  std::uint64_t fingerprint;     // kLayoutFingerprint of the build that created it
  std::uint64_t total_bytes;     // size of the whole segment
  std::uint64_t spec_hash;       // hash of the model (names, shapes, slice size, slots, optimizer)
  std::uint64_t created_unix_ns;
  char name[kMaxNameBytes];      // the segment name, NUL-terminated

  std::uint32_t param_count;
  std::uint32_t max_workers;
  std::uint64_t slice_count;
  std::uint64_t slice_floats;    // elements per slice (the last slice of a parameter may be shorter)
  std::uint64_t ring_bytes;      // record capacity of each worker's ring
  std::uint64_t params_offset;
  std::uint64_t slices_offset;
  std::uint64_t applied_offset;
  std::uint64_t slots_offset;
  std::uint64_t rings_offset;
  std::uint64_t ring_stride;     // bytes from one slot's RingHeader to the next
  std::uint64_t values_offset;
  std::uint64_t state_offset;
  std::uint64_t redo_offset;
  std::uint64_t redo_stride;     // bytes per RedoEntry with its arrays
  std::uint32_t redo_count;      // the most apply threads a server may use on this segment
  // Worker groups (SINGA's): rank r is in group r / workers_per_group. BSP and SSP hold each
  // group to its own clock (GroupEntry); groups run asynchronously to each other.
  std::uint32_t workers_per_group;
  std::uint64_t param_stats_offset;  // ParamStats[param_count]
  std::uint64_t rejected_offset;     // u64 rejected[max_workers][param_count], one padded row per worker
  std::uint64_t rejected_stride;     // bytes per row
  // BSP steps that stream (the rings hold less than a step): float sums[values' floats], at the
  // values' offsets relative to step_sums_offset; 0 when the rings hold a whole step.
  std::uint64_t step_sums_offset;
  std::uint64_t step_sums_bytes;
  OptimizerSettings optimizer;
  std::uint32_t state_arrays;    // the most optimizer state arrays any parameter keeps (sizes the redo entries)
  std::uint32_t group_count;     // ceil(max_workers / workers_per_group)
  std::uint64_t groups_offset;   // GroupEntry[group_count]
  // Server groups (SINGA's): this segment is the replica of server group `server_group` of
  // `server_groups` (1: no server groups, and the sync offsets below are 0).
  std::uint32_t server_group;
  std::uint32_t server_groups;
  std::uint64_t sync_offset;          // SyncSlice[slice_count]
  std::uint64_t sync_applied_offset;  // u64[slice_count][server_groups]: home's last delta seq added per origin
  std::uint64_t sync_base_offset;     // float, laid out as the values: a slice's values at its last sync
  std::uint64_t sync_sent_offset;     // float, laid out as the values: the delta in flight to the home group
  // A job with a table with keys = "u64": where a redo entry's KeySlot array starts, in bytes
  // from the RedoEntry (RedoEntry below); 0 without such a table.
  std::uint64_t redo_key_slots_at;

  // Consistency policy (server writes, at a clock boundary; workers read before every pull).
  alignas(kCacheLine) std::atomic<std::uint32_t> consistency;  // Consistency
  std::atomic<std::uint32_t> staleness;                        // SSP bound, in clocks
  std::atomic<std::uint32_t> bsp_aggregate;                    // BspAggregate
  std::atomic<std::uint32_t> on_worker_death;                  // OnWorkerDeath
  // BSP and SSP: a live worker that alone holds its group's barrier (or bound) this long is
  // evicted (a straggler, docs/consistency.md#stragglers); 0: never. Written at every server
  // start; shown by the tools and named in the waiting workers' messages.
  std::atomic<std::uint32_t> straggler_timeout_ms;

  // Server liveness and state (server writes; everyone reads). Death of the server is proven by
  // its lock file (<name>.server.lock), not by the heartbeat; the heartbeat is for display.
  alignas(kCacheLine) std::atomic<std::uint32_t> state;  // SegmentState
  std::atomic<std::int32_t> server_pid;
  std::atomic<std::uint64_t> server_epoch;               // bumped at every server start
  std::atomic<std::uint64_t> server_start_time;          // /proc/<pid>/stat starttime (ticks)
  std::atomic<std::uint64_t> server_heartbeat_ns;        // CLOCK_MONOTONIC
  std::atomic<std::uint64_t> server_started_unix_ns;
  // What the server found about transparent huge pages for the segment at its start (pages.hpp):
  // /dev/shm's huge= mount option and the shmem_enabled knob (HugeSetting), and how many bytes
  // of its own mapping were in huge pages once it had pre-faulted values and optimizer state.
  std::atomic<std::uint32_t> huge_mount;
  std::atomic<std::uint32_t> huge_sysfs;
  std::atomic<std::uint64_t> huge_bytes;

  // The server's sleep word: the server sleeps on it (futex) when every ring is empty, after
  // setting server_sleeping. A worker that commits a push and sees server_sleeping calls
  // FUTEX_WAKE on it. Workers never write these words (the wake is a syscall, not a store).
  alignas(kCacheLine) std::atomic<std::uint32_t> server_wake;
  std::atomic<std::uint32_t> server_sleeping;

  // Counters for the monitor (server writes).
  alignas(kCacheLine) std::atomic<std::uint64_t> records_applied;
  std::atomic<std::uint64_t> floats_applied;
  std::atomic<std::uint64_t> apply_rounds;
  std::atomic<std::uint64_t> records_skipped;  // already applied before a server restart
  std::atomic<std::uint64_t> records_discarded;  // of a step the worker died in (BSP)
  std::atomic<std::uint64_t> steps;            // BSP steps completed
  std::atomic<std::uint64_t> stragglers_evicted;  // live workers evicted from a BSP barrier or SSP bound (straggler_timeout)

  // Checkpoints (server writes): how many were written by this segment's servers, when the last
  // one was taken (its snapshot), how long it took until durable, and the model clock it holds.
  alignas(kCacheLine) std::atomic<std::uint64_t> checkpoints;
  std::atomic<std::uint64_t> checkpoint_failures;
  std::atomic<std::uint64_t> last_checkpoint_unix_ns;
  std::atomic<std::uint64_t> last_checkpoint_duration_ns;
  std::atomic<std::uint64_t> last_checkpoint_clock;

  // Server groups: the sync counters (server writes; tools read). sync_seq is the number of
  // this group's newest sync round (one per sync_every, over all its servers' lives; a round
  // that has nothing to send takes a number too); a slice is in flight from sending its delta
  // until the home group's fresh values for it are taken.
  alignas(kCacheLine) std::atomic<std::uint64_t> sync_seq;
  std::atomic<std::uint64_t> sync_rounds;      // sync rounds that sent something
  std::atomic<std::uint64_t> sync_sent;        // slice deltas sent to their home groups
  std::atomic<std::uint64_t> sync_taken;       // fresh slices taken back from their home groups
  std::atomic<std::uint64_t> sync_added;       // as home: deltas of other groups added
  std::atomic<std::uint64_t> sync_duplicates;  // as home: deltas that were added before (a restart), answered only
  std::atomic<std::uint64_t> sync_bytes;       // bytes of sync records sent (deltas and fresh values)
  std::atomic<std::uint64_t> last_sync_unix_ns;  // when the last sync round had every answer back

  // Apply latency, push commit -> applied, sampled once per worker per round (the newest push a
  // round applies): a histogram with power-of-two buckets of nanoseconds. And the time the
  // server spent in rounds that applied something (its busy time). Server writes.
  alignas(kCacheLine) std::atomic<std::uint64_t> latency_buckets[kLatencyBuckets];
  std::atomic<std::uint64_t> latency_samples;
  std::atomic<std::uint64_t> apply_busy_ns;

  // The command mailbox of shmps-ctl (the only words a tool writes). A tool claims it
  // (mailbox_state free -> claimed, compare-and-swap), writes the request, and marks it
  // submitted; the server executes it between apply rounds, writes the reply and marks it done;
  // the tool reads the reply and frees it. The server never waits on the mailbox. A claim whose
  // holder died (mailbox_pid gone) may be taken over by the next tool.
  alignas(kCacheLine) std::atomic<std::uint32_t> mailbox_state;  // MailboxState
  std::atomic<std::int32_t> mailbox_pid;                         // the tool holding the claim
  std::atomic<std::uint64_t> mailbox_claimed_ns;
  std::int32_t mailbox_status;                                   // 0: done as asked; else refused
  std::uint32_t mailbox_reserved;
  char mailbox_request[kMailboxBytes];                           // "consistency=bsp"
  char mailbox_reply[kMailboxBytes];                             // what the server did, or why not
};
#define SHMPS_SEGMENT_HEADER_FIELDS(FIELD, PAD)                                                          \
  FIELD(magic) FIELD(layout_version) FIELD(header_bytes) FIELD(fingerprint) FIELD(total_bytes) FIELD(spec_hash) \
  FIELD(created_unix_ns) FIELD(name) FIELD(param_count) FIELD(max_workers) FIELD(slice_count) FIELD(slice_floats) \
  FIELD(ring_bytes) FIELD(params_offset) FIELD(slices_offset) FIELD(applied_offset) FIELD(slots_offset)         \
  FIELD(rings_offset) FIELD(ring_stride) FIELD(values_offset) FIELD(state_offset) FIELD(redo_offset)             \
  FIELD(redo_stride) FIELD(redo_count) FIELD(workers_per_group) FIELD(param_stats_offset) FIELD(rejected_offset)        \
  FIELD(rejected_stride) FIELD(step_sums_offset) FIELD(step_sums_bytes) FIELD(optimizer) FIELD(state_arrays)   \
  FIELD(group_count) FIELD(groups_offset) FIELD(server_group) FIELD(server_groups) FIELD(sync_offset)          \
  FIELD(sync_applied_offset) FIELD(sync_base_offset) FIELD(sync_sent_offset) FIELD(redo_key_slots_at) PAD(48)                            \
  FIELD(consistency) FIELD(staleness) FIELD(bsp_aggregate) FIELD(on_worker_death) FIELD(straggler_timeout_ms) PAD(44)                        \
  FIELD(state) FIELD(server_pid) FIELD(server_epoch) FIELD(server_start_time) FIELD(server_heartbeat_ns)       \
  FIELD(server_started_unix_ns) FIELD(huge_mount) FIELD(huge_sysfs) FIELD(huge_bytes) PAD(8)                   \
  FIELD(server_wake) FIELD(server_sleeping) PAD(56)                                                             \
  FIELD(records_applied) FIELD(floats_applied) FIELD(apply_rounds) FIELD(records_skipped)                      \
  FIELD(records_discarded) FIELD(steps) FIELD(stragglers_evicted) PAD(8)                                                                 \
  FIELD(checkpoints) FIELD(checkpoint_failures) FIELD(last_checkpoint_unix_ns) FIELD(last_checkpoint_duration_ns) \
  FIELD(last_checkpoint_clock) PAD(24)                                                                          \
  FIELD(sync_seq) FIELD(sync_rounds) FIELD(sync_sent) FIELD(sync_taken) FIELD(sync_added) FIELD(sync_duplicates) \
  FIELD(sync_bytes) FIELD(last_sync_unix_ns)                                                                     \
  FIELD(latency_buckets) FIELD(latency_samples) FIELD(apply_busy_ns) PAD(48)                                    \
  FIELD(mailbox_state) FIELD(mailbox_pid) FIELD(mailbox_claimed_ns) FIELD(mailbox_status) FIELD(mailbox_reserved) \
  FIELD(mailbox_request) FIELD(mailbox_reply) PAD(40)

enum class MailboxState : std::uint32_t { free = 0, claimed = 1, submitted = 2, done = 3 };

// ---------------------------------------------------------------------------------------------
// ParamEntry: one per parameter, written once at creation. A plain value, and copyable on
// purpose (unlike the other shared types): plan_layout() builds the entries in a std::vector
// (LayoutPlan::params), and the server copies each into the segment before it is "ready", when
// no other process can read it; after that nobody writes one.
// How a parameter's values are stored (the spec's `dtype`): float32, or 2-byte bfloat16 (the
// upper half of a float32) or IEEE binary16. A 2-byte parameter keeps its values in that type in
// the values region (half the memory, half the traffic of pulls, views and the apply); the server
// widens them to float32 for the optimizer and rounds the new values to nearest even once per
// optimizer step (shm/dtype.hpp). Everything else stays float32 and is sized by elements: the
// ring's gradients, the BSP step sums, the redo entry's values (float32 holding values the dtype
// represents exactly), the sync arrays, the optimizer state (its own state_dtype). A slice is
// slice_floats *elements* whatever the dtype (so a bf16 slice is half as many bytes): slices,
// versions, the exactly-once table, the redo log and the collectors stay element-indexed and
// shared by every dtype; only the code that touches the values region looks at the dtype.
enum class DType : std::uint32_t { f32 = 0, bf16 = 1, fp16 = 2 };
constexpr std::uint64_t dtype_bytes(DType d) noexcept { return d == DType::f32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------
// Tables with open-ended keys (keys = "u64", ARCHITECTURE.md "Tables"). The table's rows are
// slots; KeySlot says which key a slot holds. A worker finds a key's slot in the key index, then
// reads the row and its KeySlot under the slice's seqlock and takes the row only if the KeySlot
// still names its key (the server may have given the slot to another key in between); a key in
// no slot reads as its init (KeyedInit). Only the server writes either (shm/key_index.hpp).
struct KeySlot {
  std::uint64_t key;
  // The order of the slot's last update among all updates of the table (1, 2, ...: the least
  // recently updated slot has the smallest, and is the one evicted when a key needs a slot and
  // none is free); 0: the slot is free, and `key` means nothing.
  std::uint64_t stamp;
};
#define SHMPS_KEY_SLOT_FIELDS(FIELD, PAD) FIELD(key) FIELD(stamp)

// The key index of a table: a header on its own line, then KeyBucket[key_buckets], open
// addressing with linear probing from key_bucket_of(key). `seq` is a seqlock word over the whole
// index: odd while the server changes it (once per apply round, after the round's rows are in).
struct alignas(kCacheLine) KeyIndexHeader {
  SHMPS_SHARED_IN_PLACE(KeyIndexHeader);
  std::atomic<std::uint64_t> seq;
};
#define SHMPS_KEY_INDEX_HEADER_FIELDS(FIELD, PAD) FIELD(seq) PAD(56)
// slot_plus_one 0: an empty bucket (a probe for a key stops there).
struct KeyBucket {
  std::uint64_t key;
  std::uint64_t slot_plus_one;
};
#define SHMPS_KEY_BUCKET_FIELDS(FIELD, PAD) FIELD(key) FIELD(slot_plus_one)

// The init of a keyed table's rows, as the spec's init applied to a key: element d of key k's row
// is the init's element k * dim + d (row-major, as if the key were a row number, wrapping at
// 2^64), so a key below the table's rows starts as that row of a table of row numbers would.
// kind: 0 zeros, 1 constant (value), 2 u24 (stream, scale: u24(splitmix_draw(stream, i)) * scale).
struct KeyedInit {
  std::uint32_t kind;
  float value;
  std::uint64_t stream;
  float scale;
  std::uint32_t reserved;
};
#define SHMPS_KEYED_INIT_FIELDS(FIELD, PAD) FIELD(kind) FIELD(value) FIELD(stream) FIELD(scale) FIELD(reserved)

struct ParamEntry {
  char name[kMaxNameBytes];  // NUL-terminated
  DType dtype;
  std::uint32_t ndim;
  std::uint64_t shape[kMaxDims];
  std::uint64_t size;           // elements
  std::uint64_t first_slice;    // index of its first SliceEntry
  std::uint64_t slice_count;
  std::uint64_t values_offset;  // 64-byte aligned; size x dtype_bytes(dtype) bytes
  // Optimizer state arrays, 64-byte aligned: optimizer_state_arrays(optimizer.kind) of them, the
  // others 0 (a parameter whose optimizer keeps fewer arrays than another's has no bytes for them).
  std::uint64_t state_offset[2];
  // 1: the spec says init = "put": a worker puts the first values, and pulls and views wait for
  // every slice of their range to have version 1 or more (Worker::put).
  std::uint32_t init_put;
  // A table ([[table]] in the spec): 0 for a dense parameter, else the row width. A table has
  // shape {rows, table_dim}, its slices hold whole rows (table_dim divides the slice size), and
  // it is pushed by row (RecordKind::rows) and pulled by row, never whole.
  std::uint32_t table_dim;
  // Where the parameter sits in the regions laid out as float32 values whatever its dtype (the
  // BSP step sums, the sync base and sent arrays), relative to their start: its values_offset
  // minus the values' start for a float32-only model, but a bf16 parameter's values take half.
  std::uint64_t f32_offset;
  // A table whose optimizer keeps a word per row (optimizer_row_words): one 8-byte word per row,
  // 0 otherwise. Lazy Adam (a round steps only the rows it touches): the row's step count
  // (std::uint64_t), for its bias correction. Row-wise AdaGrad: the row's accumulator (a double).
  std::uint64_t row_words_offset;
  // The optimizer that updates this parameter: the job's [optimizer] (SegmentHeader::optimizer),
  // or a table's own (`optimizer = {...}` on a [[table]]). Its state_dtype is always the job's.
  OptimizerSettings optimizer;
  // A table with keys = "u64" (open-ended keys, ids are any 64-bit values): its rows are slots.
  // key_slots_offset: KeySlot[rows], which key each slot holds (the truth; written with the
  // rows, under the slice's seqlock, through the redo entry). key_index_offset: a KeyIndexHeader
  // and KeyBucket[key_buckets], the lookup from key to slot (derived: the server rebuilds it from
  // the slots at every start). All three 0 for a table of row numbers and a dense parameter.
  std::uint64_t key_slots_offset;
  std::uint64_t key_index_offset;
  std::uint64_t key_buckets;  // a power of two, at least twice the rows
  // A key is given a slot once it has been pushed this many times (1: at its first push); the
  // rows of its earlier pushes are dropped (ParamStats::keys_refused_rows).
  std::uint32_t admit_after;
  std::uint32_t keyed_reserved;
  // The values a key's row starts from (its init, as a function of the key, KeyedInit).
  KeyedInit keyed_init;
};
// A table with keys = "u64": its rows are slots holding open-ended keys (KeySlot).
inline bool is_keyed(const ParamEntry& p) noexcept { return p.key_slots_offset != 0; }
// The optimizer state arrays parameter p keeps (its state_offset[a] for a below this is set).
inline int state_arrays_of(const ParamEntry& p) noexcept { return optimizer_state_arrays(p.optimizer.kind); }
#define SHMPS_PARAM_ENTRY_FIELDS(FIELD, PAD)                                                            \
  FIELD(name) FIELD(dtype) FIELD(ndim) FIELD(shape) FIELD(size) FIELD(first_slice) FIELD(slice_count)           \
  FIELD(values_offset) FIELD(state_offset) FIELD(init_put) FIELD(table_dim) FIELD(f32_offset) FIELD(row_words_offset) \
  FIELD(optimizer) FIELD(key_slots_offset) FIELD(key_index_offset) FIELD(key_buckets) FIELD(admit_after)             \
  FIELD(keyed_reserved) FIELD(keyed_init)

// ---------------------------------------------------------------------------------------------
// SliceEntry: one per slice; the server writes, everyone reads.
//
// `version` is a seqlock word: 2 x (updates applied to the slice), odd while the server writes
// the slice's values. A reader copies the values between two loads of the word and retries if
// it changed or was odd; a word that stays odd means a server died mid-write.
struct alignas(kCacheLine) SliceEntry {
  SHMPS_SHARED_IN_PLACE(SliceEntry);

  std::atomic<std::uint64_t> version;
  std::atomic<std::uint64_t> clock;  // synchronous step of the values (BSP)
  std::uint64_t param;               // index into the ParamEntry table
  std::uint64_t first;               // first element within the parameter
  std::uint64_t count;               // elements in this slice
  std::uint64_t step;                // optimizer steps applied (Adam's bias correction); server only
  std::atomic<std::uint64_t> value_sq_norm;  // bits of a double: sum of squares of the values, sampled
  std::uint64_t sum_step;            // streamed BSP: step + 1 whose sum the slice's step sums hold; server only
};
#define SHMPS_SLICE_ENTRY_FIELDS(FIELD, PAD) \
  FIELD(version) FIELD(clock) FIELD(param) FIELD(first) FIELD(count) FIELD(step) FIELD(value_sq_norm) FIELD(sum_step)

// ---------------------------------------------------------------------------------------------
// SyncSlice: one per slice in a replica of a job with server groups; server only (tools read).
//
// A slice's home group holds its true values; every other group applies its own workers'
// pushes to its replica and, each sync round, sends the home the delta (values - sync_base)
// with the round's sequence number, keeping the delta in sync_sent. The home adds it once
// (sync_applied[slice][origin] < seq) and answers with its values F; the requester then sets
// values = F + (values - sync_base - sync_sent) and sync_base = F (server/src/sync_engine.hpp).
struct SyncSlice {
  SHMPS_SHARED_IN_PLACE(SyncSlice);

  std::uint32_t home;            // the slice's home server group (slices spread round-robin)
  std::uint32_t reserved;
  std::atomic<std::uint64_t> sent_seq;    // the sequence number of the delta in sync_sent (0: none yet)
  std::atomic<std::uint64_t> synced_seq;  // the newest sequence number whose fresh values were taken
  std::uint64_t clean_version;  // the slice's version word when its values last equalled sync_base + sync_sent
};
#define SHMPS_SYNC_SLICE_FIELDS(FIELD, PAD) FIELD(home) FIELD(reserved) FIELD(sent_seq) FIELD(synced_seq) FIELD(clean_version)

// ---------------------------------------------------------------------------------------------
// ParamStats: one per parameter, for the monitor; the server writes (its apply threads add).
struct alignas(kCacheLine) ParamStats {
  SHMPS_SHARED_IN_PLACE(ParamStats);

  std::atomic<std::uint64_t> pushes;             // push records applied to it
  std::atomic<std::uint64_t> slice_updates;      // optimizer steps applied to its slices
  std::atomic<std::uint64_t> floats_applied;
  std::atomic<std::uint64_t> last_grad_sq_norm;  // bits of a double: the newest push's squared L2 norm
  std::atomic<std::uint64_t> last_grad_floats;   //   and how many elements it covered
  // Put: rank + 1 of the worker whose put of this parameter the server applied first (0: none).
  // Stored before that put's first slice is written; only that rank's puts are applied after.
  std::atomic<std::uint64_t> put_rank;
  // A table: rows updated (one per distinct row per round), and how many distinct rows the
  // newest round that touched the table updated.
  std::atomic<std::uint64_t> rows_updated;
  std::atomic<std::uint64_t> round_rows;
  // A table with keys = "u64": keys given a slot, keys evicted to make room (their slot's least
  // recently updated), keys holding a slot now, and pushed rows dropped because their key was not
  // admitted (yet: admit_after, or every slot was taken by the round's own keys).
  std::atomic<std::uint64_t> keys_admitted;
  std::atomic<std::uint64_t> keys_evicted;
  std::atomic<std::uint64_t> keys_held;
  std::atomic<std::uint64_t> keys_refused_rows;
};
#define SHMPS_PARAM_STATS_FIELDS(FIELD, PAD) \
  FIELD(pushes) FIELD(slice_updates) FIELD(floats_applied) FIELD(last_grad_sq_norm) FIELD(last_grad_floats) \
  FIELD(put_rank) FIELD(rows_updated) FIELD(round_rows) FIELD(keys_admitted) FIELD(keys_evicted) FIELD(keys_held) \
  FIELD(keys_refused_rows) PAD(32)

// ---------------------------------------------------------------------------------------------
// GroupEntry: one per worker group, on its own line; the server writes, the group's workers read.
struct alignas(kCacheLine) GroupEntry {
  SHMPS_SHARED_IN_PLACE(GroupEntry);

  // BSP: the step the group is collecting. Every push of the group's steps before it has been
  // applied; a pull of one of its workers for clock c waits until clock >= c. (Between groups
  // there is no barrier: the values also hold whatever steps the other groups have completed.)
  std::atomic<std::uint64_t> clock;
  std::atomic<std::uint64_t> steps;      // BSP steps of this group completed
  std::atomic<std::uint64_t> records;    // pushes applied in those steps
  std::atomic<std::uint64_t> discarded;  // pushes of its steps discarded (their worker died mid-step)
  // Stragglers: since when (CLOCK_MONOTONIC ns) the barrier of step `clock` has waited only for
  // live workers that have not ended it while another live member has (0: it does not); the
  // server evicts them once this is straggler_timeout_ms old. And how many it has evicted.
  std::atomic<std::uint64_t> straggler_since_ns;
  std::atomic<std::uint64_t> evictions;
  std::uint64_t reserved[2];
};
#define SHMPS_GROUP_ENTRY_FIELDS(FIELD, PAD) \
  FIELD(clock) FIELD(steps) FIELD(records) FIELD(discarded) FIELD(straggler_since_ns) FIELD(evictions) FIELD(reserved)

// ---------------------------------------------------------------------------------------------
// RedoEntry: one per server apply thread, server only. Two ways to get a slice's update in:
//
// Whole slice (mode whole): the thread computes the slice's new values, optimizer state and
// exactly-once row here, marks the entry valid, copies them into the slice under its seqlock,
// and clears the mark. A server killed in between leaves the entry valid (and the slice's
// version word odd); the next server copies the entry in again, which is idempotent.
//
// Chunked (modes each, sum, mean, sums; server/src/apply_chunks.hpp): the slice is updated in
// place a chunk of a few KiB at a time, so the new values never leave the thread's L1 cache
// before they reach the slice (a whole-slice copy is a second pass over the slice through L2).
// The entry names the update's inputs (the push records, still in their rings until the round
// is published, or the slice's step sums), `done` says how many of the slice's elements hold the
// new values, and `chunk_lo` (when not kNoChunk) says the entry's arrays hold the new values of
// elements [chunk_lo, chunk_lo + chunk_count). A server killed mid-slice leaves the entry valid;
// the next server copies the pending chunk in and computes the rest from the same inputs, so the
// slice ends exactly as if the first server had finished (apply_chunks.hpp, finish_chunked).
//
// Either way no slice stays torn and no push is applied twice.
//
// A sync_take also sets the slice's SyncSlice::clean_version to sync_clean_version: its new
// version if its own workers changed nothing while the delta was away, else 0 (still changed).
//
//   RedoEntry | u64 last_applied[max_workers] | RedoInput inputs[redo_input_capacity]
//             | float values[slice_floats] | state[state_arrays][slice_floats]
//   (the state in the segment's optimizer.state_dtype: float32, or bf16 as uint16). An entry whose
//   target is step_sums carries float32 gradient sums in `values` (whatever the state dtype) and
//   no state; a chunked entry uses the first chunk of each array.
//   (state_arrays: the most any parameter's optimizer keeps; a slice uses its parameter's.)
//   A job with a table whose optimizer keeps row words (lazy Adam, row-wise AdaGrad): after those
//   (and after a sync_take's fresh values, when the job has server groups) u64
//   row_words[slice_floats / the narrowest such table's dim]: a table slice's new row words, in
//   RedoMode::rows one per packed row (in their order), in RedoMode::whole one per row of the
//   slice; the copy-in writes them with the rows (Segment::redo_row_words).
//   A job with a table with keys = "u64": after those, at SegmentHeader::redo_key_slots_at,
//   KeySlot key_slots[slice_floats / the narrowest such table's dim]: the slice's new KeySlots,
//   as the row words (one per packed row, or one per row of the slice), written with the rows.
//   A bf16 or fp16 parameter (ParamEntry::dtype): `values` are float32 all the same, each already
//   rounded to the dtype (so it holds one exactly), and the copy-in narrows them into the slice's
//   count x 2 bytes: a replay writes the same bytes again. Chunked, the same holds per chunk: its
//   old values are widened from the slice, its new values go into the entry's first chunk (not yet
//   rounded: copying the chunk in narrows them, which rounds, the same way on a replay).
//
// Server groups: an entry whose target is sync_add (the home group adds a delta of group
// `sync_origin` with sequence number `sync_seq`) carries the slice's new values; one whose
// target is sync_take (the requester takes the home's fresh values F) carries the new values and,
// after the state arrays, F (the slice's new sync_base). Both go in whole, under the seqlock.
enum class RedoTarget : std::uint32_t { values = 0, step_sums = 1, sync_add = 2, sync_take = 3 };
// How the entry's update is computed: copied in whole, or chunk by chunk from its inputs with one
// optimizer step per input (each), one step with their sum or mean, or one step with the slice's
// step sums times `scale` (sums). rows: a table's touched rows only, copied in like whole: the
// entry's `inputs` rows of the table's dim packed in `values` (and in each state array), then,
// in `values` right after them, their row numbers within the slice (u32); used when they fit
// (rows x (dim + 1) floats at most the slice's), else the table's slice goes in whole.
enum class RedoMode : std::uint32_t { whole = 0, each = 1, sum = 2, mean = 3, sums = 4, rows = 5 };
inline constexpr std::uint64_t kNoChunk = ~std::uint64_t{0};

struct alignas(kCacheLine) RedoEntry {
  SHMPS_SHARED_IN_PLACE(RedoEntry);

  std::atomic<std::uint32_t> valid;
  RedoTarget target;            // where the values go: the slice's values, or its step sums
  std::uint64_t slice;
  std::uint64_t count;          // elements of the slice
  std::uint64_t version_after;  // values: the slice's version word once the copy is done
  std::uint64_t step_after;     // values: the slice's optimizer step count once the copy is done
  std::uint64_t clock_after;    // values of a streamed BSP step: the slice's clock after it (0: unchanged)
  std::uint64_t sum_step_after; // step sums: the slice's sum_step once the copy is done
  std::uint64_t sync_seq;       // sync_add, sync_take: the delta's sequence number
  // Chunked apply (mode != whole): see above.
  RedoMode mode;
  std::uint32_t inputs;                 // RedoInputs in use
  std::atomic<std::uint64_t> done;      // the slice's elements [0, done) hold the new values
  std::atomic<std::uint64_t> chunk_lo;  // the arrays hold elements [chunk_lo, chunk_lo + chunk_count), or kNoChunk
  std::uint64_t chunk_count;
  float scale;                          // mode sums: the factor on the step sums (1, or 1 / ranks)
  std::uint32_t sync_origin;            // sync_add: the server group the delta came from
  std::uint64_t sync_clean_version;     // sync_take: the slice's clean_version once the copy is done
  std::uint64_t reserved2[2];
};
#define SHMPS_REDO_ENTRY_FIELDS(FIELD, PAD) \
  FIELD(valid) FIELD(target) FIELD(slice) FIELD(count) FIELD(version_after) FIELD(step_after) FIELD(clock_after) \
  FIELD(sum_step_after) FIELD(sync_seq) FIELD(mode) FIELD(inputs) FIELD(done) FIELD(chunk_lo) FIELD(chunk_count) \
  FIELD(scale) FIELD(sync_origin) FIELD(sync_clean_version) FIELD(reserved2)

// One input of a chunked update: the push record of worker `rank` with sequence number `seq`, at
// byte `ring_offset` of that worker's ring data.
struct RedoInput {
  std::uint32_t rank;
  std::uint32_t reserved;
  std::uint64_t ring_offset;
  std::uint64_t seq;
};
#define SHMPS_REDO_INPUT_FIELDS(FIELD, PAD) FIELD(rank) FIELD(reserved) FIELD(ring_offset) FIELD(seq)

// How many inputs a redo entry holds: one whole-model push per worker in a BSP step twice over,
// and some. A slice's round with more contributions than this goes in whole (mode whole).
constexpr std::uint64_t redo_input_capacity(std::uint64_t max_workers) noexcept { return 2 * max_workers + 16; }
constexpr std::uint64_t redo_inputs_bytes(std::uint64_t max_workers) noexcept {
  return align_up(redo_input_capacity(max_workers) * sizeof(RedoInput), kCacheLine);
}

// ---------------------------------------------------------------------------------------------
// WorkerSlot: one per rank. The worker holding the slot (proven by its lock on byte `rank` of
// <name>.slots.lock) writes the worker lines; the server writes the server line only.
enum class SlotState : std::uint32_t { free = 0, attached = 1, left = 2 };

struct WorkerSlot {
  SHMPS_SHARED_IN_PLACE(WorkerSlot);

  // Worker line: identity, written at attach. The server reads state and generation every round
  // (admission, liveness) and every worker reads them in its membership test (membership.hpp).
  alignas(kCacheLine) std::atomic<std::uint32_t> state;  // SlotState
  std::atomic<std::int32_t> pid;
  std::atomic<std::uint64_t> generation;   // bumped at every attach
  std::atomic<std::uint64_t> start_time;   // /proc/<pid>/stat starttime, for display
  std::atomic<std::uint64_t> attached_unix_ns;

  // Worker line: the worker's step, written once per step (clock()). Every other worker reads it
  // on every pull (staleness, the SSP bound) and the server every BSP round: alone on its line,
  // so that this worker's per-push and per-pull writes below do not evict it from their caches.
  alignas(kCacheLine) std::atomic<std::uint64_t> clock;  // the worker's step (consistency models)

  // Worker line: the hand-off to the server, written on every push (and around every sleep); the
  // server reads it every round.
  alignas(kCacheLine) std::atomic<std::uint64_t> published;  // last committed push sequence number, all generations
  std::atomic<std::uint64_t> last_commit_seq;  // the newest committed push, and when (CLOCK_MONOTONIC ns):
  std::atomic<std::uint64_t> last_commit_ns;   //   the server samples commit -> applied latency from them
  std::atomic<std::uint32_t> waiting;          // 1 while the worker sleeps on `progress`
  // The newest push bigger than one ring record, which streams through the ring as consecutive
  // records of whole chunks (Worker::push): its parameter and range, and the sequence number of
  // its first chunk. Written before that chunk is committed. A restarted worker compares them
  // with `published` to learn how much of it its predecessor committed, and finishes it.
  std::atomic<std::uint32_t> stream_param;
  std::atomic<std::uint64_t> stream_first_seq;  // 0: no streamed push yet
  std::atomic<std::uint64_t> stream_offset;
  std::atomic<std::uint64_t> stream_count;
  // BSP: the sequence number of the first push of the worker's open step (0: none yet), written
  // before that push is committed. A restarted worker that enters the same step skips the pushes
  // its predecessor committed in it (streamed BSP steps, Worker::push).
  std::atomic<std::uint64_t> step_first_seq;

  // Worker lines: statistics, written on every push and pull; only monitors read them.
  alignas(kCacheLine) std::atomic<std::uint64_t> heartbeat_ns;  // CLOCK_MONOTONIC
  std::atomic<std::uint64_t> pulls;
  std::atomic<std::uint64_t> pull_bytes;
  std::atomic<std::uint64_t> push_bytes;
  std::atomic<std::uint64_t> pushes_rejected;  // non-finite gradients refused before publishing
  std::atomic<std::uint64_t> last_staleness;   // clocks between this worker and the slowest live one, at its last pull
  std::atomic<std::uint64_t> max_staleness;    // the largest last_staleness seen
  std::atomic<std::uint64_t> wait_ns;          // time spent waiting in pulls (barrier, staleness bound)
  std::atomic<std::uint64_t> backpressure_ns;  // time pushes waited for room in the ring

  // Server line: progress, written every apply round that took from this ring; the slot's own
  // worker reads it (wait_applied, back-pressure, its futex).
  alignas(kCacheLine) std::atomic<std::uint64_t> applied;  // last push sequence number the server is done with (applied, or discarded)
  std::atomic<std::uint32_t> progress;         // futex word, bumped after each apply round
  std::atomic<std::uint32_t> reserved0;
  std::atomic<std::uint64_t> records_applied;
  std::atomic<std::uint64_t> records_discarded;  // pushes of a BSP step its generation never finished
  // The clock after the newest clock record the server consumed from this ring (its step + 1):
  // the step a restarted worker continues at when the ring's later records are gone (a restore
  // from a checkpoint).
  std::atomic<std::uint64_t> consumed_clock;
  // Streamed BSP: step + 1 of the newest step the server took pushes of from this ring into the
  // step sums. Stored before the ring's head moves past them: a worker whose open step is partly
  // in the sums counts for that step's barrier, alive or dead, until it (or its successor)
  // finishes the step.
  std::atomic<std::uint64_t> streamed_step;
  // The newest put record (sequence number) the server refused (Worker::put says why), stored
  // before `applied` passes it. Re-refusing the same record after a restart changes nothing.
  std::atomic<std::uint64_t> put_refused_seq;

  // Server line: membership, written when the server admits a generation or proves its holder
  // dead; every worker reads it on every pull (membership.hpp), so it is kept apart from the
  // per-round progress words above.
  alignas(kCacheLine) std::atomic<std::uint64_t> dead_generation;  // generation whose holder the server proved dead
  // Admission: the server admits each new generation between two apply rounds, with the clock it
  // enters at (BSP: the step being collected, or later). Only an admitted worker counts for a
  // barrier, and a BSP worker waits for its admission before its first step, so a step is never
  // decided around a worker that is half-way in.
  std::atomic<std::uint64_t> admitted_clock;
  std::atomic<std::uint64_t> admitted_generation;
  // Stragglers (BSP, SSP): the generation the server evicted from its group's barrier or bound
  // for holding it straggler_timeout_ms alone (docs/consistency.md#stragglers), and how far
  // behind it was then. An evicted generation never counts again (membership.hpp), the server
  // discards its open BSP step and every record it commits afterwards, and its worker's next
  // call fails; a new process taking the rank (a new generation) rejoins.
  std::atomic<std::uint64_t> evicted_generation;
  std::atomic<std::uint64_t> evicted_behind_ms;

  // Server line: the resume blob (a trainer's data cursor) of the last clock record that carried
  // one, copied here when the server consumed that record. A seqlock word guards the copy.
  alignas(kCacheLine) std::atomic<std::uint64_t> resume_version;
  std::atomic<std::uint64_t> resume_clock;  // the clock record's step
  std::atomic<std::uint32_t> resume_bytes;
  std::uint32_t resume_reserved;
  std::uint8_t resume[kResumeBlobBytes];
};
#define SHMPS_WORKER_SLOT_FIELDS(FIELD, PAD)                                                            \
  FIELD(state) FIELD(pid) FIELD(generation) FIELD(start_time) FIELD(attached_unix_ns) PAD(32)                   \
  FIELD(clock) PAD(56)                                                                                          \
  FIELD(published) FIELD(last_commit_seq) FIELD(last_commit_ns) FIELD(waiting) FIELD(stream_param)           \
  FIELD(stream_first_seq) FIELD(stream_offset) FIELD(stream_count) FIELD(step_first_seq)                          \
  FIELD(heartbeat_ns) FIELD(pulls) FIELD(pull_bytes) FIELD(push_bytes) FIELD(pushes_rejected)                  \
  FIELD(last_staleness) FIELD(max_staleness) FIELD(wait_ns) FIELD(backpressure_ns) PAD(56)                     \
  FIELD(applied) FIELD(progress) FIELD(reserved0) FIELD(records_applied) FIELD(records_discarded)              \
  FIELD(consumed_clock) FIELD(streamed_step) FIELD(put_refused_seq) PAD(8)                                                                                 \
  FIELD(dead_generation) FIELD(admitted_clock) FIELD(admitted_generation) FIELD(evicted_generation)     \
  FIELD(evicted_behind_ms) PAD(24)                              \
  FIELD(resume_version) FIELD(resume_clock) FIELD(resume_bytes) FIELD(resume_reserved) FIELD(resume) PAD(40)

// ---------------------------------------------------------------------------------------------
// The per-slot push ring: single producer (the slot's worker), single consumer (the server).
//
// Positions are byte counts since creation and never wrap; index = position % capacity.
// The producer writes a record at `tail` (header, then payload) and commits it with one
// release store of the new tail: a record past `tail` does not exist, so a worker killed
// mid-push leaves nothing behind. The consumer advances `head` (release) only after the
// records before it are applied, which is what lets the producer reuse their bytes.
//
// tail and head are two lines apart, with the read-only capacity between them: on their own
// lines, and never in one 128-byte pair of lines (which x86's adjacent-line prefetcher fetches
// together), wherever the header starts.
struct RingHeader {
  SHMPS_SHARED_IN_PLACE(RingHeader);

  alignas(kCacheLine) std::atomic<std::uint64_t> tail;  // producer (worker)
  std::uint8_t tail_pad[kCacheLine - 8];
  alignas(kCacheLine) std::uint64_t capacity;           // written once at creation
  std::uint8_t capacity_pad[kCacheLine - 8];
  alignas(kCacheLine) std::atomic<std::uint64_t> head;  // consumer (server)
  std::uint8_t head_pad[kCacheLine - 8];
};
#define SHMPS_RING_HEADER_FIELDS(FIELD, PAD) \
  FIELD(tail) FIELD(tail_pad) FIELD(capacity) FIELD(capacity_pad) FIELD(head) FIELD(head_pad)

// push: a gradient. clock: the end of the writer's step `clock` (Worker::clock()); in BSP the
// pushes of a step count only once their clock record follows them, so a worker that dies in
// the middle of a step contributes all of that step or none of it. A clock record may carry the
// worker's resume blob as its payload (`offset` holds its length in bytes), committed with the
// end of the step it describes. padding: filler to the end.
// put: the payload is values to set, not a gradient (Worker::put); numbered like a push.
// rows: gradient rows of a table (Worker::push_rows), numbered like a push: `offset` is the
// number of rows n, `count` their floats (n x the table's dim); the payload is the n rows, then,
// from the next 64-byte boundary, their n row ids (u64, record_ids). An id may repeat.
//
// Between servers (sync segments): sync_delta carries a slice's delta from group `generation`
// to the slice's home group, sync_fresh the home's values back; `offset` is the slice index,
// `count` its elements, `seq` the sync sequence number, and in sync_fresh `clock` the home's
// version word of the slice (0: nobody has written it there yet).
enum class RecordKind : std::uint32_t { push = 1, padding = 2, clock = 3, put = 4, sync_delta = 5, sync_fresh = 6, rows = 7 };

// A gradient: applied to the values (a push of a dense range, or rows of a table).
constexpr bool is_gradient(RecordKind kind) noexcept { return kind == RecordKind::push || kind == RecordKind::rows; }

// A record in a ring: this 64-byte header, then `count` float32 gradient values, padded so the
// next record starts on a 64-byte boundary. A record never wraps: if it does not fit before the
// end of the ring, the producer fills the rest with a padding record and starts at index 0. It
// does the same when the ring is empty and the record fits before its position (RingProducer:
// the lines in use stay few and cache-hot); the server gives such padding back at once, also in
// front of an open BSP step.
struct alignas(kCacheLine) PushRecord {
  SHMPS_SHARED_IN_PLACE(PushRecord);

  RecordKind kind;
  std::uint32_t param;         // index into the ParamEntry table
  std::uint64_t record_bytes;  // header + payload + padding; multiple of 64
  std::uint64_t offset;        // first element of the parameter this gradient covers
  std::uint64_t count;         // elements
  std::uint64_t seq;           // the slot's push sequence number (1, 2, ... over all generations)
  std::uint64_t generation;    // slot generation of the writer
  std::uint64_t clock;         // the writer's clock when it pushed
  double grad_sq_norm;         // squared L2 norm of the payload (for clipping by norm)
};
#define SHMPS_PUSH_RECORD_FIELDS(FIELD, PAD) \
  FIELD(kind) FIELD(param) FIELD(record_bytes) FIELD(offset) FIELD(count) FIELD(seq) FIELD(generation) FIELD(clock) \
  FIELD(grad_sq_norm)

constexpr std::uint64_t record_bytes_for(std::uint64_t count) noexcept {
  return sizeof(PushRecord) + align_up(count * sizeof(float), kCacheLine);
}
// A rows record of `rows` ids and `floats` gradient floats: header, rows, ids.
constexpr std::uint64_t rows_record_bytes(std::uint64_t rows, std::uint64_t floats) noexcept {
  return record_bytes_for(floats) + align_up(rows * sizeof(std::uint64_t), kCacheLine);
}
// Whether a record's sizes are those of a well-formed rows record (the server checks the ids and
// the row width against the table separately).
constexpr bool rows_record_plausible(const PushRecord& r) noexcept {
  return r.offset != 0 && r.offset < (std::uint64_t{1} << 32) && r.count % r.offset == 0 &&
         r.count / r.offset <= (std::uint64_t{1} << 20) && rows_record_bytes(r.offset, r.count) == r.record_bytes;
}

// ---------------------------------------------------------------------------------------------
// SyncSegmentHeader: the sync segment of server group `origin` (<job>.g<origin>.sync), which only
// servers map. It holds two rings per server group d (those of `origin` itself unused): server
// `origin` produces sync records into them (RingProducer) and server d consumes them
// (RingConsumer): channel 0 carries deltas to the slices' home group d, channel 1 answers (fresh
// values) to requester d. Two channels, so that answers never wait behind deltas: a server
// always drains its answers (taking them needs no room anywhere), so a home always finds room
// to answer eventually, and two groups full of each other's deltas cannot deadlock. The records
// are PushRecords of kind sync_delta and sync_fresh; the rings are the workers' rings.
//
//   SyncSegmentHeader | per group d, per channel c: RingHeader + ring_bytes of records, at
//                       rings_offset + (2 d + c) ring_stride
struct alignas(kCacheLine) SyncSegmentHeader {
  SHMPS_SHARED_IN_PLACE(SyncSegmentHeader);

  std::uint64_t magic;           // kSyncMagic
  std::uint32_t layout_version;  // kLayoutVersion
  std::uint32_t server_groups;
  std::uint64_t fingerprint;     // kLayoutFingerprint
  std::uint64_t total_bytes;
  std::uint64_t ring_bytes;
  std::uint64_t ring_stride;
  std::uint32_t origin;          // the server group that produces into its rings
  std::atomic<std::uint32_t> state;  // SegmentState: "ready" once the rings are laid out
  std::uint64_t rings_offset;
  // Second line: which sync segment this is. A peer that maps it notices from created_unix_ns
  // that it was replaced (its group's replica was made again) and maps the new one; spec_hash
  // is the replica's (SegmentHeader::spec_hash): a peer serving another model refuses it.
  std::uint64_t created_unix_ns;
  std::uint64_t spec_hash;
  std::uint64_t reserved[6];
};
#define SHMPS_SYNC_SEGMENT_HEADER_FIELDS(FIELD, PAD)                                                       \
  FIELD(magic) FIELD(layout_version) FIELD(server_groups) FIELD(fingerprint) FIELD(total_bytes) FIELD(ring_bytes) \
  FIELD(ring_stride) FIELD(origin) FIELD(state) FIELD(rings_offset) FIELD(created_unix_ns) FIELD(spec_hash)        \
  FIELD(reserved)
inline constexpr std::uint64_t kSyncMagic = 0x3153594e53530a7fULL;  // "\x7f\nSSNYS1" little-endian

// ---------------------------------------------------------------------------------------------
// Static checks: sizes, alignment, standard layout.
static_assert(std::is_standard_layout_v<SegmentHeader>);
static_assert(std::is_standard_layout_v<ParamEntry>);
static_assert(std::is_standard_layout_v<SliceEntry>);
static_assert(std::is_standard_layout_v<WorkerSlot>);
static_assert(std::is_standard_layout_v<RingHeader>);
static_assert(std::is_standard_layout_v<PushRecord>);
static_assert(sizeof(SegmentHeader) % kCacheLine == 0);
static_assert(sizeof(SliceEntry) == kCacheLine);
static_assert(sizeof(WorkerSlot) % kCacheLine == 0);
static_assert(sizeof(RingHeader) == 3 * kCacheLine);
static_assert(sizeof(PushRecord) == kCacheLine);
static_assert(sizeof(RedoEntry) == 2 * kCacheLine);
static_assert(sizeof(SyncSlice) == 32);
static_assert(sizeof(SyncSegmentHeader) == 2 * kCacheLine);
static_assert(sizeof(RedoInput) == 24);
static_assert(sizeof(ParamStats) == 2 * kCacheLine);
static_assert(sizeof(ParamEntry) % 8 == 0);

// The false-sharing audit above, as checks: words that different processes write, or that one
// writes often while others read another word, are on different lines.
constexpr std::size_t line_of(std::size_t offset) noexcept { return offset / kCacheLine; }
// WorkerSlot: worker-written groups apart from server-written ones...
static_assert(offsetof(WorkerSlot, applied) % kCacheLine == 0, "server line must not share a cache line with worker lines");
static_assert(line_of(offsetof(WorkerSlot, heartbeat_ns) + 9 * 8 - 1) < line_of(offsetof(WorkerSlot, applied)),
              "the worker's statistics end before the server's lines");
static_assert(line_of(offsetof(WorkerSlot, consumed_clock)) < line_of(offsetof(WorkerSlot, dead_generation)),
              "per-round progress and membership are on different lines");
// ... and, within the worker's, the words others read hot apart from those written per push or pull.
static_assert(line_of(offsetof(WorkerSlot, clock)) != line_of(offsetof(WorkerSlot, published)) &&
                  line_of(offsetof(WorkerSlot, clock)) != line_of(offsetof(WorkerSlot, heartbeat_ns)) &&
                  line_of(offsetof(WorkerSlot, clock)) != line_of(offsetof(WorkerSlot, generation)),
              "a worker's step clock, read by every other worker on every pull, has a line of its own");
static_assert(line_of(offsetof(WorkerSlot, waiting)) == line_of(offsetof(WorkerSlot, published)) &&
                  line_of(offsetof(WorkerSlot, waiting)) != line_of(offsetof(WorkerSlot, backpressure_ns)),
              "the hand-off to the server is one line, apart from the statistics");
static_assert(line_of(offsetof(WorkerSlot, backpressure_ns)) < line_of(offsetof(WorkerSlot, applied)));
static_assert(line_of(offsetof(WorkerSlot, admitted_generation)) < line_of(offsetof(WorkerSlot, resume_version)));
// RingHeader: the worker's tail and the server's head.
static_assert(offsetof(RingHeader, head) - offsetof(RingHeader, tail) == 2 * kCacheLine,
              "tail and head: separate lines, and separate 128-byte pairs");
// SegmentHeader: the groups on separate lines.
static_assert(line_of(offsetof(SegmentHeader, huge_bytes)) == line_of(offsetof(SegmentHeader, state)),
              "the huge-page words fit the server's liveness line");
static_assert(line_of(offsetof(SegmentHeader, server_heartbeat_ns)) != line_of(offsetof(SegmentHeader, consistency)) &&
                  line_of(offsetof(SegmentHeader, server_heartbeat_ns)) != line_of(offsetof(SegmentHeader, server_sleeping)),
              "the server's heartbeat, written every loop, is not on a line workers read per push or pull");
static_assert(line_of(offsetof(SegmentHeader, records_applied)) != line_of(offsetof(SegmentHeader, server_sleeping)) &&
                  line_of(offsetof(SegmentHeader, records_applied)) != line_of(offsetof(SegmentHeader, consistency)),
              "per-round counters are not on a line workers read");
static_assert(offsetof(SegmentHeader, mailbox_state) % kCacheLine == 0);

// ---------------------------------------------------------------------------------------------
// The layout fingerprint: every field of every shared type (from the field lists: name, offset,
// size, kind), the Boost version and the compiler. Two builds share a segment only if their
// fingerprints are equal (LMDB's MDB_LOCK_FORMAT idea).
SHMPS_DESCRIBE_FIELDS(OptimizerSettings, SHMPS_OPTIMIZER_SETTINGS_FIELDS);
SHMPS_DESCRIBE_FIELDS(SegmentHeader, SHMPS_SEGMENT_HEADER_FIELDS);
SHMPS_DESCRIBE_FIELDS(ParamEntry, SHMPS_PARAM_ENTRY_FIELDS);
SHMPS_DESCRIBE_FIELDS(SliceEntry, SHMPS_SLICE_ENTRY_FIELDS);
SHMPS_DESCRIBE_FIELDS(ParamStats, SHMPS_PARAM_STATS_FIELDS);
SHMPS_DESCRIBE_FIELDS(GroupEntry, SHMPS_GROUP_ENTRY_FIELDS);
SHMPS_DESCRIBE_FIELDS(RedoEntry, SHMPS_REDO_ENTRY_FIELDS);
SHMPS_DESCRIBE_FIELDS(RedoInput, SHMPS_REDO_INPUT_FIELDS);
SHMPS_DESCRIBE_FIELDS(WorkerSlot, SHMPS_WORKER_SLOT_FIELDS);
SHMPS_DESCRIBE_FIELDS(RingHeader, SHMPS_RING_HEADER_FIELDS);
SHMPS_DESCRIBE_FIELDS(PushRecord, SHMPS_PUSH_RECORD_FIELDS);
SHMPS_DESCRIBE_FIELDS(SyncSlice, SHMPS_SYNC_SLICE_FIELDS);
SHMPS_DESCRIBE_FIELDS(SyncSegmentHeader, SHMPS_SYNC_SEGMENT_HEADER_FIELDS);
SHMPS_DESCRIBE_FIELDS(KeySlot, SHMPS_KEY_SLOT_FIELDS);
SHMPS_DESCRIBE_FIELDS(KeyIndexHeader, SHMPS_KEY_INDEX_HEADER_FIELDS);
SHMPS_DESCRIBE_FIELDS(KeyBucket, SHMPS_KEY_BUCKET_FIELDS);
SHMPS_DESCRIBE_FIELDS(KeyedInit, SHMPS_KEYED_INIT_FIELDS);

namespace detail {
template <class... Types>
constexpr std::uint64_t layout_fingerprint(std::uint64_t h) noexcept {
  ((h = type_fingerprint(h, FieldsOf<Types>::name, sizeof(Types), alignof(Types), FieldsOf<Types>::list)), ...);
  return h;
}
}  // namespace detail

// Every type that lives in the segment, in the order they are hashed.
inline constexpr std::uint64_t kLayoutFingerprint = [] {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::uint64_t v : {std::uint64_t{kLayoutVersion}, std::uint64_t{BOOST_VERSION}, std::uint64_t{__GNUC__},
                          std::uint64_t{__GNUC_MINOR__}})
    h = detail::fnv1a(h, v);
  h = detail::layout_fingerprint<SegmentHeader, OptimizerSettings, ParamEntry, SliceEntry, ParamStats, GroupEntry, RedoEntry, RedoInput,
                                 WorkerSlot, RingHeader, PushRecord, SyncSlice, SyncSegmentHeader, KeySlot,
                                 KeyIndexHeader, KeyBucket, KeyedInit>(h);
  return detail::fnv1a_str(h, __VERSION__);
}();

// ---------------------------------------------------------------------------------------------
// Typed access from a mapped base address. Offsets come from the header, which the opener has
// validated (magic, version, fingerprint, size) before calling any of these.
template <class T>
inline T* at(void* base, std::uint64_t offset) noexcept {
  return reinterpret_cast<T*>(static_cast<std::byte*>(base) + offset);
}
template <class T>
inline const T* at(const void* base, std::uint64_t offset) noexcept {
  return reinterpret_cast<const T*>(static_cast<const std::byte*>(base) + offset);
}

}  // namespace shmps::shm
