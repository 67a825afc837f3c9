// Fuzz target pretrained: feeds the bytes as the safetensors file that a model spec's
// init = { kind = "pretrained", ... } names, through load_pretrained (what a server creating a
// segment calls) and initialise() of each parameter. The spec: "w" [4, 8] from tensor "w", "b"
// [8] from tensor "bias" of the same file, and "t", a [[table]] of 16 rows of 2, from tensor "t".
// Checks: load_pretrained returns values or throws shmps::Error, nothing else; when it returns,
// each pretrained parameter has exactly its size of finite floats, equal to the file's bytes,
// and initialise() copies them bit for bit.
//
// SHMPS_FUZZ_MAKE_SEEDS=DIR: writes seed files (the project's own writer) into DIR and exits.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/initialise.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/server/safetensors.hpp>

#include "fuzz_support.hpp"

namespace {

using namespace shmps;
namespace st = server::safetensors;

constexpr const char* kSpec = R"(
name = "fuzz-pretrained"
[optimizer]
kind = "sgd"
lr = 0.1
[[param]]
name = "w"
shape = [4, 8]
init = { kind = "pretrained", file = "input.safetensors" }
[[param]]
name = "b"
shape = [8]
init = { kind = "pretrained", file = "input.safetensors", tensor = "bias" }
[[table]]
name = "t"
rows = 16
dim = 2
init = { kind = "pretrained", file = "input.safetensors" }
)";

void make_seeds(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  std::vector<float> w(32), b(8), t(32);
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(i) * 0.25f - 3.0f;
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = -static_cast<float>(i);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = 1.0f / static_cast<float>(i + 1);
  const auto view = [](const char* name, std::vector<std::uint64_t> shape, const std::vector<float>& v) {
    return st::TensorView{name, "F32", std::move(shape), std::as_bytes(std::span<const float>(v))};
  };
  st::write_file(dir / "all.safetensors", {view("w", {4, 8}, w), view("bias", {8}, b), view("t", {16, 2}, t)},
                 {{"source", "fuzz seed"}});
  // A wrong shape and an extra tensor: refused, but a near miss to mutate from.
  st::write_file(dir / "near.safetensors", {view("w", {8, 4}, w), view("bias", {8}, b), view("t", {16, 2}, t),
                                            view("extra", {2, 4}, b)}, {});
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("SHMPS_FUZZ_MAKE_SEEDS")) {
    make_seeds(dir);
    std::exit(0);
  }
  fuzz::quiet_log();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::filesystem::path dir = fuzz::scratch_dir("pretrained");
  static const server::ModelSpec spec = server::parse_model_spec(kSpec, "<fuzz spec>", dir);
  fuzz::write_file(dir / "input.safetensors", data, size);
  server::PretrainedValues pre;
  try {
    pre = server::load_pretrained(spec);
  } catch (const shmps::Error& e) {
    SHMPS_FUZZ_CHECK(e.what()[0] != '\0');
    return 0;
  }
  SHMPS_FUZZ_CHECK(pre.by_param.size() == spec.params.size());
  for (const server::ParamSpec& p : spec.params) {
    const std::vector<float>& v = pre.by_param.at(p.name);
    SHMPS_FUZZ_CHECK(v.size() == p.size());
    for (float x : v) SHMPS_FUZZ_CHECK(std::isfinite(x));
    std::vector<float> out(p.size());
    server::initialise(p, out, pre);
    SHMPS_FUZZ_CHECK(std::memcmp(out.data(), v.data(), v.size() * sizeof(float)) == 0);
  }
  return 0;
}
