// Checkpoints, the file: write a Snapshot to a checkpoint file (write_checkpoint) and read one
// back with every check (read_checkpoint). See checkpoint.hpp for the format.
#include "shmps/server/checkpoint.hpp"

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <nlohmann/json.hpp>

#include <shmps/error.hpp>
#include <shmps/shape.hpp>
#include <shmps/server/optimizer.hpp>
#include <shmps/server/safetensors.hpp>
#include <shmps/shm/dtype.hpp>
#include <shmps/shm/killpoint.hpp>

namespace shmps::server {

using namespace shmps::shm;
using nlohmann::json;
namespace st = safetensors;

namespace {

// The optimizer state arrays' names, by kind: "<param>/<prefix>.<array>".
std::vector<std::string> state_names(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::sgd: return {};
    case OptimizerKind::momentum: return {"momentum.v"};
    case OptimizerKind::nesterov: return {"nesterov.v"};
    case OptimizerKind::adagrad: return {"adagrad.s"};
    case OptimizerKind::rmsprop: return {"rmsprop.s"};
    case OptimizerKind::adam: return {"adam.m", "adam.v"};
    case OptimizerKind::rowwise_adagrad: return {};  // its state is a word per row (row_words_tensor)
  }
  return {};
}

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& what) {
  throw Error(path.string() + ": " + what);
}

std::string consistency_text(Consistency c, std::uint32_t staleness) {
  return c == Consistency::ssp ? "ssp:" + std::to_string(staleness) : std::string(to_string(c));
}

std::string to_hex(const std::vector<std::byte>& bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s;
  s.reserve(2 * bytes.size());
  for (std::byte b : bytes) {
    s += kDigits[static_cast<unsigned>(b) >> 4];
    s += kDigits[static_cast<unsigned>(b) & 15];
  }
  return s;
}

bool from_hex(std::string_view text, std::vector<std::byte>& out) {
  if (text.size() % 2 != 0) return false;
  out.clear();
  for (std::size_t i = 0; i < text.size(); i += 2) {
    unsigned v = 0;
    auto r = std::from_chars(text.data() + i, text.data() + i + 2, v, 16);
    if (r.ec != std::errc() || r.ptr != text.data() + i + 2) return false;
    out.push_back(static_cast<std::byte>(v));
  }
  return true;
}

std::uint64_t parse_u64(const std::filesystem::path& path, const std::map<std::string, std::string>& meta,
                        const std::string& key) {
  auto it = meta.find(key);
  if (it == meta.end()) fail(path, "metadata \"" + key + "\" is missing: the file is damaged or not a whole shmps checkpoint");
  std::uint64_t v = 0;
  const std::string& s = it->second;
  auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (r.ec != std::errc() || r.ptr != s.data() + s.size())
    fail(path, "metadata \"" + key + "\" is \"" + s + "\", not a non-negative integer");
  return v;
}

const std::string& meta_string(const std::filesystem::path& path, const std::map<std::string, std::string>& meta,
                               const std::string& key) {
  auto it = meta.find(key);
  if (it == meta.end()) fail(path, "metadata \"" + key + "\" is missing: the file is damaged or not a whole shmps checkpoint");
  return it->second;
}

json meta_json(const std::filesystem::path& path, const std::map<std::string, std::string>& meta,
               const std::string& key) {
  try {
    return json::parse(meta_string(path, meta, key));
  } catch (const json::exception& e) {
    fail(path, "metadata \"" + key + "\" is not valid JSON: " + e.what());
  }
}

// An I64 tensor of exactly `shape`, as values.
std::vector<std::int64_t> i64(const st::File& file, const std::string& name, const std::vector<std::uint64_t>& shape) {
  auto it = file.tensors().find(name);
  if (it == file.tensors().end()) fail(file.path(), "tensor \"" + name + "\" is missing: not a whole shmps checkpoint");
  if (it->second.dtype != "I64") fail(file.path(), "tensor \"" + name + "\" has dtype " + it->second.dtype + ", expected I64");
  if (it->second.shape != shape)
    fail(file.path(), "tensor \"" + name + "\" has shape " + shape_text(it->second.shape) + ", expected " + shape_text(shape));
  const auto bytes = file.data(it->second);
  std::vector<std::int64_t> out(bytes.size() / sizeof(std::int64_t));
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

// A tensor of one 8-byte value per table row (`rows` of them, of `dtype`), any values.
std::vector<std::int64_t> read_per_row(const st::File& file, const std::string& name, const std::string& dtype,
                                       std::uint64_t rows) {
  const auto it = file.tensors().find(name);
  if (it->second.dtype != dtype) fail(file.path(), "tensor \"" + name + "\" has dtype " + it->second.dtype + ", expected " + dtype);
  if (it->second.shape != std::vector<std::uint64_t>{rows})
    fail(file.path(), "tensor \"" + name + "\" has shape " + shape_text(it->second.shape) + ", expected [" +
                          std::to_string(rows) + "]: one per row of the table");
  const auto bytes = file.data(it->second);
  std::vector<std::int64_t> out(rows);
  if (rows != 0) std::memcpy(out.data(), bytes.data(), rows * sizeof(std::int64_t));
  return out;
}

// A table's row words, tensor `name` of `rows` elements and dtype I64 (lazy Adam's step counts,
// none negative) or F64 (row-wise AdaGrad's accumulators, finite and none negative), as 8-byte words.
std::vector<std::int64_t> read_row_words(const st::File& file, const std::string& name, const std::string& dtype,
                                          std::uint64_t rows) {
  std::vector<std::int64_t> out = read_per_row(file, name, dtype, rows);
  for (const std::int64_t w : out) {
    const bool bad = dtype == "I64" ? w < 0 : !(std::bit_cast<double>(w) >= 0 && std::isfinite(std::bit_cast<double>(w)));
    if (bad) fail(file.path(), "tensor \"" + name + "\" holds an impossible value (a negative step count or accumulator): the file is damaged");
  }
  return out;
}

json optimizer_json(const OptimizerSettings& o) {
  return json{{"kind", std::string(to_string(o.kind))},
              {"lr", o.lr},
              {"momentum", o.momentum},
              {"beta1", o.beta1},
              {"beta2", o.beta2},
              {"rho", o.rho},
              {"eps", o.eps},
              {"weight_decay", o.weight_decay},
              {"clip_value", o.clip_value},
              {"clip_norm", o.clip_norm},
              {"state_dtype", std::string(to_string(o.state_dtype))}};
}

// The optimizer settings in metadata entry `key` ("shmps.optimizer", or a table's own).
OptimizerSettings optimizer_from_json(const std::filesystem::path& path, const json& j,
                                      const std::string& key = "shmps.optimizer") {
  OptimizerSettings o;
  try {
    const std::string kind = j.at("kind").get<std::string>();
    bool known = false;
    for (int k = 0; k <= static_cast<int>(kLastOptimizerKind); ++k)
      if (to_string(static_cast<OptimizerKind>(k)) == kind) {
        o.kind = static_cast<OptimizerKind>(k);
        known = true;
      }
    if (!known) fail(path, "metadata \"" + key + "\": unknown kind \"" + kind + "\"");
    // float -> JSON double -> float is exact: the JSON number reads back as the same double.
    o.lr = static_cast<float>(j.at("lr").get<double>());
    o.momentum = static_cast<float>(j.at("momentum").get<double>());
    o.beta1 = static_cast<float>(j.at("beta1").get<double>());
    o.beta2 = static_cast<float>(j.at("beta2").get<double>());
    o.rho = static_cast<float>(j.at("rho").get<double>());
    o.eps = static_cast<float>(j.at("eps").get<double>());
    o.weight_decay = static_cast<float>(j.at("weight_decay").get<double>());
    o.clip_value = static_cast<float>(j.at("clip_value").get<double>());
    o.clip_norm = static_cast<float>(j.at("clip_norm").get<double>());
    // How the segment kept the state (the tensors are float32 either way); absent before bf16.
    const std::string dtype = j.value("state_dtype", std::string("f32"));
    if (dtype == "bf16")
      o.state_dtype = StateDType::bf16;
    else if (dtype != "f32")
      fail(path, "metadata \"" + key + "\": unknown state_dtype \"" + dtype + "\" (f32 or bf16)");
  } catch (const json::exception& e) {
    fail(path, std::string("metadata \"" + key + "\": ") + e.what());
  }
  if (auto problem = validate_optimizer_settings(o); !problem.empty())
    fail(path, "metadata \"" + key + "\": " + problem);
  return o;
}

// ---- Writing --------------------------------------------------------------------------------

// The metadata of `snap` but the per-parameter version ranges (written with the tensors).
std::map<std::string, std::string> metadata_of(const Snapshot& snap) {
  std::map<std::string, std::string> meta{
      {"shmps.format", std::string(kCheckpointFormat)},
      {"shmps.segment", snap.segment},
      {"shmps.taken_unix_ns", std::to_string(snap.taken_unix_ns)},
      {"shmps.epoch", std::to_string(snap.epoch)},
      {"shmps.model_clock", std::to_string(snap.model_clock)},
      {"shmps.group_clocks", json(snap.group_clocks).dump()},
      {"shmps.workers_per_group", std::to_string(snap.workers_per_group)},
      {"shmps.consistency", consistency_text(snap.consistency, snap.staleness)},
      {"shmps.bsp_aggregate", std::string(to_string(snap.bsp_aggregate))},
      {"shmps.on_worker_death", std::string(to_string(snap.on_worker_death))},
      {"shmps.optimizer", optimizer_json(snap.optimizer).dump()},
      {"shmps.slice_floats", std::to_string(snap.slice_floats)},
      {"shmps.max_workers", std::to_string(snap.max_workers)},
      {"shmps.counters", json{{"steps", snap.steps},
                              {"records_applied", snap.records_applied},
                              {"records_skipped", snap.records_skipped},
                              {"records_discarded", snap.records_discarded},
                              {"floats_applied", snap.floats_applied},
                              {"apply_rounds", snap.apply_rounds}}
                             .dump()},
  };
  json slots = json::array();
  for (const auto& s : snap.slots) {
    slots.push_back(json{{"rank", s.rank},
                         {"state", s.state},
                         {"generation", s.generation},
                         {"applied", s.applied},
                         {"consumed_clock", s.consumed_clock},
                         {"resume_clock", s.resume_clock},
                         {"resume", to_hex(s.resume)},
                         {"records_applied", s.records_applied},
                         {"records_discarded", s.records_discarded}});
  }
  meta["shmps.slots"] = slots.dump();
  json param_names = json::array();
  for (const auto& p : snap.params) param_names.push_back(p.name);
  meta["shmps.params"] = param_names.dump();
  return meta;
}

// ---- Reading --------------------------------------------------------------------------------

// The file is a shmps checkpoint in the format this build reads.
void check_format(const std::filesystem::path& path, const std::map<std::string, std::string>& meta) {
  const auto format = meta.find("shmps.format");
  if (format == meta.end())
    fail(path, "a safetensors file, but not a shmps checkpoint (no \"shmps.format\" in its metadata); to start a job "
               "from plain weights, give them in the model spec: init = { kind = \"pretrained\", file = \"...\" }");
  if (format->second != kCheckpointFormat)
    fail(path, "checkpoint format \"" + format->second + "\" is not the one this build reads (\"" +
                   std::string(kCheckpointFormat) + "\")");
}

// The job's settings: its name, clocks, policy, optimizer and slicing.
void read_settings(const std::filesystem::path& path, const std::map<std::string, std::string>& meta, Snapshot& snap) {
  snap.segment = meta_string(path, meta, "shmps.segment");
  snap.taken_unix_ns = parse_u64(path, meta, "shmps.taken_unix_ns");
  snap.epoch = parse_u64(path, meta, "shmps.epoch");
  snap.model_clock = parse_u64(path, meta, "shmps.model_clock");
  snap.group_clocks.clear();
  if (meta.count("shmps.group_clocks") != 0) {
    const json clocks = meta_json(path, meta, "shmps.group_clocks");
    try {
      if (!clocks.is_array() || clocks.size() > kMaxWorkersLimit) throw std::invalid_argument("not a list of clocks");
      for (const auto& c : clocks) snap.group_clocks.push_back(c.get<std::uint64_t>());
    } catch (const std::exception& e) {
      fail(path, std::string("metadata \"shmps.group_clocks\": ") + e.what() + " (expected a list like [12, 9])");
    }
  }
  snap.workers_per_group = 0;
  if (meta.count("shmps.workers_per_group") != 0) {
    const std::uint64_t k = parse_u64(path, meta, "shmps.workers_per_group");
    if (k > kMaxWorkersLimit)
      fail(path, "metadata \"shmps.workers_per_group\": " + std::to_string(k) + " is more than any job's workers");
    snap.workers_per_group = static_cast<std::uint32_t>(k);
  }
  if (auto p = parse_consistency(meta_string(path, meta, "shmps.consistency"), snap.consistency, snap.staleness); !p.empty())
    fail(path, "metadata \"shmps.consistency\": " + p);
  if (auto p = parse_bsp_aggregate(meta_string(path, meta, "shmps.bsp_aggregate"), snap.bsp_aggregate); !p.empty())
    fail(path, "metadata \"shmps.bsp_aggregate\": " + p);
  if (auto p = parse_on_worker_death(meta_string(path, meta, "shmps.on_worker_death"), snap.on_worker_death); !p.empty())
    fail(path, "metadata \"shmps.on_worker_death\": " + p);
  snap.optimizer = optimizer_from_json(path, meta_json(path, meta, "shmps.optimizer"));
  snap.slice_floats = parse_u64(path, meta, "shmps.slice_floats");
  const std::uint64_t max_workers = parse_u64(path, meta, "shmps.max_workers");
  if (snap.slice_floats == 0) fail(path, "metadata \"shmps.slice_floats\" is 0");
  if (max_workers == 0 || max_workers > kMaxWorkersLimit)
    fail(path, "metadata \"shmps.max_workers\" is " + std::to_string(max_workers) + ", outside 1.." +
                   std::to_string(kMaxWorkersLimit));
  snap.max_workers = static_cast<std::uint32_t>(max_workers);
}

void read_counters(const std::filesystem::path& path, const std::map<std::string, std::string>& meta, Snapshot& snap) {
  try {
    const json c = meta_json(path, meta, "shmps.counters");
    snap.steps = c.at("steps").get<std::uint64_t>();
    snap.records_applied = c.at("records_applied").get<std::uint64_t>();
    snap.records_skipped = c.at("records_skipped").get<std::uint64_t>();
    snap.records_discarded = c.at("records_discarded").get<std::uint64_t>();
    snap.floats_applied = c.at("floats_applied").get<std::uint64_t>();
    snap.apply_rounds = c.at("apply_rounds").get<std::uint64_t>();
  } catch (const json::exception& e) {
    fail(path, std::string("metadata \"shmps.counters\": ") + e.what());
  }
}

// Every slot ever used; needs snap.max_workers.
void read_slots(const std::filesystem::path& path, const std::map<std::string, std::string>& meta, Snapshot& snap) {
  try {
    std::vector<bool> seen(snap.max_workers, false);
    for (const json& j : meta_json(path, meta, "shmps.slots")) {
      Snapshot::Slot s;
      s.rank = j.at("rank").get<std::uint32_t>();
      if (s.rank >= snap.max_workers || seen[s.rank])
        fail(path, "metadata \"shmps.slots\": rank " + std::to_string(s.rank) + " is out of range or given twice");
      seen[s.rank] = true;
      s.state = j.at("state").get<std::uint32_t>();
      if (s.state > static_cast<std::uint32_t>(SlotState::left))
        fail(path, "metadata \"shmps.slots\": rank " + std::to_string(s.rank) + " has an unknown state");
      s.generation = j.at("generation").get<std::uint64_t>();
      s.applied = j.at("applied").get<std::uint64_t>();
      s.consumed_clock = j.at("consumed_clock").get<std::uint64_t>();
      s.resume_clock = j.at("resume_clock").get<std::uint64_t>();
      if (!from_hex(j.at("resume").get<std::string>(), s.resume) || s.resume.size() > kResumeBlobBytes)
        fail(path, "metadata \"shmps.slots\": rank " + std::to_string(s.rank) + ": the resume state is not hex of at most " +
                       std::to_string(kResumeBlobBytes) + " bytes");
      s.records_applied = j.at("records_applied").get<std::uint64_t>();
      s.records_discarded = j.at("records_discarded").get<std::uint64_t>();
      snap.slots.push_back(std::move(s));
    }
  } catch (const json::exception& e) {
    fail(path, std::string("metadata \"shmps.slots\": ") + e.what());
  }
}

// Parameters, in segment order, as "shmps.params" lists them, with their optimizer state; needs
// snap.optimizer and snap.slice_floats. Returns the number of slices they take.
std::uint64_t read_params(const std::filesystem::path& path, const st::File& file, Snapshot& snap) {
  const auto& meta = file.metadata();
  std::vector<std::string> order;
  try {
    order = meta_json(path, meta, "shmps.params").get<std::vector<std::string>>();
  } catch (const json::exception& e) {
    fail(path, std::string("metadata \"shmps.params\": ") + e.what());
  }
  std::uint64_t slices = 0;
  for (const std::string& name : order) {
    const auto found = file.tensors().find(name);
    if (found == file.tensors().end())
      fail(path, "tensor \"" + name + "\" is missing (the checkpoint's metadata lists it as a parameter): the file "
                 "is damaged");
    const st::Tensor& t = found->second;
    Snapshot::Param p;
    p.name = name;
    p.shape = t.shape;
    if (t.dtype == "BF16" || t.dtype == "F16") {  // a bf16 / fp16 parameter's stored values
      p.dtype = t.dtype == "BF16" ? DType::bf16 : DType::fp16;
      p.values = file.floats(t);
    } else if (t.dtype == "F32") {
      p.values = file.f32(name, t.shape);
    } else {
      fail(path, "tensor \"" + name + "\": expected dtype F32 (or BF16 / F16: the values of a parameter of dtype bf16 / "
                 "fp16), found " + t.dtype);
    }
    // Its optimizer: a table's own when the metadata names one, else the job's.
    const std::string own = "shmps.optimizer." + name;
    p.optimizer = meta.contains(own) ? optimizer_from_json(path, meta_json(path, meta, own), own) : snap.optimizer;
    if (p.optimizer.kind == OptimizerKind::rowwise_adagrad && t.shape.size() != 2)
      fail(path, "metadata \"" + own + "\" gives \"" + name + "\" row-wise AdaGrad, which only a table has: the file "
                 "is damaged");
    const auto names = state_names(p.optimizer.kind);
    for (std::size_t a = 0; a < names.size(); ++a) {
      const std::string state = name + "/" + names[a];
      if (!file.tensors().contains(state))
        fail(path, "tensor \"" + state + "\" is missing: the " + std::string(to_string(p.optimizer.kind)) +
                       " optimizer's state of \"" + name + "\"");
      p.state[a] = file.f32(state, t.shape);
    }
    // A table's row words: lazy Adam's step counts, row-wise AdaGrad's accumulators (whether the
    // parameter is a table is checked against the spec on restore).
    for (const OptimizerKind kind : {OptimizerKind::adam, OptimizerKind::rowwise_adagrad}) {
      const auto [suffix, dtype] = row_words_tensor(kind);
      const std::string words = name + "/" + suffix;
      if (!file.tensors().contains(words)) continue;
      if (p.optimizer.kind != kind || t.shape.size() != 2)
        fail(path, "tensor \"" + words + "\" holds a table's " + std::string(to_string(kind)) + " row state, but \"" +
                       name + "\" is not a table updated with " + std::string(to_string(kind)) +
                       " in this checkpoint: the file is damaged");
      p.row_words = read_row_words(file, words, dtype, t.shape[0]);
    }
    // A table with keys = "u64": the key and stamp of each slot (whether the table has keys is
    // checked against the spec on restore).
    const bool keys = file.tensors().contains(name + "/keys"), stamps = file.tensors().contains(name + "/key_stamps");
    if (keys != stamps)
      fail(path, "tensor \"" + name + (keys ? "/key_stamps" : "/keys") + "\" is missing: a table with keys = \"u64\" "
                 "keeps both; the file is damaged");
    if (keys) {
      if (t.shape.size() != 2) fail(path, "tensor \"" + name + "/keys\" belongs to a table, and \"" + name + "\" is not one");
      p.keys = read_per_row(file, name + "/keys", "I64", t.shape[0]);
      p.key_stamps = read_per_row(file, name + "/key_stamps", "I64", t.shape[0]);
      std::set<std::int64_t> taken;
      for (std::size_t s = 0; s < p.key_stamps.size(); ++s) {
        if (p.key_stamps[s] < 0) fail(path, "tensor \"" + name + "/key_stamps\" holds a negative stamp: the file is damaged");
        if (p.key_stamps[s] != 0 && !taken.insert(p.keys[s]).second)
          fail(path, "tensor \"" + name + "/keys\" holds key " + std::to_string(static_cast<std::uint64_t>(p.keys[s])) +
                         " in two slots: the file is damaged");
      }
    }
    slices += (p.values.size() + snap.slice_floats - 1) / snap.slice_floats;
    snap.params.push_back(std::move(p));
  }
  if (snap.params.empty()) fail(path, "holds no parameter tensors");
  return slices;
}

// The per-slice tables: versions, clocks, steps and the exactly-once table.
void read_slice_tables(const std::filesystem::path& path, const st::File& file, std::uint64_t slices, Snapshot& snap) {
  snap.slice_version = i64(file, "shmps/slice_version", {slices});
  snap.slice_clock = i64(file, "shmps/slice_clock", {slices});
  snap.slice_step = i64(file, "shmps/slice_step", {slices});
  snap.last_applied = i64(file, "shmps/last_applied", {slices, snap.max_workers});
  for (std::uint64_t s = 0; s < slices; ++s)
    if (snap.slice_version[s] < 0 || (snap.slice_version[s] & 1) || snap.slice_clock[s] < 0 || snap.slice_step[s] < 0)
      fail(path, "tensor \"shmps/slice_version\", \"slice_clock\" or \"slice_step\" holds an impossible value for slice " +
                     std::to_string(s));
}

// Server groups: the replica's sync tables, if the file has them ("shmps.sync").
void read_sync_tables(const std::filesystem::path& path, const st::File& file, std::uint64_t slices, Snapshot& snap) {
  const auto& meta = file.metadata();
  if (!meta.contains("shmps.sync")) return;
  snap.sync = Snapshot::Sync{};  // not emplace(): see take_sync_tables (checkpoint_snapshot.cpp)
  Snapshot::Sync& sync = *snap.sync;
  try {
    const json j = meta_json(path, meta, "shmps.sync");
    sync.server_group = j.at("server_group").get<std::uint32_t>();
    sync.server_groups = j.at("server_groups").get<std::uint32_t>();
    sync.seq = j.at("seq").get<std::uint64_t>();
  } catch (const json::exception& e) {
    fail(path, std::string("metadata \"shmps.sync\": ") + e.what());
  }
  if (sync.server_groups < 2 || sync.server_group >= sync.server_groups || sync.server_groups > kMaxServerGroups)
    fail(path, "metadata \"shmps.sync\" names group " + std::to_string(sync.server_group) + " of " +
                   std::to_string(sync.server_groups) + ": impossible");
  sync.sent_seq = i64(file, "shmps/sync_sent_seq", {slices});
  sync.synced_seq = i64(file, "shmps/sync_synced_seq", {slices});
  sync.clean_version = i64(file, "shmps/sync_clean_version", {slices});
  sync.applied = i64(file, "shmps/sync_applied", {slices, sync.server_groups});
  for (auto& p : snap.params) {
    p.sync_base = file.f32(p.name + "/sync.base", p.shape);
    p.sync_sent = file.f32(p.name + "/sync.sent", p.shape);
  }
}

}  // namespace

RowWordsTensor row_words_tensor(OptimizerKind kind) {
  if (kind == OptimizerKind::adam) return {"adam.step", "I64"};
  if (kind == OptimizerKind::rowwise_adagrad) return {"rowwise_adagrad.s", "F64"};
  return {};
}

void write_checkpoint(const Snapshot& snap, const std::filesystem::path& path, unsigned mode) {
  std::vector<st::TensorView> tensors;
  std::map<std::string, std::string> meta = metadata_of(snap);

  std::uint64_t first_slice = 0;
  // bf16 / fp16 parameters: their values narrowed back into the stored bytes (exact), kept here
  // until the file is written.
  std::vector<std::vector<std::uint16_t>> stored;
  stored.reserve(snap.params.size());
  for (const auto& p : snap.params) {
    if (p.dtype == DType::f32) {
      tensors.push_back({p.name, "F32", p.shape, std::as_bytes(std::span<const float>(p.values))});
    } else {
      std::vector<std::uint16_t>& s = stored.emplace_back(p.values.size());
      narrow(p.dtype, p.values.data(), s.data(), s.size());
      tensors.push_back({p.name, std::string(safetensors_dtype(p.dtype)), p.shape,
                         std::as_bytes(std::span<const std::uint16_t>(s))});
    }
    const std::uint64_t slices = (p.values.size() + snap.slice_floats - 1) / snap.slice_floats;
    std::int64_t lo = INT64_MAX, hi = 0;
    for (std::uint64_t k = 0; k < slices; ++k) {
      lo = std::min(lo, snap.slice_version[first_slice + k] / 2);
      hi = std::max(hi, snap.slice_version[first_slice + k] / 2);
    }
    first_slice += slices;
    meta["shmps.version." + p.name] = std::to_string(slices ? lo : 0) + ".." + std::to_string(hi);
  }
  for (const auto& p : snap.params) {
    const auto names = state_names(p.optimizer.kind);
    for (std::size_t a = 0; a < names.size(); ++a)
      tensors.push_back({p.name + "/" + names[a], "F32", p.shape, std::as_bytes(std::span<const float>(p.state[a]))});
    if (!p.row_words.empty()) {
      const auto [suffix, dtype] = row_words_tensor(p.optimizer.kind);
      tensors.push_back({p.name + "/" + suffix, dtype, {p.row_words.size()},
                         std::as_bytes(std::span<const std::int64_t>(p.row_words))});
    }
    if (!p.keys.empty()) {
      tensors.push_back({p.name + "/keys", "I64", {p.keys.size()}, std::as_bytes(std::span<const std::int64_t>(p.keys))});
      tensors.push_back({p.name + "/key_stamps", "I64", {p.key_stamps.size()},
                         std::as_bytes(std::span<const std::int64_t>(p.key_stamps))});
    }
    if (optimizer_json(p.optimizer) != optimizer_json(snap.optimizer))  // a table's own
      meta["shmps.optimizer." + p.name] = optimizer_json(p.optimizer).dump();
  }
  const std::uint64_t slices = snap.slice_version.size();
  tensors.push_back({"shmps/slice_version", "I64", {slices}, std::as_bytes(std::span<const std::int64_t>(snap.slice_version))});
  tensors.push_back({"shmps/slice_clock", "I64", {slices}, std::as_bytes(std::span<const std::int64_t>(snap.slice_clock))});
  tensors.push_back({"shmps/slice_step", "I64", {slices}, std::as_bytes(std::span<const std::int64_t>(snap.slice_step))});
  tensors.push_back({"shmps/last_applied", "I64", {slices, snap.max_workers},
                     std::as_bytes(std::span<const std::int64_t>(snap.last_applied))});
  if (snap.sync) {
    const Snapshot::Sync& sync = *snap.sync;
    meta["shmps.sync"] =
        json{{"server_group", sync.server_group}, {"server_groups", sync.server_groups}, {"seq", sync.seq}}.dump();
    for (const auto& p : snap.params) {
      tensors.push_back({p.name + "/sync.base", "F32", p.shape, std::as_bytes(std::span<const float>(p.sync_base))});
      tensors.push_back({p.name + "/sync.sent", "F32", p.shape, std::as_bytes(std::span<const float>(p.sync_sent))});
    }
    const auto i64_tensor = [&](const char* name, const std::vector<std::int64_t>& v, std::vector<std::uint64_t> shape) {
      tensors.push_back({name, "I64", std::move(shape), std::as_bytes(std::span<const std::int64_t>(v))});
    };
    i64_tensor("shmps/sync_sent_seq", sync.sent_seq, {slices});
    i64_tensor("shmps/sync_synced_seq", sync.synced_seq, {slices});
    i64_tensor("shmps/sync_clean_version", sync.clean_version, {slices});
    i64_tensor("shmps/sync_applied", sync.applied, {slices, sync.server_groups});
  }
  st::write_file(path, tensors, meta, [](std::string_view stage) {
    if (stage == "mid_write") kill_point("checkpoint.mid_write");
    if (stage == "before_rename") kill_point("checkpoint.before_rename");
  }, mode);
}

Snapshot read_checkpoint(const std::filesystem::path& path) {
  const st::File file = st::File::read(path);  // format and checksum
  const auto& meta = file.metadata();
  check_format(path, meta);
  Snapshot snap;
  read_settings(path, meta, snap);
  read_counters(path, meta, snap);
  read_slots(path, meta, snap);
  const std::uint64_t slices = read_params(path, file, snap);
  read_slice_tables(path, file, slices, snap);
  read_sync_tables(path, file, slices, snap);
  return snap;
}

}  // namespace shmps::server
