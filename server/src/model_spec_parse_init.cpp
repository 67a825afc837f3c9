// The model spec parser's `init` of a [[param]]: "zeros", "put", or a table of kind zeros, put, constant,
// u24 or pretrained, each with the keys that kind needs. The pretrained file is only named
// here (resolved against the spec's directory); load_pretrained (initialise.hpp) reads it.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>

#include "model_spec_parser.hpp"
#include "shmps/server/optimizer.hpp"  // detail::format_number (header-only)

namespace shmps::server::spec_detail {

namespace {

constexpr std::string_view kInitKindsList[] = {"zeros", "constant", "u24", "pretrained", "put"};
constexpr std::string_view kZerosKeys[] = {"kind"};
constexpr std::string_view kPutKeys[] = {"kind"};
constexpr std::string_view kConstantKeys[] = {"kind", "value"};
constexpr std::string_view kU24Keys[] = {"kind", "stream", "scale", "scale_divisor"};
constexpr std::string_view kPretrainedKeys[] = {"kind", "file", "tensor"};
constexpr Keys kInitKinds{kInitKindsList};

// Every form of init, for "expected ..." messages.
constexpr std::string_view kInitExample =
    "\"zeros\", \"put\", { kind = \"constant\", value = 0.5 }, { kind = \"u24\", stream = 11, "
    "scale_divisor = 28 } or { kind = \"pretrained\", file = \"weights.safetensors\" }";

}  // namespace

InitSpec Parser::read_init(const toml::node& n, const std::string& field,
                           const std::string& param_name) const {
  InitSpec init;
  if (const auto* s = n.as_string()) {
    if (s->get() == "zeros") return init;
    if (s->get() == "put") {
      init.kind = InitSpec::Kind::put;
      return init;
    }
    fail_init_word(n, field, s->get());
  }
  const toml::table* t = n.as_table();
  if (t == nullptr) {
    fail(n.source(), field, "expected " + std::string(kInitExample) + ", got " + describe(n));
  }

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
    read_constant(*t, field, init);
  } else if (kind == "u24") {
    check_keys(*t, field + ".", kU24Keys, " for init kind \"u24\"");
    init.kind = InitSpec::Kind::u24;
    read_u24(*t, field, init);
  } else if (kind == "put") {
    check_keys(*t, field + ".", kPutKeys, " for init kind \"put\"");
    init.kind = InitSpec::Kind::put;
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

// init = "<kind>" for a kind other than zeros: every other kind needs a table with its values.
void Parser::fail_init_word(const toml::node& n, const std::string& field,
                            const std::string& kind) const {
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
           std::string(kInitExample));
}

void Parser::read_constant(const toml::table& t, const std::string& field, InitSpec& init) const {
  const toml::node* v = t.get("value");
  if (v == nullptr) {
    fail(t.source(), field + ".value", "missing; init kind \"constant\" needs value = <number>");
  }
  const double value = number(*v, field + ".value");
  init.value = static_cast<float>(value);
  if (!std::isfinite(init.value)) {
    fail(v->source(), field + ".value",
         "must be a finite float32 number, got " + detail::format_number(value));
  }
}

void Parser::read_u24(const toml::table& t, const std::string& field, InitSpec& init) const {
  const toml::node* sn = t.get("stream");
  if (sn == nullptr) {
    fail(t.source(), field + ".stream",
         "missing; init kind \"u24\" needs stream = <integer >= 0> (the SplitMix64 seed)");
  }
  const std::int64_t stream = integer(*sn, field + ".stream");
  if (stream < 0) {
    fail(sn->source(), field + ".stream", "must be an integer >= 0, got " + std::to_string(stream));
  }
  init.stream = static_cast<std::uint64_t>(stream);
  read_u24_scale(t, field, init);
}

// scale = s, or scale_divisor = d meaning scale = float32(1.0 / d); at most one of them.
void Parser::read_u24_scale(const toml::table& t, const std::string& field, InitSpec& init) const {
  const toml::node* scale = t.get("scale");
  const toml::node* divisor = t.get("scale_divisor");
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
}

void Parser::read_pretrained(const toml::table& t, const std::string& field,
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

}  // namespace shmps::server::spec_detail
