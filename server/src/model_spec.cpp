// The model spec's entry points: load_model_spec reads the file, parse_model_spec hands the text
// to the parser (model_spec_parser.hpp), and the small members of the spec's types. See
// model_spec.hpp for the format. Where the rest lives:
//   model_spec_parser.cpp, model_spec_parse_optimizer.cpp, model_spec_parse_init.cpp
//       TOML -> ModelSpec, every error with its position
//   model_spec_validate.cpp   validate_model_spec, validate_segment_name (a spec built in code)
//   model_spec_rules.cpp      the value rules and wording both share; name_distance
//   model_spec_policies.cpp   parse_consistency, parse_bsp_aggregate, parse_on_worker_death
#include "shmps/server/model_spec.hpp"

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>

#include "model_spec_parser.hpp"

namespace shmps::server {

namespace {
constexpr std::size_t kMaxSpecFileBytes = std::size_t{16} << 20;
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
    case InitSpec::Kind::put:
      return "put";
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

ModelSpec parse_model_spec(std::string_view toml_text, std::string_view source_name,
                           const std::filesystem::path& base_dir) {
  spec_detail::Parser parser(
      source_name.empty() ? std::string("<string>") : std::string(source_name), base_dir);
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

}  // namespace shmps::server
