// The model spec: a TOML file that names a job's segment, lists its parameters with their
// shapes and initial values, and sets the server's optimizer and consistency mode.
//
// ---- Model spec format (TOML) -------------------------------------------------------------
//
//   name = "mlp"            # required. The segment name: 1 to 63 characters, letters, digits,
//                           #   '.', '_' and '-' only, not starting with '.' or '-', not
//                           #   ending in ".lock".
//   slice_bytes = 65536     # optional, default 65536. Bytes per slice (the unit of versioning,
//                           #   locking and parallel apply): a multiple of 64, 64 to 2^30.
//   max_workers = 8         # optional, default 16. Worker slots: 1 to 1024.
//   workers_per_group = 4   # optional, default 0 = every worker in one group. Worker groups
//                           #   (SINGA's nworkers_per_group): rank r is in group
//                           #   r / workers_per_group; BSP steps and SSP bounds hold inside a
//                           #   group, groups run asynchronously. 1 to max_workers.
//   ring_bytes = 0          # optional, default 0 = sized by the server: room for two pushes
//                           #   of the largest parameter (a push may use at most half a ring),
//                           #   for one whole step in BSP, at least 1 MiB and at most 32 MiB
//                           #   (shm/segment.hpp, kMinRingBytes): bigger pushes and BSP steps
//                           #   stream through it. Bytes of each worker's push ring: a multiple of
//                           #   64, at most 2^40. shmps-server --plan shows what it costs.
//   server_threads = 2      # optional, default 0 = all cores. At most 4096.
//   consistency = "asp"     # optional, default "asp". "asp" (asynchronous), "bsp" (bulk
//                           #   synchronous) or "ssp:N" (stale synchronous, bound N >= 0 clocks,
//                           #   e.g. "ssp:3").
//   bsp_aggregate = "sum"   # optional, default "sum". BSP: a step's gradients are summed in
//                           #   rank order ("sum") or their sum is divided by the number of
//                           #   workers that contributed to the slice ("mean").
//   on_worker_death = "proceed"  # optional. When a worker's death is proven, BSP barriers and
//                           #   SSP bounds go on without it ("proceed"), or wait until a process
//                           #   takes its slot again ("wait").
//   straggler_timeout = "10s"  # optional, default "10s". BSP: a live worker that alone holds its
//                           #   group's barrier this long (every other live member has ended the
//                           #   step) is evicted as a straggler: the barrier goes on without it,
//                           #   its open step is discarded, and its next call fails; a new
//                           #   process of its rank rejoins (docs/consistency.md#stragglers).
//                           #   SSP: the same for the slowest members while another is past
//                           #   the bound (every push they committed is applied first).
//                           #   "500ms", "2s", "1m", or "0" / "off" (never evict). Below the
//                           #   workers' 30 s call timeout, so that healthy workers do not fail
//                           #   first. At most 24 days.
//   sync_every = "100ms"    # optional, default "100ms". Server groups (shmps-launch
//                           #   --server-groups): how often a group sends the deltas of its
//                           #   changed slices to their home groups: a period ("100ms", "2s") or
//                           #   a number of applied pushes ("50updates"). In BSP a group's
//                           #   writes of synced values wait for its next step boundary.
//
//   [optimizer]             # required (lr has no default)
//   kind = "sgd"            # optional, default "sgd". sgd | momentum | nesterov | adagrad |
//                           #   rmsprop | adam
//   lr = 0.05               # required, > 0
//   momentum = 0.9          # momentum, nesterov only; [0, 1), default 0.9
//   beta1 = 0.9             # adam only; [0, 1), default 0.9
//   beta2 = 0.999           # adam only; [0, 1), default 0.999
//   rho = 0.99              # rmsprop only; [0, 1), default 0.99
//   eps = 1e-8              # adagrad, rmsprop, adam only; > 0, default 1e-8
//   weight_decay = 0.0      # optional, >= 0, default 0 (L2, added to the gradient)
//   clip_value = 0.0        # optional, >= 0, default 0 = off (clamp each gradient element)
//   clip_norm = 0.0         # optional, >= 0, default 0 = off (scale each push to this L2 norm)
//   state_dtype = "f32"     # momentum, nesterov, adagrad, rmsprop, adam only; "f32" (default) or
//                           #   "bf16": the state arrays stored as bfloat16 (half the memory;
//                           #   math in float32, rounded to nearest even on store)
//   # Setting a key that the chosen kind does not use (e.g. momentum with kind = "sgd") is an
//   # error, so that a forgotten `kind` does not silently ignore it. Numbers may be written as
//   # integers (lr = 1). Values are stored as float32 and checked after rounding.
//
//   [[param]]               # one table per parameter, at least one (or a [[table]]), in segment order
//   name = "fc1.weight"     # required, unique. 1 to 63 bytes, no spaces or control characters.
//   shape = [256, 784]      # required. 1 to 8 positive integers, row-major; at most 2^48 bytes
//                           #   (2^46 float32 elements) per parameter and in total.
//   init = "zeros"          # optional, default "zeros". Or "put": zeros until a worker puts the
//                           #   values (Worker::put); pulls and views wait for it. Or a table:
//                           #   { kind = "zeros" }
//                           #   { kind = "constant", value = 0.5 }
//                           #   { kind = "u24", stream = 11, scale = 0.0625 }  # scale default 1
//                           #   { kind = "u24", stream = 11, scale_divisor = 28 }
//                           # u24: element k (row-major flat index) is
//                           #   u24(draw k of SplitMix64 stream `stream`) * scale, one float32
//                           #   multiply (shmps/splitmix.hpp). scale_divisor = d means
//                           #   scale = float32(1.0 / d), so reference inits can be written
//                           #   exactly. stream: an integer >= 0 (hex allowed: 0x1f).
//                           #   { kind = "pretrained", file = "weights.safetensors" }
//                           #   { kind = "pretrained", file = "w.safetensors", tensor = "enc.w" }
//                           # pretrained: the values of tensor `tensor` (default: the
//                           #   parameter's own name) of a safetensors file. `file` is
//                           #   resolved relative to the directory of the spec file (for a
//                           #   spec parsed from a string: to the current directory); the
//                           #   tensor must exist, have dtype F32, BF16 or F16 (widened
//                           #   exactly), exactly the parameter's shape and finite values
//                           #   (so an export of a bf16 job can start another job of any
//                           #   dtype). The parser does not open the file:
//                           #   load_pretrained (initialise.hpp) reads and checks it.
//   dtype = "f32"           # optional, default "f32". How the segment stores the values:
//                           #   "f32", "bf16" (bfloat16) or "fp16" (IEEE half): 2 bytes an
//                           #   element, half the memory and the pull traffic. Gradients are
//                           #   pushed as float32, the optimizer runs in float32 (its state in
//                           #   optimizer.state_dtype), and the new values are rounded to nearest
//                           #   even once per update; initial values are rounded the same way.
//                           #   Not with server groups (refused at start). Not on a [[table]].
//
//   [[table]]               # optional, any number: an embedding table, reached by row
//   name = "emb"            # required; parameters and tables share one namespace
//   rows = 1048576          # required, 1 to 2^40
//   dim = 16                # required, 1 to 2^20 floats per row; must divide slice_bytes / 4
//   init = ...              # as a [[param]]'s, row-major
//   dtype = "f32"           # optional, as a [[param]]'s: "bf16" / "fp16" rows in 2 bytes
//   optimizer = { ... }     # optional: the table's own, with [optimizer]'s keys but state_dtype
//   keys = "u64"            # optional: ids are any 64-bit keys, not row numbers; `rows` is then the
//                           #   number of slots, a key gets one at its first push (or its
//                           #   admit_after-th), the least recently updated is evicted when all
//                           #   are taken. init must be zeros, constant or u24; f32 only; not
//                           #   with server groups.
//   admit_after = 1         # optional, with keys only: a key gets a slot at its admit_after-th
//                           #   pushed row (1: its first); the rows before it are dropped
//                           # A table is a parameter of shape [rows, dim] (ParamSpec::table_dim);
//                           # with adam it is stepped as lazy Adam (a step count per row).
//
// Unknown keys are errors (the message lists the valid keys), as are duplicate parameter
// names. Every error is a SpecError whose message reads
//   <file>:<line>:<col>: <field>: <problem>
// e.g. "models/mlp.toml:7:6: optimizer.lr: must be a positive number, got -0.1". Fields are
// written as paths: name, optimizer.lr, param[2].shape (0-based index), param[0].init.stream.
// A missing key is reported at the table that should hold it; a TOML syntax error at its own
// position as "<file>:<line>:<col>: syntax error: <description>".
// ---------------------------------------------------------------------------------------------
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "shmps/shm/dtype.hpp"
#include "shmps/shm/settings.hpp"
#include "shmps/splitmix.hpp"

namespace shmps::server {

struct InitSpec {
  // put: zeros until a worker puts the values (Worker::put); pulls wait for the put.
  enum class Kind { zeros, constant, u24, pretrained, put } kind = Kind::zeros;
  float value = 0;             // constant
  std::uint64_t stream = 0;    // u24
  float scale = 1;             // u24
  std::filesystem::path file;  // pretrained: the safetensors file, already resolved (see above)
  std::string tensor;          // pretrained: the tensor's name in the file (the parser sets it
                               //   to the parameter's name when the spec does not give one)
};

std::string_view to_string(InitSpec::Kind kind) noexcept;

// The initial value of element k (row-major flat index) of a parameter initialised by init.
// Kind::pretrained cannot be computed from the spec alone: it returns 0, and callers must take
// the values from load_pretrained (initialise.hpp) instead.
inline float initial_value(const InitSpec& init, std::uint64_t k) noexcept {
  switch (init.kind) {
    case InitSpec::Kind::zeros:
      return 0.0f;
    case InitSpec::Kind::constant:
      return init.value;
    case InitSpec::Kind::u24:
      return u24(splitmix_draw(init.stream, k)) * init.scale;
    case InitSpec::Kind::pretrained:
      return 0.0f;  // not known here: see load_pretrained
    case InitSpec::Kind::put:
      return 0.0f;  // until a worker puts it
  }
  return 0.0f;
}

// Server groups: when a group sends its deltas to the slices' home groups (sync_every).
struct SyncEvery {
  std::chrono::milliseconds period{100};  // 0: not by time
  std::uint64_t updates = 0;              // 0: not by updates: sync after this many applied pushes
};

struct ParamSpec {
  std::string name;
  std::vector<std::uint64_t> shape;
  InitSpec init;
  // A [[table]]: the row width (shape is {rows, table_dim}); 0 for a [[param]].
  std::uint64_t table_dim = 0;
  // How the segment stores the values (`dtype`): float32, bf16 or fp16.
  shm::DType dtype = shm::DType::f32;
  // A [[table]]'s own `optimizer = { ... }`, if it has one (its state_dtype is the job's); else
  // the job's [optimizer] updates it.
  std::optional<OptimizerSettings> optimizer = std::nullopt;
  // A [[table]] with keys = "u64": ids are open-ended 64-bit keys, each given one of the `rows`
  // slots at its admit_after-th pushed row (1: its first), the least recently updated evicted when
  // none is free (shm::ParamEntry::key_slots_offset).
  bool keyed = false;
  std::uint32_t admit_after = 1;
  std::uint64_t size() const;  // number of elements: the product of shape (saturates at 2^64-1)
};

// The documented default of straggler_timeout: below the workers' 30 s call timeout
// (WorkerOptions::timeout), so that a stuck worker is evicted before the healthy ones fail.
inline constexpr std::chrono::milliseconds kDefaultStragglerTimeout{10'000};

struct ModelSpec {
  std::string name;  // segment name
  std::uint64_t slice_bytes = 65536;
  std::uint32_t max_workers = 16;
  std::uint32_t workers_per_group = 0;  // 0 = every worker in one group
  std::uint64_t ring_bytes = 0;      // per worker ring; 0 = automatic (the server sizes it)
  std::uint32_t server_threads = 0;  // 0 = all cores
  Consistency consistency = Consistency::asp;
  std::uint32_t staleness = 0;  // ssp only
  BspAggregate bsp_aggregate = BspAggregate::sum;
  OnWorkerDeath on_worker_death = OnWorkerDeath::proceed;
  // BSP and SSP: a straggler is evicted from its group's barrier or bound after this long; 0: never.
  std::chrono::milliseconds straggler_timeout = kDefaultStragglerTimeout;
  SyncEvery sync_every;
  OptimizerSettings optimizer;
  std::vector<ParamSpec> params;
  std::string source;  // file path or "<string>", for messages
};

class SpecError : public std::runtime_error {
 public:
  using runtime_error::runtime_error;
};

// Limits of the format (see above). The name and dimension limits are those of the segment
// layout (shm/layout.hpp: 64-byte NUL-terminated names, 8 dimensions);
// model_spec_rules.cpp checks that they agree.
inline constexpr std::size_t kMaxSegmentNameLength = 63;
inline constexpr std::size_t kMaxParamNameBytes = 63;
inline constexpr std::size_t kMaxParamDims = 8;
inline constexpr std::uint64_t kMaxParamBytes = std::uint64_t{1} << 48;  // per param and total
inline constexpr std::uint64_t kMaxSliceBytes = std::uint64_t{1} << 30;
inline constexpr std::uint32_t kMaxWorkersLimit = 1024;
inline constexpr std::uint64_t kMaxRingBytes = std::uint64_t{1} << 40;
inline constexpr std::uint32_t kMaxServerThreads = 4096;

// Reads and parses a model spec file; errors name the file as `path` is written. Relative
// pretrained `file` paths are resolved against path.parent_path(). Throws SpecError (also for a
// file that cannot be read).
ModelSpec load_model_spec(const std::filesystem::path& path);

// Parses a model spec from text; source_name stands for the file in messages ("<string>" if
// empty). Relative pretrained `file` paths are resolved against base_dir (empty: left relative,
// i.e. to the current directory); load_model_spec passes the spec file's directory. Does not
// open any file. Throws SpecError.
ModelSpec parse_model_spec(std::string_view toml_text, std::string_view source_name,
                           const std::filesystem::path& base_dir = {});

// "" if `name` can be a segment name, else what is wrong with it, e.g.
//   segment name "a/b" contains '/' at position 2, which is not allowed; use only letters,
//   digits, '.', '_' and '-'
std::string validate_segment_name(std::string_view name);

// "asp", "bsp", "ssp:N" -> mode and bound; "" or what is wrong. Shared by the spec, the server's
// --consistency and `shmps-ctl set NAME consistency=...`.
std::string parse_consistency(std::string_view text, Consistency& mode, std::uint32_t& staleness);
// "sum" | "mean"
std::string parse_bsp_aggregate(std::string_view text, BspAggregate& out);
// "proceed" | "wait"
std::string parse_on_worker_death(std::string_view text, OnWorkerDeath& out);
// "100ms", "2s", "1m" (a period) | "50updates" (applied pushes). Shared by the spec and --sync-every.
std::string parse_sync_every(std::string_view text, SyncEvery& out);
std::string sync_every_text(const SyncEvery& every);
// "10s", "500ms", "1m" | "0" | "off" (never). Shared by the spec, shmps-server and shmps-launch's
// --straggler-timeout.
std::string parse_straggler_timeout(std::string_view text, std::chrono::milliseconds& out);
// "10s", "1500ms", "off".
std::string straggler_timeout_text(std::chrono::milliseconds timeout);

// Edit distance between two names, ignoring ASCII case: how "did you mean ...?" suggestions
// rank candidates (the spec parser's keys, a pretrained file's tensor names).
std::size_t name_distance(std::string_view a, std::string_view b);

// Checks a ModelSpec built in code (the parser applies the same rules, with positions).
// "" if valid, else the first problem as "<field>: <problem>", e.g. "param[1].shape: ...".
std::string validate_model_spec(const ModelSpec& spec);

}  // namespace shmps::server
