// The model spec parser's [optimizer] table, and a [[table]]'s own `optimizer = { ... }`: the
// kind, then each numeric setting in file order, checked by the optimizer's own value rules
// (optimizer.hpp) before and after rounding to float32. A setting the chosen kind does not use is
// an error, so a forgotten `kind` is not silently ignored. rowwise_adagrad is a table's only.
#include <algorithm>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "model_spec_parser.hpp"
#include "shmps/server/optimizer.hpp"  // the optimizer's value rules (header-only)

namespace shmps::server::spec_detail {

namespace {

constexpr std::string_view kOptimizerKeysList[] = {
    "kind", "lr",  "momentum",     "beta1",      "beta2",
    "rho",  "eps", "weight_decay", "clip_value", "clip_norm", "state_dtype"};
constexpr std::string_view kOptimizerKindsList[] = {"sgd",     "momentum", "nesterov",       "adagrad",
                                                    "rmsprop", "adam",     "rowwise_adagrad"};
constexpr Keys kOptimizerKeys{kOptimizerKeysList};
constexpr Keys kOptimizerKinds{kOptimizerKindsList};
// The job's [optimizer]: every kind but rowwise_adagrad (the last), which needs rows.
constexpr Keys kJobOptimizerKinds{kOptimizerKindsList, std::size(kOptimizerKindsList) - 1};

// Which optimizer kinds use a settings key (empty: all of them).
Keys kinds_using(std::string_view key) {
  static constexpr std::string_view kMomentumList[] = {"momentum", "nesterov"};
  constexpr Keys kMomentum{kMomentumList};
  static constexpr std::string_view kAdamList[] = {"adam"};
  constexpr Keys kAdam{kAdamList};
  static constexpr std::string_view kRmspropList[] = {"rmsprop"};
  constexpr Keys kRmsprop{kRmspropList};
  static constexpr std::string_view kEpsList[] = {"adagrad", "rmsprop", "adam", "rowwise_adagrad"};  // the last: tables
  constexpr Keys kEps{kEpsList};
  static constexpr std::string_view kStatefulList[] = {"momentum", "nesterov", "adagrad", "rmsprop", "adam"};
  constexpr Keys kStateful{kStatefulList};
  if (key == "momentum") return kMomentum;
  if (key == "beta1" || key == "beta2") return kAdam;
  if (key == "rho") return kRmsprop;
  if (key == "eps") return kEps;
  if (key == "state_dtype") return kStateful;
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

}  // namespace

void Parser::read_optimizer(const toml::table& root, OptimizerSettings& s) const {
  const toml::node* on = root.get("optimizer");
  if (on == nullptr) {
    fail(root.source(), "optimizer",
         "missing; add an [optimizer] table with at least lr = <learning rate>");
  }
  const toml::table* t = on->as_table();
  if (t == nullptr) {
    fail(on->source(), "optimizer", "expected a table ([optimizer]), got " + describe(*on));
  }
  read_optimizer_keys(*t, "optimizer", false, s);
}

OptimizerSettings Parser::read_table_optimizer(const toml::node& n, const std::string& field,
                                               const OptimizerSettings& job) const {
  const toml::table* t = n.as_table();
  if (t == nullptr)
    fail(n.source(), field,
         "expected a table, e.g. optimizer = { kind = \"rowwise_adagrad\", lr = 0.1 }, got " + describe(n));
  if (const toml::node* d = t->get("state_dtype"))
    fail(d->source(), field + ".state_dtype",
         "the optimizer state's dtype is one for the whole job: set state_dtype in [optimizer] (it applies to the "
         "tables' own optimizers too), and remove it here");
  OptimizerSettings s;
  read_optimizer_keys(*t, field, true, s);
  s.state_dtype = job.state_dtype;
  return s;
}

void Parser::read_optimizer_keys(const toml::table& t, const std::string& field, bool table, OptimizerSettings& s) const {
  const std::string prefix = field + ".";
  check_keys(t, prefix, kOptimizerKeys, "");
  s = OptimizerSettings{};
  std::string kind_text = "sgd";
  const toml::node* kind = t.get("kind");
  if (kind != nullptr) {
    kind_text = str_value(*kind, prefix + "kind");
    bool found = false;
    for (int k = 0; k <= static_cast<int>(kLastOptimizerKind); ++k) {
      if (to_string(static_cast<OptimizerKind>(k)) == kind_text) {
        s.kind = static_cast<OptimizerKind>(k);
        found = true;
      }
    }
    if (!found) {
      const Keys kinds = table ? kOptimizerKinds : kJobOptimizerKinds;
      fail(kind->source(), prefix + "kind",
           "unknown optimizer kind " + quote(kind_text) + did_you_mean(kind_text, kinds) + "; valid kinds: " + join(kinds) +
               (table ? "" : " (and rowwise_adagrad for a [[table]]'s own optimizer)"));
    }
    if (!table && s.kind == OptimizerKind::rowwise_adagrad)
      fail(kind->source(), prefix + "kind",
           "rowwise_adagrad keeps one accumulator per table row, so it is a table's optimizer only: give it to each "
           "[[table]] as optimizer = { kind = \"rowwise_adagrad\", lr = ... }, and choose another kind here for the "
           "dense parameters (e.g. \"adagrad\")");
  }
  // Numeric keys in file order, so the first problem in the file is the one reported.
  std::vector<std::pair<const toml::key*, const toml::node*>> keys;
  for (auto&& [k, v] : t) {
    if (k.str() != "kind") keys.emplace_back(&k, &v);
  }
  std::sort(keys.begin(), keys.end(), [](const auto& a, const auto& b) {
    return std::pair(a.first->source().begin.line, a.first->source().begin.column) <
           std::pair(b.first->source().begin.line, b.first->source().begin.column);
  });
  for (const auto& [k, v] : keys) {
    const std::string_view key = k->str();
    const std::string key_field = prefix + std::string(key);
    const Keys users = kinds_using(key);
    // The job's state_dtype is also the tables' own optimizers': checked once they are read
    // (check_state_dtype_used).
    const bool deferred = key == "state_dtype" && !table;
    if (users.size() > 0 && !contains(users, kind_text) && !deferred) {
      fail(k->source(), key_field,
           "not used by kind " + quote(kind_text) +
               (kind == nullptr ? " (the default when " + prefix + "kind is not given)" : "") +
               ", only by " + join(users) + "; remove it or set " + prefix + "kind");
    }
    if (key == "state_dtype") {
      const std::string dtype = str_value(*v, key_field);
      if (dtype == "f32") {
        s.state_dtype = StateDType::f32;
      } else if (dtype == "bf16") {
        s.state_dtype = StateDType::bf16;
      } else {
        fail(v->source(), key_field,
             "unknown state dtype " + quote(dtype) +
                 "; valid: \"f32\" (float32, the default) or \"bf16\" (bfloat16: half the optimizer "
                 "state's memory, math still in float32)");
      }
      continue;
    }
    const double value = number(*v, key_field);
    if (std::string problem = optimizer_field_problem(key, value); !problem.empty()) {
      fail(v->source(), key_field, problem);
    }
    const auto f = static_cast<float>(value);
    if (std::string problem = detail::optimizer_field_problem(key, f); !problem.empty()) {
      fail(v->source(), key_field,
           problem + " (" + detail::format_number(value) + " rounded to float32)");
    }
    *settings_field(s, key) = f;
  }
  if (t.get("lr") == nullptr) {
    fail(t.source(), prefix + "lr",
         "missing; add lr = <learning rate> (e.g. lr = 0.01) to " + (table ? field : "[optimizer]"));
  }
}

void Parser::check_state_dtype_used(const toml::table& root, const ModelSpec& spec) const {
  const toml::table* t = root.get("optimizer")->as_table();  // read_optimizer made sure it is one
  for (auto&& [k, v] : *t) {
    if (k.str() != "state_dtype") continue;
    const bool stateful = std::any_of(spec.params.begin(), spec.params.end(), [&](const ParamSpec& p) {
      return optimizer_state_arrays(p.optimizer.value_or(spec.optimizer).kind) > 0;
    });
    if (!stateful) {
      const std::string kind_text(to_string(spec.optimizer.kind));
      fail(k.source(), "optimizer.state_dtype",
           "not used by kind " + quote(kind_text) +
               (t->get("kind") == nullptr ? " (the default when optimizer.kind is not given)" : "") +
               ", only by " + join(kinds_using("state_dtype")) +
               " (the job's, or a table's own); remove it or set optimizer.kind");
    }
  }
}

}  // namespace shmps::server::spec_detail
