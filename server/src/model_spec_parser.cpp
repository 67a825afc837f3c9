// The model spec parser (model_spec_parser.hpp): the root table, the top-level keys and the
// [[param]] tables' names and shapes, plus the value readers and the error wording every section
// uses. The [optimizer] table and a parameter's init have files of their own.
#include "model_spec_parser.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "shmps/server/optimizer.hpp"  // detail::format_number (header-only)

namespace shmps::server::spec_detail {

namespace {

constexpr std::string_view kParamKeysList[] = {"name", "shape", "init", "dtype"};
constexpr std::string_view kDTypesList[] = {"f32", "bf16", "fp16"};
constexpr Keys kDTypes{kDTypesList};
constexpr Keys kParamKeys{kParamKeysList};

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

}  // namespace

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

std::string describe(const toml::node& n) {
  std::string out = type_name(n.type());
  if (const auto* s = n.as_string()) return out + " (" + quote(s->get()) + ")";
  if (const auto* i = n.as_integer()) return out + " (" + std::to_string(i->get()) + ")";
  if (const auto* f = n.as_floating_point())
    return out + " (" + detail::format_number(f->get()) + ")";
  if (const auto* b = n.as_boolean()) return out + (b->get() ? " (true)" : " (false)");
  return out;
}

// ---- The parser: entry, errors, value readers -------------------------------------------------

ModelSpec Parser::parse(std::string_view text) {
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
  read_tables(root, spec);
  check_state_dtype_used(root, spec);
  // Safety net: everything above should already have been caught, with its position.
  if (std::string problem = validate_model_spec(spec); !problem.empty()) {
    throw SpecError(source_ + ": " + problem);
  }
  return spec;
}

void Parser::fail(const toml::source_region& where, std::string_view field,
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
void Parser::check_keys(const toml::table& t, const std::string& prefix, Keys allowed,
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

std::int64_t Parser::integer(const toml::node& n, const std::string& field) const {
  if (const auto* i = n.as_integer()) return i->get();
  std::string msg = "expected an integer, got " + describe(n);
  if (const auto* f = n.as_floating_point();
      f != nullptr && std::isfinite(f->get()) && std::trunc(f->get()) == f->get()) {
    msg += "; write it without a decimal point";
  }
  fail(n.source(), field, msg);
}

double Parser::number(const toml::node& n, const std::string& field) const {
  if (const auto* f = n.as_floating_point()) return f->get();
  if (const auto* i = n.as_integer()) return static_cast<double>(i->get());
  fail(n.source(), field, "expected a number, got " + describe(n));
}

std::string Parser::str_value(const toml::node& n, const std::string& field) const {
  if (const auto* s = n.as_string()) return s->get();
  fail(n.source(), field, "expected a string, got " + describe(n));
}

std::uint64_t Parser::unsigned_int(const toml::node& n, const std::string& field,
                                   const IntRule& rule) const {
  const std::int64_t v = integer(n, field);
  if (v < 0 || !rule.ok(static_cast<std::uint64_t>(v))) {
    fail(n.source(), field, rule.text() + ", got " + std::to_string(v));
  }
  return static_cast<std::uint64_t>(v);
}

// ---- Top-level keys ---------------------------------------------------------------------------

void Parser::read_top_level(const toml::table& root, ModelSpec& spec) const {
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
  if (const toml::node* n = root.get("workers_per_group")) {
    spec.workers_per_group =
        static_cast<std::uint32_t>(unsigned_int(*n, "workers_per_group", kWorkersPerGroupRule));
    if (spec.workers_per_group > spec.max_workers)
      fail(n->source(), "workers_per_group",
           "must be at most max_workers (" + std::to_string(spec.max_workers) + "), got " +
               std::to_string(spec.workers_per_group) + ": a group cannot have more workers than the job has slots");
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

void Parser::read_consistency(const toml::node& n, ModelSpec& spec) const {
  const std::string text = str_value(n, "consistency");
  if (auto problem = parse_consistency(text, spec.consistency, spec.staleness); !problem.empty())
    fail(n.source(), "consistency", problem);
}

void Parser::read_policies(const toml::table& root, ModelSpec& spec) const {
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
  if (const toml::node* n = root.get("straggler_timeout")) {
    const std::string text = str_value(*n, "straggler_timeout");
    if (auto problem = parse_straggler_timeout(text, spec.straggler_timeout); !problem.empty())
      fail(n->source(), "straggler_timeout", problem);
  }
  if (const toml::node* n = root.get("sync_every")) {
    const std::string text = str_value(*n, "sync_every");
    if (auto problem = parse_sync_every(text, spec.sync_every); !problem.empty()) fail(n->source(), "sync_every", problem);
  }
}

// ---- [[param]] tables -------------------------------------------------------------------------

void Parser::read_params(const toml::table& root, ModelSpec& spec) const {
  const toml::node* pn = root.get("param");
  const std::string_view how = "add a [[param]] table with name and shape for each parameter";
  if (pn == nullptr && root.get("table") != nullptr) return;  // a model of tables only
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
    if (const toml::node* d = t->get("dtype")) p.dtype = read_dtype(*d, at + ".dtype");
    spec.params.push_back(std::move(p));
  }
}

shm::DType Parser::read_dtype(const toml::node& n, const std::string& field) const {
  const std::string text = str_value(n, field);
  const auto dtype = shm::dtype_from_string(text);
  if (!dtype)
    fail(n.source(), field,
         "unknown dtype " + quote(text) + did_you_mean(text, kDTypes) +
             "; write \"f32\" (float32, the default), \"bf16\" (bfloat16) or \"fp16\" (IEEE half)");
  return *dtype;
}

std::vector<std::uint64_t> Parser::read_shape(const toml::node& n, const std::string& field) const {
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

}  // namespace shmps::server::spec_detail
