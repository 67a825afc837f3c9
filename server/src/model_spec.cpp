// The model spec: TOML parsing (toml++) and validation. See model_spec.hpp for the format.
//
// The parser checks each value where it reads it, so that every error carries the position of
// the offending key or value; the value rules themselves are shared with validate_model_spec
// (and, for the optimizer, with optimizer.hpp), so a spec built in code is held to the same
// rules as a file.
#include "shmps/server/model_spec.hpp"

#include <toml++/toml.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "shmps/server/optimizer.hpp"  // the optimizer's value rules (header-only)
#include "shmps/shape.hpp"
#include "shmps/shm/layout.hpp"

namespace shmps::server {

static_assert(kMaxSegmentNameLength + 1 == shm::kMaxNameBytes, "segment names must fit the header");
static_assert(kMaxParamNameBytes + 1 == shm::kMaxNameBytes, "param names must fit a ParamEntry");
static_assert(kMaxParamDims == shm::kMaxDims, "shapes must fit a ParamEntry");

namespace {

using Keys = std::span<const std::string_view>;

constexpr std::string_view kRootKeysList[] = {"name",          "slice_bytes",     "max_workers",
                                              "ring_bytes",    "server_threads",  "consistency",
                                              "bsp_aggregate", "on_worker_death", "optimizer",
                                              "param"};
constexpr std::string_view kOptimizerKeysList[] = {
    "kind", "lr",  "momentum",     "beta1",      "beta2",
    "rho",  "eps", "weight_decay", "clip_value", "clip_norm"};
constexpr std::string_view kParamKeysList[] = {"name", "shape", "init"};
constexpr std::string_view kOptimizerKindsList[] = {"sgd",     "momentum", "nesterov",
                                                    "adagrad", "rmsprop",  "adam"};
constexpr std::string_view kInitKindsList[] = {"zeros", "constant", "u24", "pretrained"};
constexpr std::string_view kZerosKeys[] = {"kind"};
constexpr std::string_view kConstantKeys[] = {"kind", "value"};
constexpr std::string_view kU24Keys[] = {"kind", "stream", "scale", "scale_divisor"};
constexpr std::string_view kPretrainedKeys[] = {"kind", "file", "tensor"};
constexpr Keys kRootKeys{kRootKeysList};
constexpr Keys kOptimizerKeys{kOptimizerKeysList};
constexpr Keys kParamKeys{kParamKeysList};
constexpr Keys kOptimizerKinds{kOptimizerKindsList};
constexpr Keys kInitKinds{kInitKindsList};
constexpr std::size_t kMaxSpecFileBytes = std::size_t{16} << 20;

// ---- Text helpers ---------------------------------------------------------------------------

std::string quote(std::string_view s) {
  constexpr std::size_t kMax = 80;
  std::string out = "\"";
  for (std::size_t i = 0; i < s.size() && i < kMax; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      constexpr char hex[] = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > kMax) out += "...";
  out += '"';
  return out;
}

std::string join(Keys words, std::string_view sep = ", ", bool quoted = false) {
  std::string out;
  for (std::string_view w : words) {
    if (!out.empty()) out += sep;
    out += quoted ? quote(w) : std::string(w);
  }
  return out;
}

bool contains(Keys words, std::string_view w) {
  return std::find(words.begin(), words.end(), w) != words.end();
}

char lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }


// " (did you mean "lr"?)" for a near miss, else "".
std::string did_you_mean(std::string_view word, Keys candidates) {
  std::string_view best;
  std::size_t best_d = std::numeric_limits<std::size_t>::max();
  for (std::string_view c : candidates) {
    const std::size_t d = name_distance(word, c);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  const std::size_t limit = std::max<std::size_t>(1, std::min<std::size_t>(2, best.size() / 3));
  if (best_d > limit) return {};
  return " (did you mean " + quote(best) + "?)";
}

std::string type_name(toml::node_type t) {
  switch (t) {
    case toml::node_type::table:
      return "a table";
    case toml::node_type::array:
      return "an array";
    case toml::node_type::string:
      return "a string";
    case toml::node_type::integer:
      return "an integer";
    case toml::node_type::floating_point:
      return "a float";
    case toml::node_type::boolean:
      return "a boolean";
    case toml::node_type::date:
      return "a date";
    case toml::node_type::time:
      return "a time";
    case toml::node_type::date_time:
      return "a date-time";
    case toml::node_type::none:
      break;
  }
  return "nothing";
}

// e.g. `a string ("8")`, `a float (2.5)`, `an array`.
std::string describe(const toml::node& n) {
  std::string out = type_name(n.type());
  if (const auto* s = n.as_string()) return out + " (" + quote(s->get()) + ")";
  if (const auto* i = n.as_integer()) return out + " (" + std::to_string(i->get()) + ")";
  if (const auto* f = n.as_floating_point())
    return out + " (" + detail::format_number(f->get()) + ")";
  if (const auto* b = n.as_boolean()) return out + (b->get() ? " (true)" : " (false)");
  return out;
}

std::string pow2_text(std::uint64_t v) {
  for (int k = 20; k < 64; ++k) {  // 2^20 and above read better as powers of two
    if (v == std::uint64_t{1} << k) return "2^" + std::to_string(k);
  }
  return std::to_string(v);
}

// ---- Value rules (shared by the parser and validate_model_spec) -----------------------------

struct IntRule {
  std::uint64_t lo, hi, multiple;
  std::string_view note;
  bool ok(std::uint64_t v) const { return v >= lo && v <= hi && v % multiple == 0; }
  std::string text() const {
    std::string out = "must be ";
    if (multiple > 1) out += "a multiple of " + std::to_string(multiple) + " ";
    out += lo == 0 ? "at most " + pow2_text(hi)
                   : "from " + std::to_string(lo) + " to " + pow2_text(hi);
    return out + std::string(note);
  }
};

constexpr IntRule kSliceBytesRule{64, kMaxSliceBytes, 64, ""};
constexpr IntRule kMaxWorkersRule{1, kMaxWorkersLimit, 1, ""};
constexpr IntRule kRingBytesRule{0, kMaxRingBytes, 64, " (0 = sized by the server)"};
constexpr IntRule kServerThreadsRule{0, kMaxServerThreads, 1, " (0 = all cores)"};

std::string param_name_problem(std::string_view name) {
  if (name.empty()) return "must not be empty";
  if (name.size() > kMaxParamNameBytes) {
    return "is " + std::to_string(name.size()) + " bytes long; the limit is " +
           std::to_string(kMaxParamNameBytes);
  }
  for (std::size_t i = 0; i < name.size(); ++i) {
    const auto c = static_cast<unsigned char>(name[i]);
    if (c <= 0x20 || c == 0x7f) {
      return quote(name) + " contains " +
             (c == ' ' ? std::string("a space") : "a control character") + " at position " +
             std::to_string(i + 1) + ", which is not allowed in a parameter name";
    }
  }
  return {};
}

// "" if `text` can be a pretrained file path or tensor name (not empty, no NUL byte).
std::string text_problem(std::string_view text, std::string_view what) {
  if (text.empty()) return "must not be empty; give " + std::string(what);
  if (const auto nul = text.find('\0'); nul != std::string_view::npos) {
    return quote(text) + " contains a NUL byte at position " + std::to_string(nul + 1);
  }
  return {};
}

// Elements of a shape, or nullopt if its float32 bytes would exceed kMaxParamBytes.
std::optional<std::uint64_t> checked_elements(const std::vector<std::uint64_t>& shape) {
  constexpr std::uint64_t kMaxElements = kMaxParamBytes / sizeof(float);
  std::uint64_t n = 1;
  for (std::uint64_t d : shape) {
    if (d == 0) return 0;
    if (n > kMaxElements / d) return std::nullopt;
    n *= d;
  }
  return n;
}

std::string too_large_text(const std::vector<std::uint64_t>& shape) {
  return "shape " + shape_text(shape) + " is too large: a parameter may hold at most " +
         pow2_text(kMaxParamBytes) + " bytes (" + pow2_text(kMaxParamBytes / sizeof(float)) +
         " float32 elements)";
}

std::string total_too_large_text(std::uint64_t before) {
  return "the parameters up to this one hold more than " + pow2_text(kMaxParamBytes) +
         " bytes in total (" + std::to_string(before) + " bytes before this one)";
}

std::string_view ordinal(std::size_t i) {
  static constexpr std::string_view kOrd[] = {"1st", "2nd", "3rd"};
  return i < 3 ? kOrd[i] : std::string_view();
}

std::string dimension_name(std::size_t i) {
  const std::string_view ord = ordinal(i);
  return ord.empty() ? "dimension " + std::to_string(i + 1) : std::string(ord) + " dimension";
}

// Which optimizer kinds use a settings key (empty: all of them).
Keys kinds_using(std::string_view key) {
  static constexpr std::string_view kMomentumList[] = {"momentum", "nesterov"};
  constexpr Keys kMomentum{kMomentumList};
  static constexpr std::string_view kAdamList[] = {"adam"};
  constexpr Keys kAdam{kAdamList};
  static constexpr std::string_view kRmspropList[] = {"rmsprop"};
  constexpr Keys kRmsprop{kRmspropList};
  static constexpr std::string_view kEpsList[] = {"adagrad", "rmsprop", "adam"};
  constexpr Keys kEps{kEpsList};
  if (key == "momentum") return kMomentum;
  if (key == "beta1" || key == "beta2") return kAdam;
  if (key == "rho") return kRmsprop;
  if (key == "eps") return kEps;
  return {};
}

float* settings_field(OptimizerSettings& s, std::string_view key) {
  if (key == "lr") return &s.lr;
  if (key == "momentum") return &s.momentum;
  if (key == "beta1") return &s.beta1;
  if (key == "beta2") return &s.beta2;
  if (key == "rho") return &s.rho;
  if (key == "eps") return &s.eps;
  if (key == "weight_decay") return &s.weight_decay;
  if (key == "clip_value") return &s.clip_value;
  if (key == "clip_norm") return &s.clip_norm;
  return nullptr;
}

// ---- The parser -----------------------------------------------------------------------------

class Parser {
 public:
  Parser(std::string source, std::filesystem::path base_dir)
      : source_(std::move(source)), base_dir_(std::move(base_dir)) {}

  ModelSpec parse(std::string_view text) {
    toml::table root;
    try {
      root = toml::parse(text, std::string_view(source_));
    } catch (const toml::parse_error& e) {
      fail(e.source(), "", "syntax error: " + std::string(e.description()));
    }
    ModelSpec spec;
    spec.source = source_;
    check_keys(root, "", kRootKeys, "");
    read_top_level(root, spec);
    read_optimizer(root, spec.optimizer);
    read_params(root, spec);
    // Safety net: everything above should already have been caught, with its position.
    if (std::string problem = validate_model_spec(spec); !problem.empty()) {
      throw SpecError(source_ + ": " + problem);
    }
    return spec;
  }

 private:
  std::string source_;
  std::filesystem::path base_dir_;  // relative pretrained files are resolved against it

  [[noreturn]] void fail(const toml::source_region& where, std::string_view field,
                         std::string_view problem) const {
    std::string msg = source_;
    if (where.begin.line > 0) {
      msg += ":" + std::to_string(where.begin.line) + ":" + std::to_string(where.begin.column);
    }
    msg += ": ";
    if (!field.empty()) {
      msg += field;
      msg += ": ";
    }
    msg += problem;
    throw SpecError(msg);
  }

  // Rejects the first key (in file order) of t that is not in allowed.
  void check_keys(const toml::table& t, const std::string& prefix, Keys allowed,
                  std::string_view context) const {
    const toml::key* bad = nullptr;
    for (auto&& [k, v] : t) {
      (void)v;
      if (contains(allowed, k.str())) continue;
      const auto& p = k.source().begin;
      if (bad == nullptr || std::pair(p.line, p.column) <
                                std::pair(bad->source().begin.line, bad->source().begin.column)) {
        bad = &k;
      }
    }
    if (bad == nullptr) return;
    std::string msg = "unknown key";
    msg += context;
    msg += did_you_mean(bad->str(), allowed);
    if (!prefix.empty() && contains(kRootKeys, bad->str())) {
      msg +=
          "; it is a top-level key, and top-level keys must come before the first [table] header";
    }
    msg += "; valid keys: " + join(allowed);
    fail(bad->source(), prefix + std::string(bad->str()), msg);
  }

  std::int64_t integer(const toml::node& n, const std::string& field) const {
    if (const auto* i = n.as_integer()) return i->get();
    std::string msg = "expected an integer, got " + describe(n);
    if (const auto* f = n.as_floating_point();
        f != nullptr && std::isfinite(f->get()) && std::trunc(f->get()) == f->get()) {
      msg += "; write it without a decimal point";
    }
    fail(n.source(), field, msg);
  }

  double number(const toml::node& n, const std::string& field) const {
    if (const auto* f = n.as_floating_point()) return f->get();
    if (const auto* i = n.as_integer()) return static_cast<double>(i->get());
    fail(n.source(), field, "expected a number, got " + describe(n));
  }

  std::string str_value(const toml::node& n, const std::string& field) const {
    if (const auto* s = n.as_string()) return s->get();
    fail(n.source(), field, "expected a string, got " + describe(n));
  }

  std::uint64_t unsigned_int(const toml::node& n, const std::string& field,
                             const IntRule& rule) const {
    const std::int64_t v = integer(n, field);
    if (v < 0 || !rule.ok(static_cast<std::uint64_t>(v))) {
      fail(n.source(), field, rule.text() + ", got " + std::to_string(v));
    }
    return static_cast<std::uint64_t>(v);
  }

  void read_top_level(const toml::table& root, ModelSpec& spec) const {
    const toml::node* name = root.get("name");
    if (name == nullptr) {
      fail(root.source(), "name",
           "missing; add name = \"<segment name>\" at the top of the file, before any [table]");
    }
    spec.name = str_value(*name, "name");
    if (std::string problem = validate_segment_name(spec.name); !problem.empty()) {
      fail(name->source(), "name", problem);
    }
    if (const toml::node* n = root.get("slice_bytes")) {
      spec.slice_bytes = unsigned_int(*n, "slice_bytes", kSliceBytesRule);
    }
    if (const toml::node* n = root.get("max_workers")) {
      spec.max_workers =
          static_cast<std::uint32_t>(unsigned_int(*n, "max_workers", kMaxWorkersRule));
    }
    if (const toml::node* n = root.get("ring_bytes")) {
      spec.ring_bytes = unsigned_int(*n, "ring_bytes", kRingBytesRule);
    }
    if (const toml::node* n = root.get("server_threads")) {
      spec.server_threads =
          static_cast<std::uint32_t>(unsigned_int(*n, "server_threads", kServerThreadsRule));
    }
    if (const toml::node* n = root.get("consistency")) read_consistency(*n, spec);
    read_policies(root, spec);
  }

  void read_consistency(const toml::node& n, ModelSpec& spec) const {
    const std::string text = str_value(n, "consistency");
    if (auto problem = parse_consistency(text, spec.consistency, spec.staleness); !problem.empty())
      fail(n.source(), "consistency", problem);
  }

  void read_policies(const toml::table& root, ModelSpec& spec) const {
    if (const toml::node* n = root.get("bsp_aggregate")) {
      const std::string text = str_value(*n, "bsp_aggregate");
      if (auto problem = parse_bsp_aggregate(text, spec.bsp_aggregate); !problem.empty())
        fail(n->source(), "bsp_aggregate", problem);
    }
    if (const toml::node* n = root.get("on_worker_death")) {
      const std::string text = str_value(*n, "on_worker_death");
      if (auto problem = parse_on_worker_death(text, spec.on_worker_death); !problem.empty())
        fail(n->source(), "on_worker_death", problem);
    }
  }

  void read_optimizer(const toml::table& root, OptimizerSettings& s) const {
    const toml::node* on = root.get("optimizer");
    if (on == nullptr) {
      fail(root.source(), "optimizer",
           "missing; add an [optimizer] table with at least lr = <learning rate>");
    }
    const toml::table* t = on->as_table();
    if (t == nullptr) {
      fail(on->source(), "optimizer", "expected a table ([optimizer]), got " + describe(*on));
    }
    check_keys(*t, "optimizer.", kOptimizerKeys, "");
    s = OptimizerSettings{};
    std::string kind_text = "sgd";
    const toml::node* kind = t->get("kind");
    if (kind != nullptr) {
      kind_text = str_value(*kind, "optimizer.kind");
      bool found = false;
      for (int k = 0; k <= static_cast<int>(OptimizerKind::adam); ++k) {
        if (to_string(static_cast<OptimizerKind>(k)) == kind_text) {
          s.kind = static_cast<OptimizerKind>(k);
          found = true;
        }
      }
      if (!found) {
        fail(kind->source(), "optimizer.kind",
             "unknown optimizer kind " + quote(kind_text) +
                 did_you_mean(kind_text, kOptimizerKinds) +
                 "; valid kinds: " + join(kOptimizerKinds));
      }
    }
    // Numeric keys in file order, so the first problem in the file is the one reported.
    std::vector<std::pair<const toml::key*, const toml::node*>> keys;
    for (auto&& [k, v] : *t) {
      if (k.str() != "kind") keys.emplace_back(&k, &v);
    }
    std::sort(keys.begin(), keys.end(), [](const auto& a, const auto& b) {
      return std::pair(a.first->source().begin.line, a.first->source().begin.column) <
             std::pair(b.first->source().begin.line, b.first->source().begin.column);
    });
    for (const auto& [k, v] : keys) {
      const std::string_view key = k->str();
      const std::string field = "optimizer." + std::string(key);
      const Keys users = kinds_using(key);
      if (users.size() > 0 && !contains(users, kind_text)) {
        fail(k->source(), field,
             "not used by kind " + quote(kind_text) +
                 (kind == nullptr ? " (the default when optimizer.kind is not given)" : "") +
                 ", only by " + join(users) + "; remove it or set optimizer.kind");
      }
      const double value = number(*v, field);
      if (std::string problem = optimizer_field_problem(key, value); !problem.empty()) {
        fail(v->source(), field, problem);
      }
      const auto f = static_cast<float>(value);
      if (std::string problem = detail::optimizer_field_problem(key, f); !problem.empty()) {
        fail(v->source(), field,
             problem + " (" + detail::format_number(value) + " rounded to float32)");
      }
      *settings_field(s, key) = f;
    }
    if (t->get("lr") == nullptr) {
      fail(t->source(), "optimizer.lr",
           "missing; add lr = <learning rate> (e.g. lr = 0.01) to [optimizer]");
    }
  }

  void read_params(const toml::table& root, ModelSpec& spec) const {
    const toml::node* pn = root.get("param");
    const std::string_view how = "add a [[param]] table with name and shape for each parameter";
    if (pn == nullptr) {
      fail(root.source(), "param",
           "no [[param]] tables; a model needs at least one parameter: " + std::string(how));
    }
    const toml::array* arr = pn->as_array();
    if (arr == nullptr) {
      if (pn->is_table()) {
        fail(pn->source(), "param",
             "expected [[param]] tables (an array of tables), got a single table: write "
             "[[param]] (double brackets) for each parameter");
      }
      fail(pn->source(), "param", "expected [[param]] tables, got " + describe(*pn));
    }
    if (arr->empty()) {
      fail(pn->source(), "param", "no parameters; " + std::string(how));
    }
    std::map<std::string, std::pair<std::size_t, toml::source_region>, std::less<>> seen;
    std::uint64_t total_bytes = 0;
    for (std::size_t i = 0; i < arr->size(); ++i) {
      const toml::node& e = *arr->get(i);
      const std::string at = "param[" + std::to_string(i) + "]";
      const toml::table* t = e.as_table();
      if (t == nullptr) fail(e.source(), at, "expected a table, got " + describe(e));
      check_keys(*t, at + ".", kParamKeys, "");
      ParamSpec p;

      const toml::node* name = t->get("name");
      if (name == nullptr) fail(t->source(), at + ".name", "missing; every [[param]] needs a name");
      p.name = str_value(*name, at + ".name");
      if (std::string problem = param_name_problem(p.name); !problem.empty()) {
        fail(name->source(), at + ".name", problem);
      }
      if (auto it = seen.find(p.name); it != seen.end()) {
        const auto& first = it->second.second.begin;
        fail(name->source(), at + ".name",
             "duplicate parameter name " + quote(p.name) + " (first defined by param[" +
                 std::to_string(it->second.first) + "] at " + source_ + ":" +
                 std::to_string(first.line) + ":" + std::to_string(first.column) +
                 "); parameter names must be unique");
      }
      seen.emplace(p.name, std::pair(i, name->source()));

      const toml::node* shape = t->get("shape");
      if (shape == nullptr) {
        fail(t->source(), at + ".shape",
             "missing; give the dimensions as an array of positive integers, e.g. shape = [256, "
             "784]");
      }
      p.shape = read_shape(*shape, at + ".shape");
      const auto elements = checked_elements(p.shape);
      if (!elements) fail(shape->source(), at + ".shape", too_large_text(p.shape));
      const std::uint64_t bytes = *elements * sizeof(float);
      if (bytes > kMaxParamBytes - total_bytes) {
        fail(shape->source(), at + ".shape", total_too_large_text(total_bytes));
      }
      total_bytes += bytes;

      if (const toml::node* init = t->get("init")) p.init = read_init(*init, at + ".init", p.name);
      spec.params.push_back(std::move(p));
    }
  }

  std::vector<std::uint64_t> read_shape(const toml::node& n, const std::string& field) const {
    const std::string expected = "expected an array of positive integers";
    const toml::array* arr = n.as_array();
    if (arr == nullptr) {
      std::string msg = expected + ", got " + describe(n);
      if (n.is_integer()) msg += "; write shape = [" + std::to_string(n.as_integer()->get()) + "]";
      fail(n.source(), field, msg);
    }
    if (arr->empty()) {
      fail(n.source(), field,
           expected + ", got an empty array; give at least one dimension (use [1] for a scalar)");
    }
    if (arr->size() > kMaxParamDims) {
      fail(n.source(), field,
           "has " + std::to_string(arr->size()) + " dimensions; at most " +
               std::to_string(kMaxParamDims) + " are supported");
    }
    std::vector<std::uint64_t> shape;
    for (std::size_t i = 0; i < arr->size(); ++i) {
      const toml::node& d = *arr->get(i);
      const auto* v = d.as_integer();
      if (v == nullptr) {
        fail(d.source(), field, expected + "; the " + dimension_name(i) + " is " + describe(d));
      }
      if (v->get() <= 0) {
        fail(d.source(), field,
             expected + "; the " + dimension_name(i) + " is " + std::to_string(v->get()));
      }
      shape.push_back(static_cast<std::uint64_t>(v->get()));
    }
    return shape;
  }

  InitSpec read_init(const toml::node& n, const std::string& field,
                     const std::string& param_name) const {
    InitSpec init;
    const std::string example =
        "\"zeros\", { kind = \"constant\", value = 0.5 }, { kind = \"u24\", stream = 11, "
        "scale_divisor = 28 } or { kind = \"pretrained\", file = \"weights.safetensors\" }";
    if (const auto* s = n.as_string()) {
      const std::string& kind = s->get();
      if (kind == "zeros") return init;
      if (kind == "constant") {
        fail(n.source(), field,
             "init \"constant\" needs its value: write init = { kind = \"constant\", value = "
             "<number> }");
      }
      if (kind == "u24") {
        fail(n.source(), field,
             "init \"u24\" needs its stream: write init = { kind = \"u24\", stream = <integer>, "
             "scale = <number> } (or scale_divisor = <number>)");
      }
      if (kind == "pretrained") {
        fail(n.source(), field,
             "init \"pretrained\" needs its file: write init = { kind = \"pretrained\", file = "
             "\"<path>.safetensors\" } (optionally with tensor = \"<name in the file>\")");
      }
      fail(n.source(), field,
           "unknown init kind " + quote(kind) + did_you_mean(kind, kInitKinds) + "; expected " +
               example);
    }
    const toml::table* t = n.as_table();
    if (t == nullptr) fail(n.source(), field, "expected " + example + ", got " + describe(n));

    const toml::node* kn = t->get("kind");
    if (kn == nullptr) {
      fail(t->source(), field + ".kind", "missing; one of " + join(kInitKinds, ", ", true));
    }
    const std::string kind = str_value(*kn, field + ".kind");
    if (kind == "zeros") {
      check_keys(*t, field + ".", kZerosKeys, " for init kind \"zeros\"");
      init.kind = InitSpec::Kind::zeros;
    } else if (kind == "constant") {
      check_keys(*t, field + ".", kConstantKeys, " for init kind \"constant\"");
      init.kind = InitSpec::Kind::constant;
      const toml::node* v = t->get("value");
      if (v == nullptr) {
        fail(t->source(), field + ".value",
             "missing; init kind \"constant\" needs value = <number>");
      }
      const double value = number(*v, field + ".value");
      init.value = static_cast<float>(value);
      if (!std::isfinite(init.value)) {
        fail(v->source(), field + ".value",
             "must be a finite float32 number, got " + detail::format_number(value));
      }
    } else if (kind == "u24") {
      check_keys(*t, field + ".", kU24Keys, " for init kind \"u24\"");
      init.kind = InitSpec::Kind::u24;
      const toml::node* sn = t->get("stream");
      if (sn == nullptr) {
        fail(t->source(), field + ".stream",
             "missing; init kind \"u24\" needs stream = <integer >= 0> (the SplitMix64 seed)");
      }
      const std::int64_t stream = integer(*sn, field + ".stream");
      if (stream < 0) {
        fail(sn->source(), field + ".stream",
             "must be an integer >= 0, got " + std::to_string(stream));
      }
      init.stream = static_cast<std::uint64_t>(stream);
      const toml::node* scale = t->get("scale");
      const toml::node* divisor = t->get("scale_divisor");
      if (scale != nullptr && divisor != nullptr) {
        const auto& a = scale->source().begin;
        const auto& b = divisor->source().begin;
        const toml::node* later =
            std::pair(a.line, a.column) < std::pair(b.line, b.column) ? divisor : scale;
        fail(later->source(), field + (later == scale ? ".scale" : ".scale_divisor"),
             "give either scale or scale_divisor, not both");
      }
      if (scale != nullptr) {
        const double value = number(*scale, field + ".scale");
        init.scale = static_cast<float>(value);
        if (!std::isfinite(init.scale)) {
          fail(scale->source(), field + ".scale",
               "must be a finite float32 number, got " + detail::format_number(value));
        }
      }
      if (divisor != nullptr) {
        const double d = number(*divisor, field + ".scale_divisor");
        const auto s = static_cast<float>(1.0 / d);
        if (!std::isfinite(d) || d == 0.0 || !std::isfinite(s) || s == 0.0f) {
          fail(divisor->source(), field + ".scale_divisor",
               "must be a non-zero number whose reciprocal is a finite, non-zero float32, got " +
                   detail::format_number(d));
        }
        init.scale = s;
      }
    } else if (kind == "pretrained") {
      check_keys(*t, field + ".", kPretrainedKeys, " for init kind \"pretrained\"");
      init.kind = InitSpec::Kind::pretrained;
      read_pretrained(*t, field, param_name, init);
    } else {
      fail(kn->source(), field + ".kind",
           "unknown init kind " + quote(kind) + did_you_mean(kind, kInitKinds) +
               "; valid kinds: " + join(kInitKinds, ", ", true));
    }
    return init;
  }

  void read_pretrained(const toml::table& t, const std::string& field,
                       const std::string& param_name, InitSpec& init) const {
    const toml::node* fn = t.get("file");
    if (fn == nullptr) {
      fail(t.source(), field + ".file",
           "missing; init kind \"pretrained\" needs file = \"<path>.safetensors\" (relative to "
           "the spec file's directory)");
    }
    const std::string file = str_value(*fn, field + ".file");
    if (std::string problem = text_problem(file, "the path of a safetensors file"); !problem.empty()) {
      fail(fn->source(), field + ".file", problem);
    }
    std::filesystem::path path(file);
    if (path.is_relative() && !base_dir_.empty()) path = base_dir_ / path;
    init.file = std::move(path);
    init.tensor = param_name;
    if (const toml::node* tn = t.get("tensor")) {
      init.tensor = str_value(*tn, field + ".tensor");
      if (std::string problem = text_problem(init.tensor, "the tensor's name in the file, or leave "
                                                           "tensor out to use the parameter's name");
          !problem.empty()) {
        fail(tn->source(), field + ".tensor", problem);
      }
    }
  }
};

}  // namespace

std::string_view to_string(InitSpec::Kind kind) noexcept {
  switch (kind) {
    case InitSpec::Kind::zeros:
      return "zeros";
    case InitSpec::Kind::constant:
      return "constant";
    case InitSpec::Kind::u24:
      return "u24";
    case InitSpec::Kind::pretrained:
      return "pretrained";
  }
  return "?";
}

std::uint64_t ParamSpec::size() const {
  std::uint64_t n = 1;
  for (std::uint64_t d : shape) {
    if (d != 0 && n > std::numeric_limits<std::uint64_t>::max() / d) {
      return std::numeric_limits<std::uint64_t>::max();
    }
    n *= d;
  }
  return n;
}

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

std::string validate_model_spec(const ModelSpec& spec) {
  if (std::string p = validate_segment_name(spec.name); !p.empty()) return "name: " + p;
  auto int_field = [](std::string_view field, const IntRule& rule, std::uint64_t v) -> std::string {
    if (rule.ok(v)) return {};
    return std::string(field) + ": " + rule.text() + ", got " + std::to_string(v);
  };
  if (auto p = int_field("slice_bytes", kSliceBytesRule, spec.slice_bytes); !p.empty()) return p;
  if (auto p = int_field("max_workers", kMaxWorkersRule, spec.max_workers); !p.empty()) return p;
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
    switch (p.init.kind) {
      case InitSpec::Kind::zeros:
        break;
      case InitSpec::Kind::constant:
        if (!std::isfinite(p.init.value)) return at + ".init.value: must be finite";
        break;
      case InitSpec::Kind::u24:
        if (!std::isfinite(p.init.scale)) return at + ".init.scale: must be finite";
        break;
      case InitSpec::Kind::pretrained:
        if (std::string problem = text_problem(p.init.file.native(), "the path of a safetensors file");
            !problem.empty()) {
          return at + ".init.file: " + problem;
        }
        if (std::string problem = text_problem(p.init.tensor, "the tensor's name in the file");
            !problem.empty()) {
          return at + ".init.tensor: " + problem;
        }
        break;
      default:
        return at + ".init.kind: unknown init kind " +
               std::to_string(static_cast<int>(p.init.kind));
    }
  }
  return {};
}

ModelSpec parse_model_spec(std::string_view toml_text, std::string_view source_name,
                           const std::filesystem::path& base_dir) {
  Parser parser(source_name.empty() ? std::string("<string>") : std::string(source_name), base_dir);
  return parser.parse(toml_text);
}

ModelSpec load_model_spec(const std::filesystem::path& path) {
  const std::string shown = path.empty() ? std::string("<empty path>") : path.string();
  const std::string what = shown + ": cannot read the model spec: ";
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw SpecError(what + "it is a directory");
  struct Close {
    void operator()(std::FILE* f) const { std::fclose(f); }
  };
  std::unique_ptr<std::FILE, Close> f(std::fopen(path.c_str(), "rb"));
  if (!f) throw SpecError(what + std::generic_category().message(errno));
  std::string text;
  char buf[65536];
  for (;;) {
    const std::size_t got = std::fread(buf, 1, sizeof buf, f.get());
    text.append(buf, got);
    if (text.size() > kMaxSpecFileBytes) {
      throw SpecError(what + "larger than " + std::to_string(kMaxSpecFileBytes >> 20) +
                      " MiB; a model spec is a small text file");
    }
    if (got < sizeof buf) break;
  }
  if (std::ferror(f.get())) throw SpecError(what + std::generic_category().message(errno));
  return parse_model_spec(text, shown, path.parent_path());
}

std::string parse_consistency(std::string_view text, Consistency& mode, std::uint32_t& staleness) {
  const std::string expected =
      "expected \"asp\", \"bsp\" or \"ssp:N\" (N = staleness bound in clocks, an integer >= 0, e.g. \"ssp:3\"), got \"" +
      std::string(text) + "\"";
  if (text == "asp") {
    mode = Consistency::asp;
    staleness = 0;
    return {};
  }
  if (text == "bsp") {
    mode = Consistency::bsp;
    staleness = 0;
    return {};
  }
  if (text == "ssp") return "\"ssp\" needs its staleness bound: write \"ssp:N\", e.g. \"ssp:3\"";
  if (text.rfind("ssp:", 0) != 0) return expected;
  const std::string_view digits = text.substr(4);
  std::uint64_t bound = 0;
  if (digits.empty() || digits.size() > 10) return expected;
  for (char c : digits) {
    if (c < '0' || c > '9') return expected;
    bound = bound * 10 + static_cast<std::uint64_t>(c - '0');
  }
  if (bound > std::numeric_limits<std::uint32_t>::max()) return expected;
  mode = Consistency::ssp;
  staleness = static_cast<std::uint32_t>(bound);
  return {};
}

std::string parse_bsp_aggregate(std::string_view text, BspAggregate& out) {
  if (text == "sum") out = BspAggregate::sum;
  else if (text == "mean") out = BspAggregate::mean;
  else return "expected \"sum\" or \"mean\", got \"" + std::string(text) + "\"";
  return {};
}

std::string parse_on_worker_death(std::string_view text, OnWorkerDeath& out) {
  if (text == "proceed") out = OnWorkerDeath::proceed;
  else if (text == "wait") out = OnWorkerDeath::wait;
  else return "expected \"proceed\" or \"wait\", got \"" + std::string(text) + "\"";
  return {};
}

std::size_t name_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      const std::size_t cost = lower(a[i - 1]) == lower(b[j - 1]) ? 0 : 1;
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + cost});
      diag = up;
    }
  }
  return row[b.size()];
}

}  // namespace shmps::server
