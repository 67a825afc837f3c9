// Checks a ModelSpec built in code (validate_model_spec) and a segment name
// (validate_segment_name): the same rules the parser applies with positions
// (model_spec_rules.hpp), reported as "<field>: <problem>".
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "model_spec_rules.hpp"
#include "shmps/server/model_spec.hpp"
#include "shmps/server/optimizer.hpp"  // validate_optimizer_settings (header-only)

namespace shmps::server {

using namespace spec_detail;

std::string validate_segment_name(std::string_view name) {
  const std::string allowed = "use only letters, digits, '.', '_' and '-'";
  if (name.empty()) {
    return "segment name is empty; " + allowed + " (1 to " + std::to_string(kMaxSegmentNameLength) +
           " characters)";
  }
  if (name.size() > kMaxSegmentNameLength) {
    return "segment name " + quote(name) + " is " + std::to_string(name.size()) +
           " characters long; the limit is " + std::to_string(kMaxSegmentNameLength);
  }
  for (std::size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (ok) continue;
    std::string what;
    const auto u = static_cast<unsigned char>(c);
    if (c == ' ') {
      what = "a space";
    } else if (u > 0x20 && u < 0x7f) {
      what = std::string("'") + c + "'";
    } else {
      constexpr char hex[] = "0123456789ABCDEF";
      what = std::string("the byte 0x") + hex[u >> 4] + hex[u & 15];
    }
    return "segment name " + quote(name) + " contains " + what + " at position " +
           std::to_string(i + 1) + ", which is not allowed; " + allowed;
  }
  if (name.front() == '.' || name.front() == '-') {
    return "segment name " + quote(name) + " starts with '" + name.front() +
           "', which is not allowed; start with a letter, a digit or '_'";
  }
  if (name.size() >= 5 && name.substr(name.size() - 5) == ".lock") {
    return "segment name " + quote(name) +
           " ends in \".lock\", which shmps keeps for its lock files; choose another name";
  }
  return {};
}

namespace {

// "" or "<field>: <problem>" for the job-wide settings: sizes, policy, optimizer.
std::string settings_problem(const ModelSpec& spec) {
  auto int_field = [](std::string_view field, const IntRule& rule, std::uint64_t v) -> std::string {
    if (rule.ok(v)) return {};
    return std::string(field) + ": " + rule.text() + ", got " + std::to_string(v);
  };
  if (auto p = int_field("slice_bytes", kSliceBytesRule, spec.slice_bytes); !p.empty()) return p;
  if (auto p = int_field("max_workers", kMaxWorkersRule, spec.max_workers); !p.empty()) return p;
  if (auto p = int_field("workers_per_group", kWorkersPerGroupRule, spec.workers_per_group); !p.empty()) return p;
  if (spec.workers_per_group > spec.max_workers)
    return "workers_per_group: must be at most max_workers (" + std::to_string(spec.max_workers) + "), got " +
           std::to_string(spec.workers_per_group);
  if (auto p = int_field("ring_bytes", kRingBytesRule, spec.ring_bytes); !p.empty()) return p;
  if (auto p = int_field("server_threads", kServerThreadsRule, spec.server_threads); !p.empty()) {
    return p;
  }
  if (static_cast<std::uint32_t>(spec.consistency) > static_cast<std::uint32_t>(Consistency::ssp)) {
    return "consistency: unknown mode " +
           std::to_string(static_cast<std::uint32_t>(spec.consistency));
  }
  if (spec.consistency != Consistency::ssp && spec.staleness != 0) {
    return "staleness: only meaningful with consistency ssp, got " +
           std::to_string(spec.staleness) + " with " + std::string(to_string(spec.consistency));
  }
  if (std::string p = validate_optimizer_settings(spec.optimizer); !p.empty()) {
    return "optimizer." + p;
  }
  if (spec.optimizer.kind == OptimizerKind::rowwise_adagrad)
    return "optimizer.kind: rowwise_adagrad is a table's optimizer only (one accumulator per table row)";
  return {};
}

// "" or "<at>.shape: <problem>"; adds the parameter's bytes to `total` (all parameters so far).
std::string shape_problem(const ParamSpec& p, const std::string& at, std::uint64_t& total) {
  if (p.shape.empty()) return at + ".shape: is empty; give at least one dimension";
  if (p.shape.size() > kMaxParamDims) {
    return at + ".shape: has " + std::to_string(p.shape.size()) + " dimensions; at most " +
           std::to_string(kMaxParamDims) + " are supported";
  }
  for (std::size_t d = 0; d < p.shape.size(); ++d) {
    if (p.shape[d] == 0) return at + ".shape: the " + dimension_name(d) + " is 0";
  }
  const auto elements = checked_elements(p.shape);
  if (!elements) return at + ".shape: " + too_large_text(p.shape);
  const std::uint64_t bytes = *elements * sizeof(float);
  if (bytes > kMaxParamBytes - total) return at + ".shape: " + total_too_large_text(total);
  total += bytes;
  return {};
}

// "" or "<at>.init.<key>: <problem>".
std::string init_problem(const InitSpec& init, const std::string& at) {
  switch (init.kind) {
    case InitSpec::Kind::zeros:
    case InitSpec::Kind::put:
      break;
    case InitSpec::Kind::constant:
      if (!std::isfinite(init.value)) return at + ".init.value: must be finite";
      break;
    case InitSpec::Kind::u24:
      if (!std::isfinite(init.scale)) return at + ".init.scale: must be finite";
      break;
    case InitSpec::Kind::pretrained:
      if (std::string problem = text_problem(init.file.native(), "the path of a safetensors file");
          !problem.empty()) {
        return at + ".init.file: " + problem;
      }
      if (std::string problem = text_problem(init.tensor, "the tensor's name in the file");
          !problem.empty()) {
        return at + ".init.tensor: " + problem;
      }
      break;
    default:
      return at + ".init.kind: unknown init kind " + std::to_string(static_cast<int>(init.kind));
  }
  return {};
}

}  // namespace

std::string spec_detail::table_problem(const ModelSpec& spec, const ParamSpec& p, const std::string& at) {
  if (p.table_dim == 0) return {};
  if (p.shape.size() != 2 || p.shape[1] != p.table_dim)
    return at + ": a table's shape must be {rows, dim}";
  if (p.optimizer) {
    if (std::string problem = validate_optimizer_settings(*p.optimizer); !problem.empty())
      return at + ".optimizer." + problem;
    if (p.optimizer->state_dtype != spec.optimizer.state_dtype)
      return at + ".optimizer.state_dtype: must be the job's (" + std::string(to_string(spec.optimizer.state_dtype)) +
             ", set in [optimizer]): the optimizer state has one dtype per job";
  }
  if (p.keyed) {
    const auto kind = p.init.kind;
    if (kind != InitSpec::Kind::zeros && kind != InitSpec::Kind::constant && kind != InitSpec::Kind::u24)
      return at + ".init: a table with keys = \"u64\" starts each key's row from its init when the key is first "
                  "seen, so the init must be zeros, constant or u24, not " + std::string(to_string(kind));
    if (p.dtype != shm::DType::f32)
      return at + ".dtype: a table with keys = \"u64\" keeps float32 rows; remove dtype or make it \"f32\"";
    if (p.admit_after == 0) return at + ".admit_after: must be at least 1";
    if (p.shape[0] >= (std::uint64_t{1} << 32))
      return at + ".rows: a table with keys = \"u64\" has at most 2^32 - 1 slots, got " + std::to_string(p.shape[0]);
  } else if (p.admit_after != 1) {
    return at + ".admit_after: only a table with keys = \"u64\" admits keys";
  }
  if ((spec.slice_bytes / sizeof(float)) % p.table_dim != 0)
    return at + ".dim: " + std::to_string(p.table_dim) + " floats per row do not divide a slice of " +
           std::to_string(spec.slice_bytes) + " bytes (slice_bytes), and a row must not straddle two slices: " +
           "make slice_bytes a multiple of " + std::to_string(4 * p.table_dim);
  return {};
}

std::string validate_model_spec(const ModelSpec& spec) {
  if (std::string p = validate_segment_name(spec.name); !p.empty()) return "name: " + p;
  if (std::string p = settings_problem(spec); !p.empty()) return p;
  if (spec.params.empty()) return "param: no parameters; a model needs at least one";
  std::map<std::string_view, std::size_t> seen;
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < spec.params.size(); ++i) {
    const ParamSpec& p = spec.params[i];
    const std::string at = "param[" + std::to_string(i) + "]";
    if (std::string problem = param_name_problem(p.name); !problem.empty()) {
      return at + ".name: " + problem;
    }
    if (auto [it, fresh] = seen.emplace(p.name, i); !fresh) {
      return at + ".name: duplicate parameter name " + quote(p.name) + " (first used by param[" +
             std::to_string(it->second) + "]); parameter names must be unique";
    }
    if (std::string problem = shape_problem(p, at, total); !problem.empty()) return problem;
    if (std::string problem = init_problem(p.init, at); !problem.empty()) return problem;
    if (std::string problem = table_problem(spec, p, at); !problem.empty()) return problem;
    if (p.optimizer && p.table_dim == 0)
      return at + ".optimizer: only a table may have its own optimizer; a dense parameter takes the job's [optimizer]";
    if (static_cast<std::uint32_t>(p.dtype) > static_cast<std::uint32_t>(shm::DType::fp16))
      return at + ".dtype: unknown dtype " + std::to_string(static_cast<std::uint32_t>(p.dtype)) +
             "; use f32, bf16 or fp16";
  }
  return {};
}

}  // namespace shmps::server
