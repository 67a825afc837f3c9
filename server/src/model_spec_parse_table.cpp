// [[table]] sections of a model spec: embedding tables, pulled and pushed by row.
//
//   [[table]]
//   name = "emb"      # required, unique among parameters and tables
//   rows = 1048576    # required, >= 1
//   dim = 16          # required, >= 1: floats per row; must divide the slice (slice_bytes / 4)
//   init = { kind = "u24", stream = 24, scale_divisor = 64 }  # as a [[param]]'s, row-major
//   optimizer = { kind = "rowwise_adagrad", lr = 0.1 }  # optional: its own (else the job's)
//
//   keys = "u64"      # optional: open-ended 64-bit keys in `rows` slots (docs/tables.md)
//   admit_after = 2   # optional, with keys: a key gets a slot at its 2nd pushed row
//
// A table becomes a parameter of shape [rows, dim] (checkpoints, export and restore treat it as
// one); what differs is how workers reach it (Worker::pull_rows / push_rows) and how the server
// applies it (only the rows a round touches).
#include <map>

#include "model_spec_parser.hpp"
#include "model_spec_rules.hpp"

namespace shmps::server::spec_detail {

namespace {
constexpr std::string_view kTableKeysList[] = {"name", "rows", "dim", "init", "optimizer", "keys", "admit_after", "dtype"};
constexpr Keys kTableKeys{kTableKeysList};
constexpr IntRule kRowsRule{1, std::uint64_t{1} << 40, 1, ""};
constexpr IntRule kDimRule{1, std::uint64_t{1} << 20, 1, ""};
constexpr IntRule kAdmitAfterRule{1, std::uint64_t{1} << 20, 1, ""};
}  // namespace

void Parser::read_tables(const toml::table& root, ModelSpec& spec) const {
  const toml::node* tn = root.get("table");
  if (tn == nullptr) return;
  const toml::array* arr = tn->as_array();
  if (arr == nullptr)
    fail(tn->source(), "table",
         "expected [[table]] tables (an array of tables), got " + describe(*tn) +
             ": write [[table]] (double brackets) for each table");
  std::map<std::string, std::size_t, std::less<>> seen;
  for (std::size_t i = 0; i < spec.params.size(); ++i) seen.emplace(spec.params[i].name, i);
  for (std::size_t i = 0; i < arr->size(); ++i) {
    const toml::node& e = *arr->get(i);
    const std::string at = "table[" + std::to_string(i) + "]";
    const toml::table* t = e.as_table();
    if (t == nullptr) fail(e.source(), at, "expected a table, got " + describe(e));
    check_keys(*t, at + ".", kTableKeys, "");
    ParamSpec p;
    const toml::node* name = t->get("name");
    if (name == nullptr) fail(t->source(), at + ".name", "missing; every [[table]] needs a name");
    p.name = str_value(*name, at + ".name");
    if (std::string problem = param_name_problem(p.name); !problem.empty()) fail(name->source(), at + ".name", problem);
    if (seen.contains(p.name))
      fail(name->source(), at + ".name",
           "duplicate name " + quote(p.name) + ": parameters and tables share one namespace, and names must be unique");
    seen.emplace(p.name, spec.params.size());
    const toml::node* rows = t->get("rows");
    if (rows == nullptr) fail(t->source(), at + ".rows", "missing; give the number of rows, e.g. rows = 1048576");
    const toml::node* dim = t->get("dim");
    if (dim == nullptr) fail(t->source(), at + ".dim", "missing; give the floats per row, e.g. dim = 16");
    const std::uint64_t r = unsigned_int(*rows, at + ".rows", kRowsRule);
    p.table_dim = unsigned_int(*dim, at + ".dim", kDimRule);
    p.shape = {r, p.table_dim};
    if (!checked_elements(p.shape)) fail(rows->source(), at + ".rows", too_large_text(p.shape));
    if (const toml::node* init = t->get("init")) p.init = read_init(*init, at + ".init", p.name);
    if (const toml::node* d = t->get("dtype")) p.dtype = read_dtype(*d, at + ".dtype");
    if (const toml::node* o = t->get("optimizer")) p.optimizer = read_table_optimizer(*o, at + ".optimizer", spec.optimizer);
    if (const toml::node* k = t->get("keys")) {
      const std::string keys = str_value(*k, at + ".keys");
      if (keys != "u64")
        fail(k->source(), at + ".keys",
             "unknown key type " + quote(keys) + ": the one kind is \"u64\" (any 64-bit key); leave keys out for "
             "row numbers in [0, rows)");
      p.keyed = true;
    }
    if (const toml::node* a = t->get("admit_after")) {
      if (!p.keyed)
        fail(a->source(), at + ".admit_after",
             "only a table with keys = \"u64\" admits keys; a table of row numbers has every row from the start");
      p.admit_after = static_cast<std::uint32_t>(unsigned_int(*a, at + ".admit_after", kAdmitAfterRule));
    }
    if (std::string problem = table_problem(spec, p, at); !problem.empty()) {
      const std::size_t colon = problem.find(": ");  // "<field>: <problem>"
      fail(t->source(), problem.substr(0, colon), problem.substr(colon + 2));
    }
    spec.params.push_back(std::move(p));
  }
}

}  // namespace shmps::server::spec_detail
