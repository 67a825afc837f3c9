// Fuzz target model_spec: feeds the bytes as the text of a model spec (TOML) to
// parse_model_spec, the parser of every spec file (shmps-server --spec, shmps-launch).
// Checks: it returns a spec or throws SpecError / shmps::Error with a message, nothing else
// (no other exception, no sanitizer report, no hang); a spec it accepts has a valid segment
// name, at least one parameter, and every parameter a non-empty name and a size that is the
// product of its shape; the segment layout planned for an accepted spec (plan_for, what the
// server does next) is computed or refused with shmps::Error.
#include <cstdint>
#include <string_view>

#include <shmps/error.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/server/options.hpp>

#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace shmps::server;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  ModelSpec spec;
  try {
    // A base directory, as load_model_spec passes: a pretrained file path is resolved, not opened.
    spec = parse_model_spec(text, "<fuzz>", "/nonexistent");
  } catch (const SpecError& e) {
    SHMPS_FUZZ_CHECK(e.what()[0] != '\0');
    return 0;
  } catch (const shmps::Error& e) {
    SHMPS_FUZZ_CHECK(e.what()[0] != '\0');
    return 0;
  }
  SHMPS_FUZZ_CHECK(validate_segment_name(spec.name).empty());
  SHMPS_FUZZ_CHECK(!spec.params.empty());
  for (const ParamSpec& p : spec.params) {
    SHMPS_FUZZ_CHECK(!p.name.empty());
    std::uint64_t n = 1;
    for (std::uint64_t d : p.shape) n *= d;
    SHMPS_FUZZ_CHECK(n == p.size());
  }
  try {
    ServerOptions options;
    options.spec = std::move(spec);
    (void)plan_for(options);
  } catch (const shmps::Error&) {
  }
  return 0;
}
