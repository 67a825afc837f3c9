// The model spec: valid specs parse to what they say (the reference MLP included), and every
// kind of mistake is rejected with "<file>:<line>:<col>: <field>: <problem>".
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <string_view>
#include <system_error>

#include "shmps/server/model_spec.hpp"

#ifndef SHMPS_SOURCE_DIR
#error "SHMPS_SOURCE_DIR must be defined (tests/CMakeLists.txt)"
#endif

namespace {

using shmps::Consistency;
using shmps::OptimizerKind;
using shmps::server::InitSpec;
using shmps::server::load_model_spec;
using shmps::server::ModelSpec;
using shmps::server::straggler_timeout_text;
using shmps::server::ParamSpec;
using shmps::server::parse_model_spec;
using shmps::server::SpecError;
using shmps::server::validate_model_spec;
using shmps::server::validate_segment_name;

// The message of the SpecError that parsing `text` throws ("" and a test failure if none).
std::string error_of(std::string_view text, std::string_view source = "spec.toml") {
  try {
    parse_model_spec(text, source);
  } catch (const SpecError& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a SpecError: " << e.what();
    return {};
  }
  ADD_FAILURE() << "no error for:\n" << text;
  return {};
}

// The error must start with "<where>: <field>: " (where = "spec.toml:<line>:<col>") and contain
// each of the given pieces of the problem.
#define EXPECT_SPEC_ERROR(text, where, field, ...)                          \
  do {                                                                      \
    const std::string msg_ = error_of(text);                                \
    const std::string prefix_ = std::string(where) + ": " + (field) + ": "; \
    EXPECT_EQ(msg_.substr(0, prefix_.size()), prefix_) << msg_;             \
    for (std::string_view piece_ : {__VA_ARGS__}) {                         \
      EXPECT_NE(msg_.find(piece_), std::string::npos)                       \
          << "missing \"" << piece_ << "\" in: " << msg_;                   \
    }                                                                       \
  } while (0)

constexpr std::string_view kMinimal = R"(name = "m"
[optimizer]
lr = 0.1
[[param]]
name = "w"
shape = [2, 3]
)";

// The reference u24 mapping, written out from docs/workloads.md §1.
float reference_u24(std::uint64_t stream, std::uint64_t i) {
  std::uint64_t z = stream + (i + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z = z ^ (z >> 31);
  const auto top24 = static_cast<std::int64_t>(z >> 40) - (std::int64_t{1} << 23);
  return static_cast<float>(static_cast<double>(top24) / 8388608.0);
}

// ---- Valid specs ----------------------------------------------------------------------------

TEST(ModelSpec, ReferenceMlp) {
  const std::string path = std::string(SHMPS_SOURCE_DIR) + "/models/mlp.toml";
  const ModelSpec spec = load_model_spec(path);
  EXPECT_EQ(spec.source, path);
  EXPECT_EQ(spec.name, "mlp");
  EXPECT_EQ(spec.slice_bytes, 65536u);
  EXPECT_EQ(spec.max_workers, 8u);
  EXPECT_EQ(spec.ring_bytes, 0u);
  EXPECT_EQ(spec.server_threads, 0u);
  EXPECT_EQ(spec.consistency, Consistency::asp);
  EXPECT_EQ(spec.optimizer.kind, OptimizerKind::sgd);
  EXPECT_EQ(spec.optimizer.lr, 0.05f);
  EXPECT_EQ(spec.optimizer.weight_decay, 0.0f);
  EXPECT_EQ(spec.optimizer.clip_value, 0.0f);
  EXPECT_EQ(spec.optimizer.clip_norm, 0.0f);
  ASSERT_EQ(spec.params.size(), 4u);

  const ParamSpec& fc1w = spec.params[0];
  EXPECT_EQ(fc1w.name, "fc1.weight");
  EXPECT_EQ(fc1w.shape, (std::vector<std::uint64_t>{256, 784}));
  EXPECT_EQ(fc1w.size(), 256u * 784u);
  EXPECT_EQ(fc1w.init.kind, InitSpec::Kind::u24);
  EXPECT_EQ(fc1w.init.stream, 11u);
  EXPECT_EQ(fc1w.init.scale, static_cast<float>(1.0 / 28.0));  // float32(1/28)

  EXPECT_EQ(spec.params[1].name, "fc1.bias");
  EXPECT_EQ(spec.params[1].shape, (std::vector<std::uint64_t>{256}));
  EXPECT_EQ(spec.params[1].init.kind, InitSpec::Kind::zeros);

  const ParamSpec& fc2w = spec.params[2];
  EXPECT_EQ(fc2w.name, "fc2.weight");
  EXPECT_EQ(fc2w.shape, (std::vector<std::uint64_t>{10, 256}));
  EXPECT_EQ(fc2w.init.kind, InitSpec::Kind::u24);
  EXPECT_EQ(fc2w.init.stream, 12u);
  EXPECT_EQ(fc2w.init.scale, 0.0625f);

  EXPECT_EQ(spec.params[3].name, "fc2.bias");
  EXPECT_EQ(spec.params[3].shape, (std::vector<std::uint64_t>{10}));
  EXPECT_EQ(spec.params[3].init.kind, InitSpec::Kind::zeros);

  // fc1.weight[o, i] = u24(draw o*784 + i of stream 11) * float32(1/28), one float32 multiply.
  const float s28 = static_cast<float>(1.0 / 28.0);
  for (std::uint64_t k : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{784 * 255 + 783}}) {
    EXPECT_EQ(shmps::server::initial_value(fc1w.init, k), reference_u24(11, k) * s28) << k;
  }
  EXPECT_EQ(shmps::server::initial_value(fc2w.init, 5), reference_u24(12, 5) * 0.0625f);
  EXPECT_EQ(shmps::server::initial_value(spec.params[1].init, 5), 0.0f);
  EXPECT_EQ(validate_model_spec(spec), "");
}

TEST(ModelSpec, EveryField) {
  const ModelSpec spec = parse_model_spec(R"(
name = "job-1.a_b"
slice_bytes = 4096
max_workers = 1024
ring_bytes = 1048576
server_threads = 3
consistency = "ssp:3"

[optimizer]
kind = "adam"
lr = 1e-3
beta1 = 0.8
beta2 = 0.99
eps = 1e-6
weight_decay = 0.01
clip_value = 5
clip_norm = 1.5

[[param]]
name = "embedding"
shape = [1000, 64, 2]
init = { kind = "constant", value = -0.25 }

[[param]]
name = "head"
shape = [7]
[param.init]
kind = "u24"
stream = 0x7fffffffffffffff
scale = 0.125

[[param]]
name = "b"
shape = [1]
init = { kind = "zeros" }

[[param]]
name = "c"
shape = [3]
init = { kind = "u24", stream = 0 }
)",
                                          "every.toml");
  EXPECT_EQ(spec.source, "every.toml");
  EXPECT_EQ(spec.name, "job-1.a_b");
  EXPECT_EQ(spec.slice_bytes, 4096u);
  EXPECT_EQ(spec.max_workers, 1024u);
  EXPECT_EQ(spec.ring_bytes, 1048576u);
  EXPECT_EQ(spec.server_threads, 3u);
  EXPECT_EQ(spec.consistency, Consistency::ssp);
  EXPECT_EQ(spec.staleness, 3u);
  EXPECT_EQ(spec.optimizer.kind, OptimizerKind::adam);
  EXPECT_EQ(spec.optimizer.lr, 1e-3f);
  EXPECT_EQ(spec.optimizer.beta1, 0.8f);
  EXPECT_EQ(spec.optimizer.beta2, 0.99f);
  EXPECT_EQ(spec.optimizer.eps, 1e-6f);
  EXPECT_EQ(spec.optimizer.weight_decay, 0.01f);
  EXPECT_EQ(spec.optimizer.clip_value, 5.0f);
  EXPECT_EQ(spec.optimizer.clip_norm, 1.5f);
  ASSERT_EQ(spec.params.size(), 4u);
  EXPECT_EQ(spec.params[0].name, "embedding");
  EXPECT_EQ(spec.params[0].shape, (std::vector<std::uint64_t>{1000, 64, 2}));
  EXPECT_EQ(spec.params[0].size(), 128000u);
  EXPECT_EQ(spec.params[0].init.kind, InitSpec::Kind::constant);
  EXPECT_EQ(spec.params[0].init.value, -0.25f);
  EXPECT_EQ(spec.params[1].init.kind, InitSpec::Kind::u24);
  EXPECT_EQ(spec.params[1].init.stream, 0x7fffffffffffffffu);
  EXPECT_EQ(spec.params[1].init.scale, 0.125f);
  EXPECT_EQ(spec.params[2].init.kind, InitSpec::Kind::zeros);
  EXPECT_EQ(spec.params[3].init.kind, InitSpec::Kind::u24);
  EXPECT_EQ(spec.params[3].init.scale, 1.0f);  // the default
  EXPECT_EQ(validate_model_spec(spec), "");
}

TEST(ModelSpec, Defaults) {
  const ModelSpec spec = parse_model_spec(kMinimal, "");
  EXPECT_EQ(spec.source, "<string>");
  EXPECT_EQ(spec.slice_bytes, 65536u);
  EXPECT_EQ(spec.max_workers, 16u);
  EXPECT_EQ(spec.workers_per_group, 0u) << "one group of every worker";
  EXPECT_EQ(spec.ring_bytes, 0u);
  EXPECT_EQ(spec.server_threads, 0u);
  EXPECT_EQ(spec.consistency, Consistency::asp);
  EXPECT_EQ(spec.staleness, 0u);
  EXPECT_EQ(spec.optimizer.kind, OptimizerKind::sgd);
  EXPECT_EQ(spec.optimizer.lr, 0.1f);
  ASSERT_EQ(spec.params.size(), 1u);
  EXPECT_EQ(spec.params[0].init.kind, InitSpec::Kind::zeros);
}

TEST(ModelSpec, PutInit) {
  const ModelSpec spec = parse_model_spec(std::string(kMinimal) + "init = \"put\"\n[[param]]\nname = \"b\"\nshape = [3]\n"
                                                                   "init = { kind = \"put\" }\n", "");
  ASSERT_EQ(spec.params.size(), 2u);
  EXPECT_EQ(spec.params[0].init.kind, InitSpec::Kind::put);
  EXPECT_EQ(spec.params[1].init.kind, InitSpec::Kind::put);
  EXPECT_EQ(initial_value(spec.params[0].init, 4), 0.0f) << "zeros until a worker puts the values";
  EXPECT_EQ(to_string(InitSpec::Kind::put), "put");
}

TEST(ModelSpec, WorkerGroups) {
  const ModelSpec spec = parse_model_spec("name = \"m\"\nmax_workers = 8\nworkers_per_group = 2\n[optimizer]\nlr = 1\n"
                                          "[[param]]\nname = \"w\"\nshape = [4]\n", "");
  EXPECT_EQ(spec.workers_per_group, 2u);
}

TEST(ModelSpecErrors, WorkerGroupsLargerThanTheJob) {
  EXPECT_SPEC_ERROR("name = \"m\"\nmax_workers = 4\nworkers_per_group = 5\n[optimizer]\nlr = 1\n", "spec.toml:3:21",
                    "workers_per_group", "must be at most max_workers (4), got 5");
  EXPECT_SPEC_ERROR("name = \"m\"\nworkers_per_group = -1\n[optimizer]\nlr = 1\n", "spec.toml:2:21", "workers_per_group",
                    "(0 = every worker in one group)");
}

TEST(ModelSpec, SyncEveryIsAPeriodOrANumberOfUpdates) {
  const auto parse = [](const std::string& every) {
    return parse_model_spec("name = \"m\"\nsync_every = \"" + every + "\"\n[optimizer]\nlr = 1\n"
                            "[[param]]\nname = \"w\"\nshape = [4]\n", "");
  };
  const ModelSpec fallback = parse_model_spec("name = \"m\"\n[optimizer]\nlr = 1\n[[param]]\nname = \"w\"\nshape = [4]\n", "");
  EXPECT_EQ(fallback.sync_every.period, std::chrono::milliseconds(100));
  EXPECT_EQ(fallback.sync_every.updates, 0u);
  EXPECT_EQ(parse("250ms").sync_every.period, std::chrono::milliseconds(250));
  EXPECT_EQ(parse("2s").sync_every.period, std::chrono::milliseconds(2000));
  const ModelSpec by_updates = parse("50updates");
  EXPECT_EQ(by_updates.sync_every.updates, 50u);
  EXPECT_EQ(by_updates.sync_every.period, std::chrono::milliseconds(0));
  EXPECT_EQ(sync_every_text(by_updates.sync_every), "50updates");
}

TEST(ModelSpecErrors, SyncEveryNeedsAUnit) {
  EXPECT_SPEC_ERROR("name = \"m\"\nsync_every = \"100\"\n[optimizer]\nlr = 1\n", "spec.toml:2:14", "sync_every",
                    "expected a period (\"100ms\", \"2s\", \"1m\") or a number of applied pushes (\"50updates\")");
  EXPECT_SPEC_ERROR("name = \"m\"\nsync_every = \"0ms\"\n[optimizer]\nlr = 1\n", "spec.toml:2:14", "sync_every",
                    "must be more than 0");
}

TEST(ModelSpec, StragglerTimeoutIsAPeriodOrOffWithADefaultBelowTheWorkersTimeout) {
  const auto parse = [](const std::string& timeout) {
    return parse_model_spec("name = \"m\"\nstraggler_timeout = \"" + timeout + "\"\n[optimizer]\nlr = 1\n"
                            "[[param]]\nname = \"w\"\nshape = [4]\n", "");
  };
  const ModelSpec fallback = parse_model_spec("name = \"m\"\n[optimizer]\nlr = 1\n[[param]]\nname = \"w\"\nshape = [4]\n", "");
  EXPECT_EQ(fallback.straggler_timeout, std::chrono::milliseconds(10'000));
  // Below WorkerOptions::timeout (30 s): stragglers go before the healthy workers time out.
  EXPECT_LT(fallback.straggler_timeout, std::chrono::seconds(30));
  EXPECT_EQ(parse("2s").straggler_timeout, std::chrono::milliseconds(2000));
  EXPECT_EQ(parse("750ms").straggler_timeout, std::chrono::milliseconds(750));
  EXPECT_EQ(parse("1m").straggler_timeout, std::chrono::milliseconds(60'000));
  EXPECT_EQ(parse("off").straggler_timeout, std::chrono::milliseconds(0));
  EXPECT_EQ(parse("0").straggler_timeout, std::chrono::milliseconds(0));
  EXPECT_EQ(straggler_timeout_text(std::chrono::milliseconds(10'000)), "10s");
  EXPECT_EQ(straggler_timeout_text(std::chrono::milliseconds(1500)), "1500ms");
  EXPECT_EQ(straggler_timeout_text(std::chrono::milliseconds(0)), "off");
  EXPECT_SPEC_ERROR("name = \"m\"\nstraggler_timeout = \"10\"\n[optimizer]\nlr = 1\n", "spec.toml:2:21",
                    "straggler_timeout", "expected a period (\"10s\", \"500ms\", \"1m\"), or \"0\" or \"off\"");
  EXPECT_SPEC_ERROR("name = \"m\"\nstraggler_timeout = \"30d\"\n[optimizer]\nlr = 1\n", "spec.toml:2:21",
                    "straggler_timeout", "expected a period");
}

TEST(ModelSpec, PretrainedInit) {
  const ModelSpec spec = parse_model_spec(R"(name = "m"
[optimizer]
lr = 0.1
[[param]]
name = "fc1.weight"
shape = [2, 3]
init = { kind = "pretrained", file = "models/w.safetensors" }
[[param]]
name = "b"
shape = [3]
init = { kind = "pretrained", file = "/abs/w.safetensors", tensor = "encoder.bias" }
)",
                                          "p.toml");
  ASSERT_EQ(spec.params.size(), 2u);
  EXPECT_EQ(spec.params[0].init.kind, InitSpec::Kind::pretrained);
  // Parsed from a string: relative to the current directory, i.e. left as written.
  EXPECT_EQ(spec.params[0].init.file, std::filesystem::path("models/w.safetensors"));
  EXPECT_EQ(spec.params[0].init.tensor, "fc1.weight");  // the default: the parameter's name
  EXPECT_EQ(spec.params[1].init.kind, InitSpec::Kind::pretrained);
  EXPECT_EQ(spec.params[1].init.file, std::filesystem::path("/abs/w.safetensors"));
  EXPECT_EQ(spec.params[1].init.tensor, "encoder.bias");
  EXPECT_EQ(shmps::server::to_string(InitSpec::Kind::pretrained), "pretrained");
  EXPECT_EQ(validate_model_spec(spec), "");

  // With a base directory, relative paths are resolved against it and absolute ones kept.
  const ModelSpec based = parse_model_spec(
      "name = \"m\"\n[optimizer]\nlr = 0.1\n[[param]]\nname = \"w\"\nshape = [1]\n"
      "init = { kind = \"pretrained\", file = \"w.safetensors\" }\n"
      "[[param]]\nname = \"v\"\nshape = [1]\n"
      "init = { kind = \"pretrained\", file = \"/abs/v.safetensors\" }\n",
      "s.toml", "specs/dir");
  EXPECT_EQ(based.params[0].init.file, std::filesystem::path("specs/dir/w.safetensors"));
  EXPECT_EQ(based.params[1].init.file, std::filesystem::path("/abs/v.safetensors"));
}

class ModelSpecFile : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string templ = (std::filesystem::temp_directory_path() / "shmps-spec-XXXXXX").string();
    ASSERT_NE(::mkdtemp(templ.data()), nullptr);
    dir_ = templ;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::filesystem::path dir_;
};

TEST_F(ModelSpecFile, PretrainedFileIsRelativeToTheSpecsDirectory) {
  std::filesystem::create_directories(dir_ / "models");
  const auto path = dir_ / "models" / "mlp.toml";
  {
    std::ofstream out(path);
    out << "name = \"m\"\n[optimizer]\nlr = 0.1\n[[param]]\nname = \"w\"\nshape = [1]\n"
           "init = { kind = \"pretrained\", file = \"weights/w.safetensors\", tensor = \"x\" }\n"
           "[[param]]\nname = \"v\"\nshape = [1]\n"
           "init = { kind = \"pretrained\", file = \"/elsewhere/v.safetensors\" }\n";
  }
  // The parser does not open the files (neither exists).
  const ModelSpec spec = load_model_spec(path);
  EXPECT_EQ(spec.params[0].init.file, dir_ / "models" / "weights" / "w.safetensors");
  EXPECT_EQ(spec.params[0].init.tensor, "x");
  EXPECT_EQ(spec.params[1].init.file, std::filesystem::path("/elsewhere/v.safetensors"));
  EXPECT_EQ(spec.params[1].init.tensor, "v");
}

TEST(ModelSpec, ConsistencyModesAndIntegerNumbers) {
  auto with = [](std::string_view line) {
    return parse_model_spec(std::string("name = \"m\"\n") + std::string(line) +
                                "\n[optimizer]\nlr = 1\n[[param]]\nname = \"w\"\nshape = [1]\n",
                            "c.toml");
  };
  EXPECT_EQ(with("consistency = \"bsp\"").consistency, Consistency::bsp);
  EXPECT_EQ(with("consistency = \"asp\"").consistency, Consistency::asp);
  const ModelSpec ssp0 = with("consistency = \"ssp:0\"");
  EXPECT_EQ(ssp0.consistency, Consistency::ssp);
  EXPECT_EQ(ssp0.staleness, 0u);
  EXPECT_EQ(with("consistency = \"ssp:4294967295\"").staleness, 4294967295u);
  EXPECT_EQ(with("").optimizer.lr, 1.0f);  // lr = 1 written as an integer
}

TEST(ModelSpec, LoadErrorsNameTheFile) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("shmps_test_model_spec_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto bad = dir / "bad.toml";
  {
    std::ofstream out(bad);
    out << "name = \"m\"\n[optimizer]\nlr = -0.1\n";
  }
  try {
    load_model_spec(bad);
    ADD_FAILURE() << "no error";
  } catch (const SpecError& e) {
    EXPECT_EQ(std::string(e.what()).rfind(bad.string() + ":3:6: optimizer.lr: ", 0), 0u)
        << e.what();
  }
  try {
    load_model_spec(dir / "missing.toml");
    ADD_FAILURE() << "no error";
  } catch (const SpecError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find((dir / "missing.toml").string() + ": cannot read the model spec"),
              std::string::npos)
        << msg;
    EXPECT_NE(msg.find("No such file"), std::string::npos) << msg;
  }
  try {
    load_model_spec(dir);
    ADD_FAILURE() << "no error";
  } catch (const SpecError& e) {
    EXPECT_NE(std::string(e.what()).find("is a directory"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

// ---- Errors: syntax, unknown keys, types ------------------------------------------------------

TEST(ModelSpecErrors, TomlSyntaxErrorHasItsPosition) {
  EXPECT_SPEC_ERROR("name = \"m\"\nmax_workers = = 3\n", "spec.toml:2:15", "syntax error", "");
  const std::string msg = error_of("name = \"m\"\nname = \"n\"\n");
  EXPECT_EQ(msg.rfind("spec.toml:2:", 0), 0u) << msg;
  EXPECT_NE(msg.find("syntax error"), std::string::npos) << msg;
}

TEST(ModelSpecErrors, UnknownTopLevelKey) {
  EXPECT_SPEC_ERROR(R"(name = "m"
max_worker = 4
)",
                    "spec.toml:2:1", "max_worker", "unknown key", "did you mean \"max_workers\"?",
                    "valid keys: name, slice_bytes, max_workers, workers_per_group, ring_bytes, server_threads, "
                    "consistency, bsp_aggregate, on_worker_death, straggler_timeout, sync_every, optimizer, param");
}

TEST(ModelSpecErrors, UnknownOptimizerKey) {
  EXPECT_SPEC_ERROR(R"(name = "m"
[optimizer]
lr = 0.1
learning_rate = 0.1
)",
                    "spec.toml:4:1", "optimizer.learning_rate", "unknown key",
                    "valid keys: kind, lr, momentum, beta1, beta2, rho, eps, weight_decay, "
                    "clip_value, clip_norm");
  EXPECT_SPEC_ERROR(R"(name = "m"
[optimizer]
lrr = 0.1
)",
                    "spec.toml:3:1", "optimizer.lrr", "unknown key", "did you mean \"lr\"?");
}

TEST(ModelSpecErrors, TopLevelKeyAfterATableGetsAHint) {
  EXPECT_SPEC_ERROR(R"(name = "m"
[optimizer]
lr = 0.1
max_workers = 4
)",
                    "spec.toml:4:1", "optimizer.max_workers", "unknown key",
                    "top-level keys must come before the first [table] header");
}

TEST(ModelSpecErrors, UnknownParamKey) {
  EXPECT_SPEC_ERROR(R"(name = "m"
[optimizer]
lr = 0.1
[[param]]
name = "w"
shap = [2]
)",
                    "spec.toml:6:1", "param[0].shap", "unknown key", "did you mean \"shape\"?",
                    "valid keys: name, shape, init");
}

TEST(ModelSpecErrors, WrongTypes) {
  EXPECT_SPEC_ERROR("name = \"m\"\nmax_workers = \"8\"\n", "spec.toml:2:15", "max_workers",
                    "expected an integer, got a string (\"8\")");
  EXPECT_SPEC_ERROR("name = \"m\"\nmax_workers = 8.0\n", "spec.toml:2:15", "max_workers",
                    "expected an integer, got a float (8)", "without a decimal point");
  EXPECT_SPEC_ERROR("name = 5\n", "spec.toml:1:8", "name", "expected a string, got an integer (5)");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nlr = \"fast\"\n", "spec.toml:3:6", "optimizer.lr",
                    "expected a number, got a string (\"fast\")");
  EXPECT_SPEC_ERROR("name = \"m\"\noptimizer = \"sgd\"\n", "spec.toml:2:13", "optimizer",
                    "expected a table ([optimizer]), got a string");
}

// ---- Errors: missing required fields (reported at the table that should hold them) ---------

TEST(ModelSpecErrors, MissingName) {
  EXPECT_SPEC_ERROR("max_workers = 2\n[optimizer]\nlr = 0.1\n", "spec.toml:1:1", "name", "missing",
                    "add name = ");
}

TEST(ModelSpecErrors, MissingOptimizer) {
  EXPECT_SPEC_ERROR("name = \"m\"\n[[param]]\nname = \"w\"\nshape = [1]\n", "spec.toml:1:1",
                    "optimizer", "missing", "[optimizer]", "lr");
}

TEST(ModelSpecErrors, MissingLr) {
  EXPECT_SPEC_ERROR(R"(name = "m"

[optimizer]
kind = "sgd"
[[param]]
name = "w"
shape = [1]
)",
                    "spec.toml:3:1", "optimizer.lr", "missing", "add lr = ");
}

TEST(ModelSpecErrors, MissingParams) {
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nlr = 0.1\n", "spec.toml:1:1", "param",
                    "no [[param]] tables", "at least one parameter");
  EXPECT_SPEC_ERROR("name = \"m\"\nparam = []\n[optimizer]\nlr = 0.1\n", "spec.toml:2:9", "param",
                    "no parameters");
}

TEST(ModelSpecErrors, SingleParamTableInsteadOfArray) {
  EXPECT_SPEC_ERROR(R"(name = "m"
[optimizer]
lr = 0.1
[param]
name = "w"
shape = [1]
)",
                    "spec.toml:4:1", "param", "got a single table", "[[param]]");
}

TEST(ModelSpecErrors, MissingParamNameAndShape) {
  EXPECT_SPEC_ERROR(R"(name = "m"
[optimizer]
lr = 0.1
[[param]]
name = "w"
shape = [1]
[[param]]
shape = [2]
)",
                    "spec.toml:7:1", "param[1].name", "missing");
  EXPECT_SPEC_ERROR(R"(name = "m"
[optimizer]
lr = 0.1
[[param]]
name = "w"
)",
                    "spec.toml:4:1", "param[0].shape", "missing", "shape = [");
}

// ---- Errors: values -------------------------------------------------------------------------

TEST(ModelSpecErrors, NegativeLr) {
  EXPECT_SPEC_ERROR(R"(name = "m"
[optimizer]
kind = "sgd"
lr = -0.1
)",
                    "spec.toml:4:6", "optimizer.lr", "must be a positive number, got -0.1");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nlr = 0\n", "spec.toml:3:6", "optimizer.lr",
                    "must be a positive number, got 0");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nlr = nan\n", "spec.toml:3:6", "optimizer.lr",
                    "must be a positive number");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nlr = 1e-50\n", "spec.toml:3:6", "optimizer.lr",
                    "(1e-50 rounded to float32)");
}

TEST(ModelSpecErrors, OptimizerRanges) {
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nkind = \"adam\"\nlr = 0.1\nbeta1 = 1.0\n",
                    "spec.toml:5:9", "optimizer.beta1", "must be in [0, 1), got 1");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nkind = \"adam\"\nlr = 0.1\nbeta2 = 0.999999999\n",
                    "spec.toml:5:9", "optimizer.beta2", "must be in [0, 1), got 1",
                    "(0.999999999 rounded to float32)");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nkind = \"adam\"\nlr = 0.1\neps = 0\n",
                    "spec.toml:5:7", "optimizer.eps", "must be a positive number, got 0");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nkind = \"rmsprop\"\nlr = 0.1\nrho = -0.5\n",
                    "spec.toml:5:7", "optimizer.rho", "must be in [0, 1), got -0.5");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nkind = \"momentum\"\nlr = 0.1\nmomentum = 1\n",
                    "spec.toml:5:12", "optimizer.momentum", "must be in [0, 1), got 1");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nlr = 0.1\nweight_decay = -1e-4\n", "spec.toml:4:16",
                    "optimizer.weight_decay", "non-negative", "got -1e-04");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nlr = 0.1\nclip_value = -1\n", "spec.toml:4:14",
                    "optimizer.clip_value", "non-negative");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nlr = 0.1\nclip_norm = inf\n", "spec.toml:4:13",
                    "optimizer.clip_norm", "non-negative");
}

TEST(ModelSpecErrors, KeyNotUsedByTheOptimizerKind) {
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nlr = 0.1\nmomentum = 0.9\n", "spec.toml:4:1",
                    "optimizer.momentum", "not used by kind \"sgd\"",
                    "the default when optimizer.kind is not given", "momentum, nesterov");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nkind = \"momentum\"\nlr = 0.1\nbeta1 = 0.9\n",
                    "spec.toml:5:1", "optimizer.beta1", "not used by kind \"momentum\"", "adam");
}

TEST(ModelSpecErrors, UnknownOptimizerKind) {
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nkind = \"adamw\"\nlr = 0.1\n", "spec.toml:3:8",
                    "optimizer.kind", "unknown optimizer kind \"adamw\"", "did you mean \"adam\"?",
                    "valid kinds: sgd, momentum, nesterov, adagrad, rmsprop, adam");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nkind = \"SGD\"\nlr = 0.1\n", "spec.toml:3:8",
                    "optimizer.kind", "did you mean \"sgd\"?");
}

TEST(ModelSpecErrors, BadSegmentName) {
  EXPECT_SPEC_ERROR("name = \"jobs/mlp\"\n", "spec.toml:1:8", "name", "contains '/' at position 5",
                    "not allowed", "letters, digits, '.', '_' and '-'");
  EXPECT_SPEC_ERROR("name = \"my job\"\n", "spec.toml:1:8", "name",
                    "contains a space at position 3");
  EXPECT_SPEC_ERROR("name = \"\"\n", "spec.toml:1:8", "name", "segment name is empty");
  EXPECT_SPEC_ERROR("name = \"" + std::string(64, 'a') + "\"\n", "spec.toml:1:8", "name",
                    "64 characters long; the limit is 63");
}

TEST(ModelSpecErrors, SliceAndWorkerLimits) {
  EXPECT_SPEC_ERROR("name = \"m\"\nslice_bytes = 100\n", "spec.toml:2:15", "slice_bytes",
                    "must be a multiple of 64 from 64 to 2^30, got 100");
  EXPECT_SPEC_ERROR("name = \"m\"\nslice_bytes = 0\n", "spec.toml:2:15", "slice_bytes", "got 0");
  EXPECT_SPEC_ERROR("name = \"m\"\nmax_workers = 0\n", "spec.toml:2:15", "max_workers",
                    "must be from 1 to 1024, got 0");
  EXPECT_SPEC_ERROR("name = \"m\"\nmax_workers = 1025\n", "spec.toml:2:15", "max_workers",
                    "got 1025");
  EXPECT_SPEC_ERROR("name = \"m\"\nring_bytes = -64\n", "spec.toml:2:14", "ring_bytes",
                    "multiple of 64", "got -64");
  EXPECT_SPEC_ERROR("name = \"m\"\nserver_threads = 5000\n", "spec.toml:2:18", "server_threads",
                    "at most 4096", "got 5000");
}

TEST(ModelSpecErrors, BadConsistency) {
  EXPECT_SPEC_ERROR("name = \"m\"\nconsistency = \"ssp\"\n", "spec.toml:2:15", "consistency",
                    "needs its staleness bound", "\"ssp:N\"");
  EXPECT_SPEC_ERROR("name = \"m\"\nconsistency = \"ssp:x\"\n", "spec.toml:2:15", "consistency",
                    "expected \"asp\", \"bsp\" or \"ssp:N\"", "got \"ssp:x\"");
  EXPECT_SPEC_ERROR("name = \"m\"\nconsistency = \"ssp:4294967296\"\n", "spec.toml:2:15",
                    "consistency", "got \"ssp:4294967296\"");
  EXPECT_SPEC_ERROR("name = \"m\"\nconsistency = \"eventual\"\n", "spec.toml:2:15", "consistency",
                    "got \"eventual\"");
}

constexpr std::string_view kHead = "name = \"m\"\n[optimizer]\nlr = 0.1\n[[param]]\nname = \"w\"\n";

TEST(ModelSpecErrors, Shapes) {
  const std::string head(kHead);  // 5 lines; shape is on line 6
  EXPECT_SPEC_ERROR(head + "shape = 5\n", "spec.toml:6:9", "param[0].shape",
                    "expected an array of positive integers, got an integer (5)", "shape = [5]");
  EXPECT_SPEC_ERROR(head + "shape = [\"a\"]\n", "spec.toml:6:10", "param[0].shape",
                    "expected an array of positive integers", "1st dimension is a string");
  EXPECT_SPEC_ERROR(head + "shape = [4, 2.5]\n", "spec.toml:6:13", "param[0].shape",
                    "expected an array of positive integers", "2nd dimension is a float (2.5)");
  EXPECT_SPEC_ERROR(head + "shape = [1, 2, -3]\n", "spec.toml:6:16", "param[0].shape",
                    "3rd dimension is -3");
  EXPECT_SPEC_ERROR(head + "shape = [1, 2, 3, 4, 5, 6, 7, 8, 9]\n", "spec.toml:6:9",
                    "param[0].shape", "has 9 dimensions; at most 8");
}

TEST(ModelSpecErrors, EmptyShape) {
  EXPECT_SPEC_ERROR(std::string(kHead) + "shape = []\n", "spec.toml:6:9", "param[0].shape",
                    "expected an array of positive integers, got an empty array");
}

TEST(ModelSpecErrors, ZeroDimension) {
  EXPECT_SPEC_ERROR(R"(name = "m"
[optimizer]
lr = 0.1
[[param]]
name = "a"
shape = [1]
[[param]]
name = "b"
shape = [1]
[[param]]
name = "c"
shape = [256, 0]
)",
                    "spec.toml:12:15", "param[2].shape",
                    "expected an array of positive integers; the 2nd dimension is 0");
}

TEST(ModelSpecErrors, TooLarge) {
  // 2^20 * 2^20 * 2^7 = 2^47 elements = 2^49 bytes.
  EXPECT_SPEC_ERROR(std::string(kHead) + "shape = [1048576, 1048576, 128]\n", "spec.toml:6:9",
                    "param[0].shape", "too large", "at most 2^48 bytes");
  // A product that overflows 64 bits.
  EXPECT_SPEC_ERROR(std::string(kHead) + "shape = [4294967296, 4294967296, 4294967296]\n",
                    "spec.toml:6:9", "param[0].shape", "too large");
  // 2^46 elements (2^48 bytes) is the limit for one parameter and for all of them together.
  const std::string big = "shape = [70368744177664]\n";  // 2^46
  EXPECT_EQ(parse_model_spec(std::string(kHead) + big, "s").params[0].size(),
            std::uint64_t{1} << 46);
  EXPECT_SPEC_ERROR(std::string(kHead) + big + "[[param]]\nname = \"v\"\nshape = [1]\n",
                    "spec.toml:9:9", "param[1].shape", "more than 2^48 bytes in total");
}

TEST(ModelSpecErrors, DuplicateParamName) {
  EXPECT_SPEC_ERROR(R"(name = "m"
[optimizer]
lr = 0.1
[[param]]
name = "fc1.weight"
shape = [1]
[[param]]
name = "fc1.weight"
shape = [2]
)",
                    "spec.toml:8:8", "param[1].name", "duplicate parameter name \"fc1.weight\"",
                    "first defined by param[0] at spec.toml:5:8", "must be unique");
}

TEST(ModelSpecErrors, BadParamName) {
  EXPECT_SPEC_ERROR(
      std::string(kHead.substr(0, kHead.size() - 11)) + "name = \"a b\"\nshape = [1]\n",
      "spec.toml:5:8", "param[0].name", "contains a space at position 2");
  EXPECT_SPEC_ERROR(std::string(kHead.substr(0, kHead.size() - 11)) + "name = \"" +
                        std::string(64, 'x') + "\"\nshape = [1]\n",
                    "spec.toml:5:8", "param[0].name", "64 bytes long; the limit is 63");
}

TEST(ModelSpecErrors, Inits) {
  const std::string head = std::string(kHead) + "shape = [4]\n";  // init is on line 7
  EXPECT_SPEC_ERROR(head + "init = \"uniform\"\n", "spec.toml:7:8", "param[0].init",
                    "unknown init kind \"uniform\"");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"normal\" }\n", "spec.toml:7:17", "param[0].init.kind",
                    "unknown init kind \"normal\"",
                    "valid kinds: \"zeros\", \"constant\", \"u24\"");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"put\", value = 1.0 }\n", "spec.toml:7:24", "param[0].init.value",
                    "for init kind \"put\"");
  EXPECT_SPEC_ERROR(head + "init = \"u24\"\n", "spec.toml:7:8", "param[0].init", "needs its stream",
                    "{ kind = \"u24\", stream = ");
  EXPECT_SPEC_ERROR(head + "init = { scale = 2.0 }\n", "spec.toml:7:8", "param[0].init.kind",
                    "missing");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"u24\", scale = 2.0 }\n", "spec.toml:7:8",
                    "param[0].init.stream", "missing");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"u24\", stream = -1 }\n", "spec.toml:7:33",
                    "param[0].init.stream", "must be an integer >= 0, got -1");
  EXPECT_SPEC_ERROR(
      head + "init = { kind = \"u24\", stream = 1, scale = 0.5, scale_divisor = 2 }\n",
      "spec.toml:7:65", "param[0].init.scale_divisor", "either scale or scale_divisor, not both");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"u24\", stream = 1, scale_divisor = 0 }\n",
                    "spec.toml:7:52", "param[0].init.scale_divisor", "non-zero", "got 0");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"u24\", stream = 1, value = 3 }\n", "spec.toml:7:36",
                    "param[0].init.value", "unknown key for init kind \"u24\"",
                    "valid keys: kind, stream, scale, scale_divisor");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"constant\" }\n", "spec.toml:7:8",
                    "param[0].init.value", "missing");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"constant\", value = 1e39 }\n", "spec.toml:7:37",
                    "param[0].init.value", "finite float32");
  EXPECT_SPEC_ERROR(head + "init = 3\n", "spec.toml:7:8", "param[0].init",
                    "expected \"zeros\", \"put\", { kind = \"constant\"", "got an integer (3)");
}

TEST(ModelSpecErrors, PretrainedInits) {
  const std::string head = std::string(kHead) + "shape = [4]\n";  // init is on line 7
  EXPECT_SPEC_ERROR(head + "init = \"pretrained\"\n", "spec.toml:7:8", "param[0].init",
                    "needs its file", "{ kind = \"pretrained\", file = ");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"pretrained\" }\n", "spec.toml:7:8",
                    "param[0].init.file", "missing", "file = \"<path>.safetensors\"");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"pretrained\", tensor = \"x\" }\n", "spec.toml:7:8",
                    "param[0].init.file", "missing");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"pretrained\", file = \"\" }\n", "spec.toml:7:38",
                    "param[0].init.file", "must not be empty");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"pretrained\", file = \"a\\u0000b\" }\n",
                    "spec.toml:7:38", "param[0].init.file", "contains a NUL byte at position 2");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"pretrained\", file = 3 }\n", "spec.toml:7:38",
                    "param[0].init.file", "expected a string, got an integer (3)");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"pretrained\", file = \"w.st\", tensor = \"\" }\n",
                    "spec.toml:7:55", "param[0].init.tensor", "must not be empty",
                    "leave tensor out to use the parameter's name");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"pretrained\", file = \"w.st\", tensor = [1] }\n",
                    "spec.toml:7:55", "param[0].init.tensor", "expected a string, got an array");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"pretrained\", file = \"w.st\", tensr = \"x\" }\n",
                    "spec.toml:7:46", "param[0].init.tensr",
                    "unknown key for init kind \"pretrained\" (did you mean \"tensor\"?)",
                    "valid keys: kind, file, tensor");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"pretrained\", file = \"w.st\", stream = 1 }\n",
                    "spec.toml:7:46", "param[0].init.stream",
                    "unknown key for init kind \"pretrained\"");
  EXPECT_SPEC_ERROR(head + "init = { kind = \"pretrianed\", file = \"w.st\" }\n", "spec.toml:7:17",
                    "param[0].init.kind", "(did you mean \"pretrained\"?)");
}

// ---- The validators on their own -------------------------------------------------------------

TEST(ModelSpec, ValidateSegmentName) {
  EXPECT_EQ(validate_segment_name("mlp"), "");
  EXPECT_EQ(validate_segment_name("Job_2.run-3"), "");
  EXPECT_EQ(validate_segment_name(std::string(63, 'a')), "");
  EXPECT_NE(validate_segment_name("a/b").find("contains '/' at position 2, which is not allowed"),
            std::string::npos);
  EXPECT_NE(validate_segment_name("a\x01").find("the byte 0x01 at position 2"), std::string::npos);
  EXPECT_NE(validate_segment_name("caf\xc3\xa9").find("the byte 0xC3 at position 4"),
            std::string::npos);
  EXPECT_NE(validate_segment_name("a:b").find("':'"), std::string::npos);
  EXPECT_NE(validate_segment_name("").find("empty"), std::string::npos);
  EXPECT_NE(validate_segment_name(std::string(64, 'a')).find("the limit is 63"), std::string::npos);
  EXPECT_NE(validate_segment_name(".hidden").find("starts with '.'"), std::string::npos);
  EXPECT_NE(validate_segment_name("..").find("starts with '.'"), std::string::npos);
  EXPECT_NE(validate_segment_name("-x").find("starts with '-'"), std::string::npos);
  EXPECT_NE(validate_segment_name("x.lock").find("ends in \".lock\""), std::string::npos);
}

TEST(ModelSpec, ValidateModelSpecBuiltInCode) {
  ModelSpec spec;
  spec.name = "m";
  spec.optimizer.lr = 0.1f;
  spec.params.push_back({"w", {2, 3}, {}});
  EXPECT_EQ(validate_model_spec(spec), "");

  auto bad = [&](auto change) {
    ModelSpec s = spec;
    change(s);
    return validate_model_spec(s);
  };
  EXPECT_EQ(bad([](ModelSpec& s) { s.name = "a/b"; }).rfind("name: ", 0), 0u);
  EXPECT_EQ(bad([](ModelSpec& s) { s.slice_bytes = 100; }).rfind("slice_bytes: ", 0), 0u);
  EXPECT_EQ(bad([](ModelSpec& s) { s.max_workers = 0; }).rfind("max_workers: ", 0), 0u);
  EXPECT_EQ(bad([](ModelSpec& s) { s.ring_bytes = 65; }).rfind("ring_bytes: ", 0), 0u);
  EXPECT_EQ(bad([](ModelSpec& s) { s.staleness = 2; }).rfind("staleness: ", 0), 0u);
  EXPECT_EQ(bad([](ModelSpec& s) { s.optimizer.lr = -1.0f; }),
            "optimizer.lr: must be a positive number, got -1");
  EXPECT_EQ(bad([](ModelSpec& s) { s.params.clear(); }).rfind("param: ", 0), 0u);
  EXPECT_EQ(bad([](ModelSpec& s) {
              s.params.push_back({"w", {1}, {}});
            }).rfind("param[1].name: duplicate parameter name \"w\"", 0),
            0u);
  EXPECT_EQ(bad([](ModelSpec& s) { s.params[0].shape = {}; }).rfind("param[0].shape: ", 0), 0u);
  EXPECT_EQ(bad([](ModelSpec& s) {
              s.params[0].shape = {4, 0};
            }),
            "param[0].shape: the 2nd dimension is 0");
  EXPECT_EQ(bad([](ModelSpec& s) {
              s.params[0].shape = {1u << 31, 1u << 31, 1u << 31};
            }).rfind("param[0].shape: shape [2147483648, 2147483648, 2147483648] is too large", 0),
            0u);
  EXPECT_EQ(bad([](ModelSpec& s) {
              s.params[0].init.kind = InitSpec::Kind::constant;
              s.params[0].init.value = std::numeric_limits<float>::infinity();
            }),
            "param[0].init.value: must be finite");
  auto pretrained = [](ModelSpec& s) {
    s.params[0].init.kind = InitSpec::Kind::pretrained;
    s.params[0].init.file = "w.safetensors";
    s.params[0].init.tensor = "w";
  };
  EXPECT_EQ(bad(pretrained), "");
  EXPECT_EQ(bad([&](ModelSpec& s) {
              pretrained(s);
              s.params[0].init.file.clear();
            }).rfind("param[0].init.file: must not be empty", 0),
            0u);
  EXPECT_EQ(bad([&](ModelSpec& s) {
              pretrained(s);
              s.params[0].init.tensor.clear();
            }).rfind("param[0].init.tensor: must not be empty", 0),
            0u);
}

TEST(ModelSpec, ParamSize) {
  EXPECT_EQ((ParamSpec{"a", {256, 784}, {}}.size()), 200704u);
  EXPECT_EQ((ParamSpec{"a", {7}, {}}.size()), 7u);
  EXPECT_EQ((ParamSpec{"a", {1u << 31, 1u << 31, 1u << 31}, {}}.size()),
            std::numeric_limits<std::uint64_t>::max());  // saturates
}

}  // namespace

// ---- optimizer.state_dtype -----------------------------------------------------------------

TEST(ModelSpec, StateDtype) {
  const auto spec_of = [](const std::string& optimizer) {
    return parse_model_spec("name = \"m\"\n[optimizer]\n" + optimizer + "[[param]]\nname = \"w\"\nshape = [4]\n",
                            "spec.toml");
  };
  EXPECT_EQ(spec_of("kind = \"adam\"\nlr = 0.1\n").optimizer.state_dtype, shmps::StateDType::f32);  // the default
  EXPECT_EQ(spec_of("kind = \"adam\"\nlr = 0.1\nstate_dtype = \"f32\"\n").optimizer.state_dtype, shmps::StateDType::f32);
  EXPECT_EQ(spec_of("kind = \"adam\"\nlr = 0.1\nstate_dtype = \"bf16\"\n").optimizer.state_dtype,
            shmps::StateDType::bf16);
  for (const char* kind : {"momentum", "nesterov", "adagrad", "rmsprop"})
    EXPECT_EQ(spec_of(std::string("kind = \"") + kind + "\"\nlr = 0.1\nstate_dtype = \"bf16\"\n").optimizer.state_dtype,
              shmps::StateDType::bf16)
        << kind;
}

TEST(ModelSpecErrors, StateDtype) {
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nkind = \"adam\"\nlr = 0.1\nstate_dtype = \"fp16\"\n",
                    "spec.toml:5:15", "optimizer.state_dtype", "unknown state dtype \"fp16\"",
                    "\"f32\" (float32, the default) or \"bf16\"");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nkind = \"adam\"\nlr = 0.1\nstate_dtype = 16\n", "spec.toml:5:15",
                    "optimizer.state_dtype", "expected a string");
  // SGD keeps no state: asking for its dtype is the same mistake as momentum with kind sgd.
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nlr = 0.1\nstate_dtype = \"bf16\"\n[[param]]\nname = \"w\"\nshape = [4]\n",
                    "spec.toml:4:1",
                    "optimizer.state_dtype", "not used by kind \"sgd\"", "momentum, nesterov, adagrad, rmsprop, adam");
}

TEST(ModelSpec, TablesBecomeParametersOfRowsByDim) {
  const ModelSpec spec = parse_model_spec(
      "name = \"m\"\nslice_bytes = 1024\n[optimizer]\nlr = 1\n[[param]]\nname = \"head\"\nshape = [16]\n"
      "[[table]]\nname = \"emb\"\nrows = 1048576\ndim = 16\ninit = { kind = \"u24\", stream = 24, scale_divisor = 64 }\n",
      "");
  ASSERT_EQ(spec.params.size(), 2u);
  EXPECT_EQ(spec.params[0].table_dim, 0u);
  EXPECT_EQ(spec.params[1].name, "emb");
  EXPECT_EQ(spec.params[1].table_dim, 16u);
  EXPECT_EQ(spec.params[1].shape, (std::vector<std::uint64_t>{1048576, 16}));
  EXPECT_EQ(spec.params[1].init.kind, InitSpec::Kind::u24);
  EXPECT_FALSE(spec.params[1].keyed);
  // keys = "u64": rows is the number of slots; admit_after defaults to 1.
  const ModelSpec keyed = parse_model_spec(
      "name = \"m\"\n[optimizer]\nlr = 1\n[[table]]\nname = \"t\"\nrows = 64\ndim = 4\nkeys = \"u64\"\n"
      "[[table]]\nname = \"u\"\nrows = 64\ndim = 4\nkeys = \"u64\"\nadmit_after = 3\n",
      "");
  EXPECT_TRUE(keyed.params[0].keyed);
  EXPECT_EQ(keyed.params[0].admit_after, 1u);
  EXPECT_EQ(keyed.params[1].admit_after, 3u);
  EXPECT_EQ(validate_model_spec(keyed), "");
  // A model of tables only needs no [[param]].
  EXPECT_EQ(parse_model_spec("name = \"m\"\n[optimizer]\nlr = 1\n[[table]]\nname = \"t\"\nrows = 4\ndim = 4\n", "")
                .params.size(),
            1u);
}

TEST(ModelSpecErrors, TablesThatTheJobCannotServe) {
  const std::string top = "name = \"m\"\nslice_bytes = 64\n[optimizer]\nlr = 1\n";
  EXPECT_SPEC_ERROR(top + "[[table]]\nname = \"t\"\nrows = 4\ndim = 5\n", "spec.toml:5:1", "table[0].dim",
                    "make slice_bytes a multiple of 20");
  EXPECT_SPEC_ERROR(top + "[[table]]\nname = \"t\"\nrows = 4\n", "spec.toml:5:1", "table[0].dim", "missing");
  EXPECT_SPEC_ERROR(top + "[[table]]\nname = \"t\"\nrows = 0\ndim = 4\n", "spec.toml:7:8", "table[0].rows", "from 1");
  EXPECT_SPEC_ERROR(top + "[[param]]\nname = \"t\"\nshape = [4]\n[[table]]\nname = \"t\"\nrows = 4\ndim = 4\n",
                    "spec.toml:9:8", "table[0].name", "parameters and tables share one namespace");
  // Keys: the one kind, admit_after only with keys, and inits a key's row can start from.
  EXPECT_SPEC_ERROR(top + "[[table]]\nname = \"t\"\nrows = 4\ndim = 4\nkeys = \"u32\"\n", "spec.toml:9:8",
                    "table[0].keys", "unknown key type \"u32\"", "\"u64\"");
  EXPECT_SPEC_ERROR(top + "[[table]]\nname = \"t\"\nrows = 4\ndim = 4\nadmit_after = 2\n", "spec.toml:9:15",
                    "table[0].admit_after", "only a table with keys = \"u64\" admits keys");
  EXPECT_SPEC_ERROR(top + "[[table]]\nname = \"t\"\nrows = 4\ndim = 4\nkeys = \"u64\"\nadmit_after = 0\n",
                    "spec.toml:10:15", "table[0].admit_after", "from 1");
  EXPECT_SPEC_ERROR(top + "[[table]]\nname = \"t\"\nrows = 4\ndim = 4\nkeys = \"u64\"\ninit = \"put\"\n", "spec.toml:5:1",
                    "table[0].init", "must be zeros, constant or u24, not put");
  EXPECT_SPEC_ERROR(top + "[[table]]\nname = \"t\"\nrows = 4\ndim = 4\nkeys = \"u64\"\ndtype = \"bf16\"\n",
                    "spec.toml:5:1", "table[0].dtype", "keeps float32 rows");
  // Adam with a table is lazy Adam (a step count per row), not a mistake.
  const ModelSpec adam = parse_model_spec(
      "name = \"m\"\n[optimizer]\nkind = \"adam\"\nlr = 1\n[[table]]\nname = \"t\"\nrows = 4\ndim = 4\n", "spec.toml");
  EXPECT_EQ(adam.optimizer.kind, OptimizerKind::adam);
  EXPECT_EQ(validate_model_spec(adam), "");
}

// A table's own optimizer: a whole optimizer table of its own (lr required, the same value rules
// and "not used by this kind" checks, named by its field), row-wise AdaGrad for tables only, and
// the state dtype the job's.
TEST(ModelSpec, ATableMayHaveItsOwnOptimizer) {
  const ModelSpec spec = parse_model_spec(
      "name = \"m\"\n[optimizer]\nkind = \"adam\"\nlr = 0.001\nstate_dtype = \"bf16\"\n[[param]]\nname = \"head\"\nshape = [4]\n"
      "[[table]]\nname = \"t\"\nrows = 4\ndim = 4\noptimizer = { kind = \"rowwise_adagrad\", lr = 0.5, eps = 1e-6 }\n"
      "[[table]]\nname = \"u\"\nrows = 4\ndim = 4\n",
      "spec.toml");
  ASSERT_EQ(spec.params.size(), 3u);
  EXPECT_FALSE(spec.params[0].optimizer.has_value());
  ASSERT_TRUE(spec.params[1].optimizer.has_value());
  EXPECT_EQ(spec.params[1].optimizer->kind, OptimizerKind::rowwise_adagrad);
  EXPECT_EQ(spec.params[1].optimizer->lr, 0.5f);
  EXPECT_EQ(spec.params[1].optimizer->eps, 1e-6f);
  EXPECT_EQ(spec.params[1].optimizer->state_dtype, shmps::StateDType::bf16) << "the job's";
  EXPECT_FALSE(spec.params[2].optimizer.has_value()) << "u takes the job's";
  EXPECT_EQ(validate_model_spec(spec), "");
  // The state dtype is the job's: given in an SGD job's [optimizer] for a table's own Adam.
  const ModelSpec sgd_job = parse_model_spec(
      "name = \"m\"\n[optimizer]\nlr = 1\nstate_dtype = \"bf16\"\n"
      "[[table]]\nname = \"t\"\nrows = 4\ndim = 4\noptimizer = { kind = \"adam\", lr = 0.01 }\n",
      "spec.toml");
  EXPECT_EQ(sgd_job.optimizer.kind, OptimizerKind::sgd);
  EXPECT_EQ(sgd_job.params[0].optimizer->state_dtype, shmps::StateDType::bf16);
  EXPECT_EQ(validate_model_spec(sgd_job), "");
}

TEST(ModelSpecErrors, ATablesOwnOptimizerIsCheckedAsTheJobsIs) {
  const std::string top = "name = \"m\"\nslice_bytes = 64\n[optimizer]\nlr = 1\n[[table]]\nname = \"t\"\nrows = 4\ndim = 4\n";
  EXPECT_SPEC_ERROR(top + "optimizer = { kind = \"adagrad\" }\n", "spec.toml:9:13", "table[0].optimizer.lr", "missing");
  EXPECT_SPEC_ERROR(top + "optimizer = { kind = \"rowwise_adagard\", lr = 1 }\n", "spec.toml:9:22", "table[0].optimizer.kind",
                    "did you mean \"rowwise_adagrad\"");
  EXPECT_SPEC_ERROR(top + "optimizer = { kind = \"sgd\", lr = 1, beta1 = 0.9 }\n", "spec.toml:9:37",
                    "table[0].optimizer.beta1", "not used by kind \"sgd\"");
  EXPECT_SPEC_ERROR(top + "optimizer = { kind = \"rowwise_adagrad\", lr = -1 }\n", "spec.toml:9:46", "table[0].optimizer.lr",
                    "must be a positive number");
  EXPECT_SPEC_ERROR(top + "optimizer = { kind = \"adam\", lr = 1, state_dtype = \"bf16\" }\n", "spec.toml:9:52",
                    "table[0].optimizer.state_dtype", "one for the whole job");
  EXPECT_SPEC_ERROR(top + "optimizer = \"adam\"\n", "spec.toml:9:13", "table[0].optimizer", "expected a table");
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nkind = \"rowwise_adagrad\"\nlr = 1\n[[param]]\nname = \"w\"\nshape = [4]\n",
                    "spec.toml:3:8", "optimizer.kind", "a table's optimizer only");
  // No optimizer of the job keeps state (a table's own row-wise AdaGrad keeps row words only).
  EXPECT_SPEC_ERROR("name = \"m\"\n[optimizer]\nlr = 1\nstate_dtype = \"bf16\"\n[[table]]\nname = \"t\"\nrows = 4\ndim = 4\n"
                    "optimizer = { kind = \"rowwise_adagrad\", lr = 1 }\n",
                    "spec.toml:4:1", "optimizer.state_dtype", "not used by kind \"sgd\"", "or a table's own");
}
