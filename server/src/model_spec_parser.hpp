// The model spec parser: TOML text (toml++) -> ModelSpec, checking each value where it reads it
// so that every error carries the position of the offending key or value. One class, in three
// files by section of the format:
//   model_spec_parser.cpp       the root table, the top-level keys, [[param]] names and shapes
//   model_spec_parse_optimizer.cpp  the [optimizer] table
//   model_spec_parse_init.cpp   a parameter's init (zeros, constant, u24, pretrained)
// Private to the shmps_spec library; the public entry points are in model_spec.hpp.
#pragma once

#include <toml++/toml.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "model_spec_rules.hpp"
#include "shmps/server/model_spec.hpp"

namespace shmps::server::spec_detail {

// The top-level keys: also named when a table's unknown key is one of them (it came after a
// [table] header).
inline constexpr std::string_view kRootKeysList[] = {"name",          "slice_bytes",     "max_workers",
                                              "workers_per_group", "ring_bytes",    "server_threads",  "consistency",
                                              "bsp_aggregate", "on_worker_death", "straggler_timeout", "sync_every", "optimizer",
                                              "param", "table"};
inline constexpr Keys kRootKeys{kRootKeysList};

// " (did you mean "lr"?)" for a near miss among candidates, else "".
std::string did_you_mean(std::string_view word, Keys candidates);
// A TOML value for a message, e.g. `a string ("8")`, `a float (2.5)`, `an array`.
std::string describe(const toml::node& n);

class Parser {
 public:
  Parser(std::string source, std::filesystem::path base_dir)
      : source_(std::move(source)), base_dir_(std::move(base_dir)) {}

  ModelSpec parse(std::string_view text);

 private:
  std::string source_;
  std::filesystem::path base_dir_;  // relative pretrained files are resolved against it

  // Throws SpecError "<source>:<line>:<col>: <field>: <problem>".
  [[noreturn]] void fail(const toml::source_region& where, std::string_view field,
                         std::string_view problem) const;
  // Rejects the first key (in file order) of t that is not in allowed.
  void check_keys(const toml::table& t, const std::string& prefix, Keys allowed,
                  std::string_view context) const;

  // A value of the expected type, or fail() naming what was found.
  std::int64_t integer(const toml::node& n, const std::string& field) const;
  double number(const toml::node& n, const std::string& field) const;
  std::string str_value(const toml::node& n, const std::string& field) const;
  std::uint64_t unsigned_int(const toml::node& n, const std::string& field,
                             const IntRule& rule) const;

  // model_spec_parser.cpp
  void read_top_level(const toml::table& root, ModelSpec& spec) const;
  void read_consistency(const toml::node& n, ModelSpec& spec) const;
  void read_policies(const toml::table& root, ModelSpec& spec) const;
  void read_params(const toml::table& root, ModelSpec& spec) const;
  void read_tables(const toml::table& root, ModelSpec& spec) const;  // model_spec_parse_table.cpp
  std::vector<std::uint64_t> read_shape(const toml::node& n, const std::string& field) const;
  shm::DType read_dtype(const toml::node& n, const std::string& field) const;  // a [[param]]'s or [[table]]'s

  // model_spec_parse_optimizer.cpp
  void read_optimizer(const toml::table& root, OptimizerSettings& s) const;  // the job's [optimizer]
  // A [[table]]'s own `optimizer = { ... }` (field: "table[0].optimizer"); its state_dtype is the job's.
  OptimizerSettings read_table_optimizer(const toml::node& n, const std::string& field, const OptimizerSettings& job) const;
  // [optimizer]'s state_dtype, if given, is used by some parameter's optimizer (run after read_tables).
  void check_state_dtype_used(const toml::table& root, const ModelSpec& spec) const;
  // The keys of one optimizer table `t`, named field + "." + key in messages.
  void read_optimizer_keys(const toml::table& t, const std::string& field, bool table, OptimizerSettings& s) const;

  // model_spec_parse_init.cpp
  InitSpec read_init(const toml::node& n, const std::string& field,
                     const std::string& param_name) const;
  [[noreturn]] void fail_init_word(const toml::node& n, const std::string& field,
                                   const std::string& kind) const;
  void read_constant(const toml::table& t, const std::string& field, InitSpec& init) const;
  void read_u24(const toml::table& t, const std::string& field, InitSpec& init) const;
  void read_u24_scale(const toml::table& t, const std::string& field, InitSpec& init) const;
  void read_pretrained(const toml::table& t, const std::string& field,
                       const std::string& param_name, InitSpec& init) const;
};

}  // namespace shmps::server::spec_detail
