#include "shmps/server/initialise.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string_view>
#include <system_error>
#include <utility>

#include <shmps/error.hpp>
#include <shmps/shape.hpp>
#include <shmps/server/safetensors.hpp>
#include <shmps/splitmix.hpp>

#include "parallel.hpp"

namespace shmps::server {

namespace {

// `"s"` (built by appending: GCC 12 warns falsely (-Wrestrict) about "\"" + std::string(s)).
std::string dq(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out += '"';
  out += s;
  out += '"';
  return out;
}

[[noreturn]] void fail(const ParamSpec& param, const std::string& problem) {
  throw Error("param " + dq(param.name) + ": init from " + param.init.file.string() + ": " + problem);
}


// `no tensor "x" in the file; it has 3 tensors: "a", "b", "c"`: the names closest to the wanted
// one first (one that adds or drops a dotted prefix, then by edit distance), at most kShown.
std::string missing_text(const safetensors::File& file, const ParamSpec& param) {
  constexpr std::size_t kShown = 6;
  const std::string& want = param.init.tensor;
  const auto& tensors = file.tensors();
  std::string out = "no tensor " + dq(want) + " in the file";
  if (tensors.empty()) return out + "; the file holds no tensors";
  // "model.fc1.weight" for "fc1.weight" (or the other way round): a prefix added or dropped.
  auto dotted_suffix = [](std::string_view longer, std::string_view shorter) {
    return longer.size() > shorter.size() && longer.ends_with(shorter) &&
           longer[longer.size() - shorter.size() - 1] == '.';
  };
  std::vector<std::pair<std::size_t, std::string_view>> ranked;
  for (const auto& [name, t] : tensors) {
    (void)t;
    const bool related = dotted_suffix(name, want) || dotted_suffix(want, name);
    ranked.emplace_back(related ? 0 : 1 + name_distance(name, want), name);
  }
  const std::size_t shown = std::min(kShown, ranked.size());
  std::partial_sort(ranked.begin(), ranked.begin() + static_cast<std::ptrdiff_t>(shown), ranked.end());
  ranked.resize(shown);
  out += "; it has " + std::to_string(tensors.size()) + (tensors.size() == 1 ? " tensor" : " tensors");
  out += tensors.size() > kShown ? ", the closest: " : ": ";
  for (std::size_t i = 0; i < ranked.size(); ++i) out += (i > 0 ? ", " : "") + dq(ranked[i].second);
  out += "; set tensor = \"<name>\" in the init to load a tensor of another name";
  return out;
}

std::vector<float> extract(const safetensors::File& file, const ParamSpec& param) {
  const std::string& name = param.init.tensor;
  const auto it = file.tensors().find(name);
  if (it == file.tensors().end()) fail(param, missing_text(file, param));
  const safetensors::Tensor& t = it->second;
  // F32 as it is; BF16 and F16 widened, exactly (every bf16 / fp16 value is a float32 one): a
  // half-precision export or checkpoint of this or another job, or bf16 weights from elsewhere.
  const bool half = t.dtype == "BF16" || t.dtype == "F16";
  if (t.dtype != "F32" && !half) {
    fail(param, "tensor " + dq(name) + " has dtype " + t.dtype +
                    "; initial values are read from F32, BF16 or F16 tensors only (convert it to one of them)");
  }
  if (t.shape != param.shape) {
    std::string msg =
        "tensor " + dq(name) + " has shape " + shape_text(t.shape) + ", the spec says " + shape_text(param.shape);
    std::uint64_t n = 1;
    bool overflow = false;
    for (std::uint64_t d : t.shape) overflow = overflow || __builtin_mul_overflow(n, d, &n);
    if (!overflow && n == param.size()) msg += " (the same number of elements, but the shape must match exactly)";
    fail(param, msg);
  }
  const std::vector<float> values = file.floats(t);
  for (std::size_t k = 0; k < values.size(); ++k) {
    if (!std::isfinite(values[k])) {
      fail(param, "tensor " + dq(name) + " holds " + (std::isnan(values[k]) ? "NaN" : "an infinity") +
                      " at element " + std::to_string(k) + " (row-major); initial values must be finite");
    }
  }
  return values;
}

}  // namespace

PretrainedValues load_pretrained(const ModelSpec& spec) {
  // The pretrained parameters, grouped by file in the order of first use.
  struct Group {
    std::vector<const ParamSpec*> params;
  };
  std::vector<Group> groups;
  std::map<std::filesystem::path, std::size_t> group_of;  // by the file's canonical path
  for (const ParamSpec& p : spec.params) {
    if (p.init.kind != InitSpec::Kind::pretrained) continue;
    std::error_code ec;
    std::filesystem::path key = std::filesystem::weakly_canonical(p.init.file, ec);
    if (ec) key = p.init.file.lexically_normal();
    const auto [it, fresh] = group_of.emplace(std::move(key), groups.size());
    if (fresh) groups.emplace_back();
    groups[it->second].params.push_back(&p);
  }

  PretrainedValues out;
  for (const Group& g : groups) {
    const ParamSpec& first = *g.params.front();
    auto read = [&] {
      try {
        return safetensors::File::read(first.init.file);
      } catch (const Error& e) {
        // The reader says "<path>: <problem>"; fail() names the path already.
        std::string problem = e.what();
        const std::string prefix = first.init.file.string() + ": ";
        if (problem.rfind(prefix, 0) == 0) problem.erase(0, prefix.size());
        fail(first, problem);
      }
    };
    const safetensors::File file = read();
    for (const ParamSpec* p : g.params) out.by_param.insert_or_assign(p->name, extract(file, *p));
  }
  return out;
}

void initialise(const ParamSpec& param, std::span<float> values, const PretrainedValues& pretrained) {
  if (param.init.kind != InitSpec::Kind::pretrained) {
    initialise(param.init, values);
    return;
  }
  const auto it = pretrained.by_param.find(param.name);
  if (it == pretrained.by_param.end()) {
    fail(param, "its values were not loaded (load_pretrained must be called for this spec first)");
  }
  if (it->second.size() != values.size()) {
    fail(param, "load_pretrained gave " + std::to_string(it->second.size()) + " values for a parameter of " +
                    std::to_string(values.size()));
  }
  std::copy(it->second.begin(), it->second.end(), values.begin());
}

void initialise(const InitSpec& init, std::span<float> values) {
  switch (init.kind) {
    case InitSpec::Kind::zeros:
    case InitSpec::Kind::put:  // zeros until a worker puts the values
      std::fill(values.begin(), values.end(), 0.0f);
      return;
    case InitSpec::Kind::constant:
      std::fill(values.begin(), values.end(), init.value);
      return;
    case InitSpec::Kind::u24:
      // Element k is draw k of the stream: each element is computed on its own, so the work
      // splits freely across threads and the bytes do not depend on the split.
      {
        constexpr std::size_t kChunk = 1 << 16;
        tbb::task_arena arena;
        parallel_for_index(arena, (values.size() + kChunk - 1) / kChunk, [&](std::size_t chunk, std::size_t) {
          const std::size_t end = std::min(values.size(), (chunk + 1) * kChunk);
          for (std::size_t k = chunk * kChunk; k < end; ++k) values[k] = u24(splitmix_draw(init.stream, k)) * init.scale;
        });
      }
      return;
    case InitSpec::Kind::pretrained:
      throw Error("init from " + init.file.string() + " (tensor " + dq(init.tensor) +
                  "): pretrained values come from load_pretrained; use "
                  "initialise(param, values, pretrained)");
  }
}

}  // namespace shmps::server
