// Checkpoints: snapshot, file format, restore, directory. See checkpoint.hpp for the format.
#include "shmps/server/checkpoint.hpp"

#include <algorithm>
#include <charconv>
#include <cstring>
#include <nlohmann/json.hpp>

#include <shmps/error.hpp>
#include <shmps/shape.hpp>
#include <shmps/server/optimizer.hpp>
#include <shmps/server/safetensors.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/killpoint.hpp>
#include <shmps/shm/proc.hpp>

#include "parallel.hpp"

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
              {"clip_norm", o.clip_norm}};
}

OptimizerSettings optimizer_from_json(const std::filesystem::path& path, const json& j) {
  OptimizerSettings o;
  try {
    const std::string kind = j.at("kind").get<std::string>();
    bool known = false;
    for (auto k : {OptimizerKind::sgd, OptimizerKind::momentum, OptimizerKind::nesterov, OptimizerKind::adagrad,
                   OptimizerKind::rmsprop, OptimizerKind::adam})
      if (to_string(k) == kind) {
        o.kind = k;
        known = true;
      }
    if (!known) fail(path, "metadata \"shmps.optimizer\": unknown kind \"" + kind + "\"");
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
  } catch (const json::exception& e) {
    fail(path, std::string("metadata \"shmps.optimizer\": ") + e.what());
  }
  if (auto problem = validate_optimizer_settings(o); !problem.empty())
    fail(path, "metadata \"shmps.optimizer\": " + problem);
  return o;
}

// Parallel copy of big arrays (memory bandwidth: two threads beat one on most machines).
void parallel_copy(tbb::task_arena& arena, float* dst, const float* src, std::size_t n) {
  constexpr std::size_t kChunk = 1 << 20;  // 4 MiB
  parallel_for_index(arena, (n + kChunk - 1) / kChunk, [&](std::size_t chunk, std::size_t) {
    const std::size_t begin = chunk * kChunk, count = std::min(kChunk, n - begin);
    std::memcpy(dst + begin, src + begin, count * sizeof(float));
  });
}

}  // namespace

std::uint64_t Snapshot::data_bytes() const noexcept {
  std::uint64_t bytes = 0;
  for (const auto& p : params) bytes += (p.values.size() + p.state[0].size() + p.state[1].size()) * sizeof(float);
  bytes += (slice_version.size() + slice_clock.size() + slice_step.size() + last_applied.size()) * sizeof(std::int64_t);
  return bytes;
}

void take_snapshot(const Segment& segment, tbb::task_arena& arena, Snapshot& out) {
  const SegmentHeader& h = segment.header();
  out.segment = h.name;
  out.taken_unix_ns = unix_ns();
  out.epoch = load_acquire(h.server_epoch);
  out.model_clock = load_acquire(h.model_clock);
  out.consistency = static_cast<Consistency>(load_acquire(h.consistency));
  out.staleness = load_acquire(h.staleness);
  out.bsp_aggregate = static_cast<BspAggregate>(load_acquire(h.bsp_aggregate));
  out.on_worker_death = static_cast<OnWorkerDeath>(load_acquire(h.on_worker_death));
  out.optimizer = h.optimizer;
  out.slice_floats = h.slice_floats;
  out.max_workers = h.max_workers;
  out.steps = load_acquire(h.steps);
  out.records_applied = load_acquire(h.records_applied);
  out.records_skipped = load_acquire(h.records_skipped);
  out.records_discarded = load_acquire(h.records_discarded);
  out.floats_applied = load_acquire(h.floats_applied);
  out.apply_rounds = load_acquire(h.apply_rounds);

  const int arrays = static_cast<int>(h.state_arrays);
  out.params.resize(h.param_count);
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const ParamEntry& p = segment.param(i);
    Snapshot::Param& sp = out.params[i];
    sp.name = std::string(param_name(p));
    sp.shape.assign(p.shape, p.shape + p.ndim);
    sp.values.resize(p.size);
    parallel_copy(arena, sp.values.data(), segment.values(p), p.size);
    for (int a = 0; a < 2; ++a) {
      sp.state[a].resize(a < arrays ? p.size : 0);
      if (a < arrays) parallel_copy(arena, sp.state[a].data(), at<float>(segment.base(), p.state_offset[a]), p.size);
    }
  }
  out.slice_version.resize(h.slice_count);
  out.slice_clock.resize(h.slice_count);
  out.slice_step.resize(h.slice_count);
  out.last_applied.resize(h.slice_count * h.max_workers);
  const auto* table = at<std::uint64_t>(segment.base(), h.applied_offset);
  for (std::uint64_t s = 0; s < h.slice_count; ++s) {
    const SliceEntry& slice = segment.slice(s);
    out.slice_version[s] = static_cast<std::int64_t>(load_acquire(slice.version));
    out.slice_clock[s] = static_cast<std::int64_t>(load_acquire(slice.clock));
    out.slice_step[s] = static_cast<std::int64_t>(slice.step);
  }
  std::memcpy(out.last_applied.data(), table, out.last_applied.size() * sizeof(std::int64_t));

  out.slots.clear();
  for (std::uint32_t r = 0; r < h.max_workers; ++r) {
    const WorkerSlot& slot = segment.slot(r);
    const std::uint64_t generation = load_acquire(slot.generation);
    if (generation == 0) continue;
    Snapshot::Slot s;
    s.rank = r;
    s.state = load_acquire(slot.state);
    s.generation = generation;
    s.applied = load_acquire(slot.applied);
    s.consumed_clock = load_acquire(slot.consumed_clock);
    s.resume_clock = load_acquire(slot.resume_clock);
    const std::uint32_t bytes = std::min<std::uint32_t>(load_acquire(slot.resume_bytes), kResumeBlobBytes);
    const auto* blob = reinterpret_cast<const std::byte*>(slot.resume);
    s.resume.assign(blob, blob + bytes);  // the server writes it, between rounds: stable now
    s.records_applied = load_acquire(slot.records_applied);
    s.records_discarded = load_acquire(slot.records_discarded);
    out.slots.push_back(std::move(s));
  }
}

void write_checkpoint(const Snapshot& snap, const std::filesystem::path& path) {
  std::vector<st::TensorView> tensors;
  const auto names = state_names(snap.optimizer.kind);
  std::map<std::string, std::string> meta{
      {"shmps.format", std::string(kCheckpointFormat)},
      {"shmps.segment", snap.segment},
      {"shmps.taken_unix_ns", std::to_string(snap.taken_unix_ns)},
      {"shmps.epoch", std::to_string(snap.epoch)},
      {"shmps.model_clock", std::to_string(snap.model_clock)},
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

  std::uint64_t first_slice = 0;
  for (const auto& p : snap.params) {
    tensors.push_back({p.name, "F32", p.shape, std::as_bytes(std::span<const float>(p.values))});
    const std::uint64_t slices = (p.values.size() + snap.slice_floats - 1) / snap.slice_floats;
    std::int64_t lo = INT64_MAX, hi = 0;
    for (std::uint64_t k = 0; k < slices; ++k) {
      lo = std::min(lo, snap.slice_version[first_slice + k] / 2);
      hi = std::max(hi, snap.slice_version[first_slice + k] / 2);
    }
    first_slice += slices;
    meta["shmps.version." + p.name] = std::to_string(slices ? lo : 0) + ".." + std::to_string(hi);
  }
  for (const auto& p : snap.params)
    for (std::size_t a = 0; a < names.size(); ++a)
      tensors.push_back({p.name + "/" + names[a], "F32", p.shape, std::as_bytes(std::span<const float>(p.state[a]))});
  const std::uint64_t slices = snap.slice_version.size();
  tensors.push_back({"shmps/slice_version", "I64", {slices}, std::as_bytes(std::span<const std::int64_t>(snap.slice_version))});
  tensors.push_back({"shmps/slice_clock", "I64", {slices}, std::as_bytes(std::span<const std::int64_t>(snap.slice_clock))});
  tensors.push_back({"shmps/slice_step", "I64", {slices}, std::as_bytes(std::span<const std::int64_t>(snap.slice_step))});
  tensors.push_back({"shmps/last_applied", "I64", {slices, snap.max_workers},
                     std::as_bytes(std::span<const std::int64_t>(snap.last_applied))});
  st::write_file(path, tensors, meta, [](std::string_view stage) {
    if (stage == "mid_write") kill_point("checkpoint.mid_write");
    if (stage == "before_rename") kill_point("checkpoint.before_rename");
  });
}

Snapshot read_checkpoint(const std::filesystem::path& path) {
  const st::File file = st::File::read(path);  // format and checksum
  const auto& meta = file.metadata();
  const auto format = meta.find("shmps.format");
  if (format == meta.end())
    fail(path, "a safetensors file, but not a shmps checkpoint (no \"shmps.format\" in its metadata); to start a job "
               "from plain weights, give them in the model spec: init = { kind = \"pretrained\", file = \"...\" }");
  if (format->second != kCheckpointFormat)
    fail(path, "checkpoint format \"" + format->second + "\" is not the one this build reads (\"" +
                   std::string(kCheckpointFormat) + "\")");
  Snapshot snap;
  snap.segment = meta_string(path, meta, "shmps.segment");
  snap.taken_unix_ns = parse_u64(path, meta, "shmps.taken_unix_ns");
  snap.epoch = parse_u64(path, meta, "shmps.epoch");
  snap.model_clock = parse_u64(path, meta, "shmps.model_clock");
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

  // Parameters, in segment order, as "shmps.params" lists them.
  std::vector<std::string> order;
  try {
    order = meta_json(path, meta, "shmps.params").get<std::vector<std::string>>();
  } catch (const json::exception& e) {
    fail(path, std::string("metadata \"shmps.params\": ") + e.what());
  }
  const auto names = state_names(snap.optimizer.kind);
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
    p.values = file.f32(name, t.shape);
    for (std::size_t a = 0; a < names.size(); ++a) {
      const std::string state = name + "/" + names[a];
      if (!file.tensors().contains(state))
        fail(path, "tensor \"" + state + "\" is missing: the " + std::string(to_string(snap.optimizer.kind)) +
                       " optimizer's state of \"" + name + "\"");
      p.state[a] = file.f32(state, t.shape);
    }
    slices += (p.values.size() + snap.slice_floats - 1) / snap.slice_floats;
    snap.params.push_back(std::move(p));
  }
  if (snap.params.empty()) fail(path, "holds no parameter tensors");
  snap.slice_version = i64(file, "shmps/slice_version", {slices});
  snap.slice_clock = i64(file, "shmps/slice_clock", {slices});
  snap.slice_step = i64(file, "shmps/slice_step", {slices});
  snap.last_applied = i64(file, "shmps/last_applied", {slices, snap.max_workers});
  for (std::uint64_t s = 0; s < slices; ++s)
    if (snap.slice_version[s] < 0 || (snap.slice_version[s] & 1) || snap.slice_clock[s] < 0 || snap.slice_step[s] < 0)
      fail(path, "tensor \"shmps/slice_version\", \"slice_clock\" or \"slice_step\" holds an impossible value for slice " +
                     std::to_string(s));
  return snap;
}

void check_restorable(const Snapshot& snap, const std::filesystem::path& path, const ModelSpec& spec,
                      const LayoutPlan& plan) {
  for (std::size_t i = 0; i < spec.params.size(); ++i) {
    const ParamSpec& want = spec.params[i];
    auto it = std::find_if(snap.params.begin(), snap.params.end(), [&](const auto& p) { return p.name == want.name; });
    if (it == snap.params.end())
      fail(path, "has no tensor \"" + want.name + "\", a parameter of " + spec.source + ": it is a checkpoint of another model");
    if (it->shape != want.shape)
      fail(path, "tensor \"" + want.name + "\" has shape " + shape_text(it->shape) + ", but " + spec.source + " says " +
                     shape_text(want.shape));
    if (it != snap.params.begin() + static_cast<std::ptrdiff_t>(i))
      fail(path, "parameter \"" + want.name + "\" is at position " + std::to_string(it - snap.params.begin()) +
                     " in the checkpoint, " + std::to_string(i) + " in " + spec.source + ": list them in the same order");
  }
  if (snap.params.size() != spec.params.size())
    fail(path, "has " + std::to_string(snap.params.size()) + " parameters, " + spec.source + " has " +
                   std::to_string(spec.params.size()) + ": it is a checkpoint of another model");
  if (snap.optimizer.kind != spec.optimizer.kind)
    fail(path, "was written with optimizer " + std::string(to_string(snap.optimizer.kind)) + ", " + spec.source +
                   " asks for " + std::string(to_string(spec.optimizer.kind)) + ": the optimizer state cannot carry over; "
                   "set kind = \"" + std::string(to_string(snap.optimizer.kind)) + "\"");
  if (snap.slice_floats != plan.slice_floats)
    fail(path, "was sliced at " + std::to_string(snap.slice_floats * sizeof(float)) + " bytes per slice, " + spec.source +
                   " at " + std::to_string(plan.slice_floats * sizeof(float)) + ": set slice_bytes = " +
                   std::to_string(snap.slice_floats * sizeof(float)));
  for (const auto& s : snap.slots)
    if (s.rank >= spec.max_workers)
      fail(path, "holds the state of worker rank " + std::to_string(s.rank) + ", but " + spec.source + " has only " +
                     std::to_string(spec.max_workers) + " worker slots: raise max_workers");
}

void restore_into(Segment& segment, const Snapshot& snap) {
  SegmentHeader& h = segment.header();
  h.optimizer = snap.optimizer;
  store_release(h.model_clock, snap.model_clock);
  store_release(h.consistency, static_cast<std::uint32_t>(snap.consistency));
  store_release(h.staleness, snap.staleness);
  store_release(h.bsp_aggregate, static_cast<std::uint32_t>(snap.bsp_aggregate));
  store_release(h.on_worker_death, static_cast<std::uint32_t>(snap.on_worker_death));
  store_release(h.server_epoch, snap.epoch);
  store_release(h.steps, snap.steps);
  store_release(h.records_applied, snap.records_applied);
  store_release(h.records_skipped, snap.records_skipped);
  store_release(h.records_discarded, snap.records_discarded);
  store_release(h.floats_applied, snap.floats_applied);
  store_release(h.apply_rounds, snap.apply_rounds);
  const int arrays = static_cast<int>(h.state_arrays);
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const ParamEntry& p = segment.param(i);
    const Snapshot::Param& sp = snap.params[i];
    std::memcpy(segment.values(p), sp.values.data(), p.size * sizeof(float));
    for (int a = 0; a < arrays; ++a) std::memcpy(segment.state(p, a), sp.state[a].data(), p.size * sizeof(float));
  }
  const std::uint32_t columns = std::min(h.max_workers, snap.max_workers);
  for (std::uint64_t s = 0; s < h.slice_count; ++s) {
    SliceEntry& slice = segment.slice(s);
    store_release(slice.version, static_cast<std::uint64_t>(snap.slice_version[s]));
    store_release(slice.clock, static_cast<std::uint64_t>(snap.slice_clock[s]));
    slice.step = static_cast<std::uint64_t>(snap.slice_step[s]);
    for (std::uint32_t r = 0; r < columns; ++r)
      segment.last_applied(s, r) = static_cast<std::uint64_t>(snap.last_applied[s * snap.max_workers + r]);
  }
  for (const auto& s : snap.slots) {
    WorkerSlot& slot = segment.slot(s.rank);
    store_release(slot.generation, s.generation);
    // Its holder is gone: proven dead (it takes part in barriers again once a worker takes the
    // slot, or keeps them waiting with on_worker_death = wait), or it had left.
    store_release(slot.dead_generation, s.generation);
    store_release(slot.admitted_generation, s.generation);
    store_release(slot.admitted_clock, s.consumed_clock);
    store_release(slot.published, s.applied);
    store_release(slot.applied, s.applied);
    store_release(slot.clock, s.consumed_clock);
    store_release(slot.consumed_clock, s.consumed_clock);
    store_release(slot.records_applied, s.records_applied);
    store_release(slot.records_discarded, s.records_discarded);
    if (!s.resume.empty()) std::memcpy(slot.resume, s.resume.data(), s.resume.size());  // data() may be null
    store_release(slot.resume_bytes, static_cast<std::uint32_t>(s.resume.size()));
    store_release(slot.resume_clock, s.resume_clock);
    store_release(slot.resume_version, std::uint64_t{2});
    store_release(slot.state, s.state);
  }
}

// ---------------------------------------------------------------------------------- directory

namespace {
// "<segment>.<8+ digits>.safetensors" -> serial, or -1.
std::int64_t serial_of(const std::string& file, const std::string& segment) {
  const std::string prefix = segment + ".", suffix = ".safetensors";
  if (file.size() <= prefix.size() + suffix.size() || file.compare(0, prefix.size(), prefix) != 0 ||
      file.compare(file.size() - suffix.size(), suffix.size(), suffix) != 0)
    return -1;
  const std::string_view digits(file.data() + prefix.size(), file.size() - prefix.size() - suffix.size());
  std::int64_t serial = 0;
  auto r = std::from_chars(digits.data(), digits.data() + digits.size(), serial);
  if (r.ec != std::errc() || r.ptr != digits.data() + digits.size() || serial < 0) return -1;
  return serial;
}
}  // namespace

CheckpointDir::CheckpointDir(std::filesystem::path dir, std::string segment) : dir_(std::move(dir)), segment_(std::move(segment)) {}

std::vector<std::filesystem::path> CheckpointDir::list() const {
  std::vector<std::pair<std::int64_t, std::filesystem::path>> found;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
    const std::int64_t serial = serial_of(entry.path().filename().string(), segment_);
    if (serial >= 0 && entry.is_regular_file(ec)) found.emplace_back(serial, entry.path());
  }
  std::sort(found.begin(), found.end());
  std::vector<std::filesystem::path> out;
  for (auto& f : found) out.push_back(std::move(f.second));
  return out;
}

std::filesystem::path CheckpointDir::next_path() const {
  const auto files = list();
  const std::int64_t next = files.empty() ? 1 : serial_of(files.back().filename().string(), segment_) + 1;
  char digits[32];
  std::snprintf(digits, sizeof digits, "%08lld", static_cast<long long>(next));
  return dir_ / (segment_ + "." + digits + ".safetensors");
}

std::size_t CheckpointDir::prune(std::size_t keep) const {
  if (keep == 0) return 0;
  const auto files = list();
  std::size_t removed = 0;
  for (std::size_t i = 0; i + keep < files.size(); ++i) {
    std::error_code ec;
    if (std::filesystem::remove(files[i], ec)) ++removed;
  }
  return removed;
}

std::size_t CheckpointDir::remove_temporaries() const {
  std::size_t removed = 0;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
    const std::string file = entry.path().filename().string();
    const auto tmp = file.rfind(".tmp-");
    if (tmp == std::string::npos || serial_of(file.substr(0, tmp), segment_) < 0) continue;
    std::error_code rm;
    if (std::filesystem::remove(entry.path(), rm)) ++removed;
  }
  return removed;
}

std::optional<CheckpointDir::Found> CheckpointDir::newest_valid(std::vector<std::string>& skipped) const {
  auto files = list();
  if (files.empty()) return std::nullopt;
  for (auto it = files.rbegin(); it != files.rend(); ++it) {
    try {
      return Found{*it, read_checkpoint(*it)};
    } catch (const Error& e) {
      skipped.push_back(e.what());
    }
  }
  std::string why;
  for (const auto& s : skipped) why += "\n  " + s;
  throw Error("no valid checkpoint of '" + segment_ + "' in " + dir_.string() + " (" + std::to_string(files.size()) +
              " tried):" + why + "\nmove the damaged files away to start the job from its spec");
}

std::string parse_checkpoint_every(std::string_view text, CheckpointEvery& out) {
  out = {};
  std::uint64_t n = 0;
  auto r = std::from_chars(text.data(), text.data() + text.size(), n);
  const std::string_view unit(r.ptr, static_cast<std::size_t>(text.data() + text.size() - r.ptr));
  const std::string usage = "expected a period (500ms, 30s, 5m, 2h) or a number of clocks (100clocks), got \"" +
                            std::string(text) + "\"";
  if (r.ec != std::errc() || r.ptr == text.data()) return usage;
  if (n == 0) return "must be more than 0, got \"" + std::string(text) + "\"";
  if (unit == "clocks" || unit == "clock") {
    out.clocks = n;
    return {};
  }
  std::uint64_t ms_per = 0;
  if (unit == "ms") ms_per = 1;
  else if (unit == "s") ms_per = 1000;
  else if (unit == "m") ms_per = 60'000;
  else if (unit == "h") ms_per = 3'600'000;
  else return usage;
  if (n > UINT64_MAX / ms_per / 2) return "is too long: \"" + std::string(text) + "\"";
  out.period = std::chrono::milliseconds(static_cast<std::int64_t>(n * ms_per));
  return {};
}

}  // namespace shmps::server
