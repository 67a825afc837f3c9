// Checkpoints: the whole state of a job in one safetensors file, and the way back from it.
//
// ---- The checkpoint file -------------------------------------------------------------------
//
// A safetensors file (safetensors.hpp: 8-byte header length, JSON header, data section aligned
// to 8 bytes, FNV-1a checksum "shmps.checksum" over the data section) that PyTorch, numpy and
// `safetensors.torch.load_file` open as they are. Tensors, in segment order:
//
//   <param>                 F32, the parameter's shape        its values ("fc1.weight"); BF16 or
//                                                             F16 for a parameter of dtype bf16 or
//                                                             fp16 (its stored bytes)
//   <param>/<kind>.<array>  F32, the parameter's shape        optimizer state: momentum.v,
//                                                             nesterov.v, adagrad.s, rmsprop.s,
//                                                             adam.m and adam.v
//   <table>/adam.step       I64 [rows]                        lazy Adam: each table row's steps
//   <table>/rowwise_adagrad.s  F64 [rows]                     row-wise AdaGrad: each row's accumulator
//   shmps/slice_version     I64 [slices]                      seqlock word of every slice (even)
//   shmps/slice_clock       I64 [slices]                      BSP clock of every slice
//   shmps/slice_step        I64 [slices]                      optimizer steps of every slice
//   shmps/last_applied      I64 [slices, max_workers]         the exactly-once table
//
// A replica of a job with server groups also holds its sync tables (sync_engine.hpp), with
// metadata shmps.server_group, shmps.server_groups and shmps.sync_seq:
//   <param>/sync.base, <param>/sync.sent   F32, the parameter's shape   values at the last sync,
//                                                             and the delta in flight
//   shmps/sync_sent_seq, shmps/sync_synced_seq, shmps/sync_clean_version   I64 [slices]
//   shmps/sync_applied      I64 [slices, server_groups]       the home's exactly-once table
// A restore into the same group of a job with as many groups takes them; any other restore
// starts the replica's sync afresh from its values (every replica restored from one file).
//
// Everything else is in "__metadata__" (strings; JSON where it is a structure):
//   shmps.format          "shmps-checkpoint-1"
//   shmps.segment         the job's segment name
//   shmps.taken_unix_ns   when the snapshot was taken
//   shmps.epoch           the server epoch that took it
//   shmps.model_clock     BSP: the step the slowest worker group was collecting
//   shmps.group_clocks    [12, 9]: BSP: the step each worker group was collecting (every push
//                         of its earlier steps is in the values); absent in older checkpoints
//   shmps.workers_per_group  the grouping of group_clocks: a restore gives them to the groups
//                         only when its grouping is the same (else every group at model_clock)
//   shmps.consistency     "asp", "bsp" or "ssp:N"; shmps.bsp_aggregate; shmps.on_worker_death
//   shmps.optimizer       {"kind": "adam", "lr": 0.001, ...} every OptimizerSettings field
//   shmps.optimizer.<table>  the same for a table with its own optimizer (absent: the job's)
//   shmps.slice_floats    elements per slice; shmps.max_workers: worker slots
//   shmps.counters        {"steps", "records_applied", "records_skipped", "records_discarded",
//                          "floats_applied", "apply_rounds"}
//   shmps.slots           [{"rank", "state", "generation", "applied", "consumed_clock",
//                           "resume_clock", "resume": hex, "records_applied",
//                           "records_discarded"}] for every slot ever used
//   shmps.params          ["fc1.weight", ...] the parameters, in segment order
//   shmps.version.<param> "lo..hi": the smallest and largest update count of its slices
//
// The snapshot is taken by the server between two apply rounds, so it is one consistent state
// of the whole job in every mode: in BSP it is at a clock boundary of every worker group (with
// one group, every slice at the same clock); in ASP and SSP every slice holds whole updates and
// its version is recorded.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <tbb/task_arena.h>

#include <shmps/server/model_spec.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::server {

inline constexpr std::string_view kCheckpointFormat = "shmps-checkpoint-1";

// The state of a job, copied out of its segment (or read from a file).
struct Snapshot {
  struct Param {
    std::string name;
    std::vector<std::uint64_t> shape;
    // The values as float32; a bf16 or fp16 parameter's widened exactly (`dtype` says which, and
    // the file stores them as BF16 / F16 tensors again).
    std::vector<float> values;
    shm::DType dtype = shm::DType::f32;
    // The parameter's optimizer: the job's (Snapshot::optimizer), or a table's own.
    OptimizerSettings optimizer;
    std::vector<float> state[2];  // optimizer_state_arrays(optimizer.kind) of them are used
    // A table whose optimizer keeps row words (ParamEntry::row_words_offset), one per row: lazy
    // Adam's step counts, or row-wise AdaGrad's accumulators as the bits of doubles; empty otherwise.
    std::vector<std::int64_t> row_words;
    // A table with keys = "u64" (ParamEntry::key_slots_offset), one per slot: the key it holds
    // (its bits as an int64) and its stamp (0: a free slot; else the order of its last update).
    // The tensors "<table>/keys" and "<table>/key_stamps"; empty otherwise.
    std::vector<std::int64_t> keys, key_stamps;
    std::vector<float> sync_base, sync_sent;  // server groups (`sync` below), else empty
  };
  // A replica of a job with server groups: its sync tables (sync_engine.hpp), so that a restore
  // of this replica alone (a multi-host checkpoint's part) goes on syncing where it stopped.
  struct Sync {
    std::uint32_t server_group = 0, server_groups = 0;
    std::uint64_t seq = 0;                                          // the last round's number
    std::vector<std::int64_t> sent_seq, synced_seq, clean_version;  // per slice
    std::vector<std::int64_t> applied;                              // [slice][server_groups]
  };
  struct Slot {
    std::uint32_t rank = 0;
    std::uint32_t state = 0;  // SlotState
    std::uint64_t generation = 0;
    std::uint64_t applied = 0;         // pushes the server is done with (the restored published count)
    std::uint64_t consumed_clock = 0;  // the step a restarted worker continues at
    std::uint64_t resume_clock = 0;
    std::vector<std::byte> resume;     // the resume blob (Worker::load_state)
    std::uint64_t records_applied = 0;
    std::uint64_t records_discarded = 0;
  };
  std::string segment;
  std::uint64_t taken_unix_ns = 0;
  std::uint64_t epoch = 0;
  std::uint64_t model_clock = 0;           // the slowest group's clock
  std::vector<std::uint64_t> group_clocks;  // one per worker group (empty: every group at model_clock)
  std::uint32_t workers_per_group = 0;      // the grouping group_clocks belong to (0: not recorded)
  Consistency consistency = Consistency::asp;
  std::uint32_t staleness = 0;
  BspAggregate bsp_aggregate = BspAggregate::sum;
  OnWorkerDeath on_worker_death = OnWorkerDeath::proceed;
  OptimizerSettings optimizer;
  std::uint64_t slice_floats = 0;
  std::uint32_t max_workers = 0;
  std::uint64_t steps = 0, records_applied = 0, records_skipped = 0, records_discarded = 0, floats_applied = 0,
                apply_rounds = 0;
  std::vector<Param> params;
  std::vector<std::int64_t> slice_version, slice_clock, slice_step;  // per slice, segment order
  std::vector<std::int64_t> last_applied;                            // [slice][max_workers]
  std::vector<Slot> slots;                                           // slots ever used
  std::optional<Sync> sync;                                          // server groups only

  // Bytes of tensor data in the file (parameters, optimizer state, slice tables).
  std::uint64_t data_bytes() const noexcept;
};

// Copies the whole state of `segment` into `out`, reusing its buffers (so a periodic checkpoint
// allocates once). The caller is the server, between two apply rounds: nothing it copies can
// change meanwhile (workers write only their own slot lines and rings, which are not copied
// except the slot's generation and state, read atomically).
void take_snapshot(const shm::Segment& segment, tbb::task_arena& arena, Snapshot& out);

// The tensor of a table's row words after "<table>/", and its dtype: lazy Adam's step counts
// ("adam.step", I64), row-wise AdaGrad's accumulators ("rowwise_adagrad.s", F64); both empty for
// an optimizer that keeps none.
struct RowWordsTensor {
  std::string suffix, dtype;
};
RowWordsTensor row_words_tensor(OptimizerKind kind);

// Writes `snapshot` to `path` atomically and durably (temporary file, fsync, rename, fsync of
// the directory). On failure the previous file at `path` is intact. Kill points (tests):
// "checkpoint.mid_write" (half of the data written), "checkpoint.before_rename".
void write_checkpoint(const Snapshot& snapshot, const std::filesystem::path& path, unsigned mode = 0600);

// Reads and validates a checkpoint file: the safetensors format and checksum, the shmps
// metadata, every companion tensor's dtype and shape, every parameter's optimizer state.
// Throws shmps::Error "<path>: <what is wrong>".
Snapshot read_checkpoint(const std::filesystem::path& path);

// Checks that `snapshot` (read from `path`) can be restored into a segment laid out by `plan`
// for `spec`: the same parameters in the same order with the same shapes, the same optimizer
// kind, the same slice size, and enough worker slots. Throws shmps::Error "<path>: <problem>".
void check_restorable(const Snapshot& snapshot, const std::filesystem::path& path, const ModelSpec& spec,
                      const shm::LayoutPlan& plan);

// Writes `snapshot` into a segment that the server is creating (its layout already written):
// values, optimizer state, slice versions, clocks and steps, the exactly-once table, the policy,
// the optimizer settings, the counters and the worker slots (their holders are gone: each slot is
// marked dead, so a restarted worker takes it over and resumes from its resume blob).
void restore_into(shm::Segment& segment, const Snapshot& snapshot);
// Server groups: the snapshot's sync tables into the replica being created (a multi-host
// checkpoint's part). Throws shmps::Error if the snapshot holds none of the same group of as many
// groups: without them, deltas in flight would be lost.
void restore_sync_tables(shm::Segment& segment, const Snapshot& snapshot);

// The checkpoints of one job in a directory: "<segment>.<serial>.safetensors", serial 8 digits,
// increasing. Writing one picks the next serial; pruning keeps the newest `keep`.
class CheckpointDir {
 public:
  CheckpointDir(std::filesystem::path dir, std::string segment);
  const std::filesystem::path& dir() const noexcept { return dir_; }

  // The job's checkpoint files, oldest first (by serial).
  // Only this user's regular files: a symbolic link or another user's file named like a
  // checkpoint is never listed, so never restored or pruned (newest_valid reports it skipped).
  std::vector<std::filesystem::path> list() const;
  // Why `path` is not one of this user's checkpoint files ("" if it is).
  static std::string foreign(const std::filesystem::path& path);
  std::filesystem::path next_path() const;
  // Removes the oldest checkpoints beyond `keep` (keep 0: keep all); returns how many.
  std::size_t prune(std::size_t keep) const;
  // Removes temporary files a killed server left ("<segment>.<serial>.safetensors.tmp-<pid>");
  // call only while holding the server lock. Returns how many.
  std::size_t remove_temporaries() const;

  // The newest checkpoint that reads back valid, or nothing if there is no checkpoint. Invalid
  // newer ones are skipped and reported in `skipped` ("<path>: <problem>"). Throws shmps::Error if
  // there are checkpoints but none is valid.
  struct Found {
    std::filesystem::path path;
    Snapshot snapshot;
  };
  std::optional<Found> newest_valid(std::vector<std::string>& skipped) const;

 private:
  std::filesystem::path dir_;
  std::string segment_;
  std::vector<std::filesystem::path> scan(bool own_only) const;
};

// "30s", "5m", "2h", "500ms" (a period) or "100clocks" (every 100 clocks). Returns "" or what is
// wrong with `text`.
struct CheckpointEvery {
  std::chrono::milliseconds period{0};  // 0: not by time
  std::uint64_t clocks = 0;             // 0: not by clock
};
std::string parse_checkpoint_every(std::string_view text, CheckpointEvery& out);

}  // namespace shmps::server
