// The model spec's value rules and message wording, shared by the TOML parser
// (model_spec_parser*.cpp, which reports with positions) and validate_model_spec
// (model_spec_validate.cpp, which checks a spec built in code), so both hold a spec to the
// same rules and word a problem the same way. Private to the shmps_spec library.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "shmps/server/model_spec.hpp"

namespace shmps::server::spec_detail {

using Keys = std::span<const std::string_view>;

// ---- Text helpers ---------------------------------------------------------------------------

// s in double quotes, escaped, cut after 80 characters.
std::string quote(std::string_view s);
std::string join(Keys words, std::string_view sep = ", ", bool quoted = false);
bool contains(Keys words, std::string_view w);
// "2^30" for a power of two from 2^20 up, else the decimal number.
std::string pow2_text(std::uint64_t v);

// ---- Value rules ----------------------------------------------------------------------------

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

inline constexpr IntRule kSliceBytesRule{64, kMaxSliceBytes, 64, ""};
inline constexpr IntRule kMaxWorkersRule{1, kMaxWorkersLimit, 1, ""};
inline constexpr IntRule kWorkersPerGroupRule{0, kMaxWorkersLimit, 1, " (0 = every worker in one group)"};
inline constexpr IntRule kRingBytesRule{0, kMaxRingBytes, 64, " (0 = sized by the server)"};
inline constexpr IntRule kServerThreadsRule{0, kMaxServerThreads, 1, " (0 = all cores)"};

// "" if `name` can be a parameter name, else what is wrong with it.
std::string param_name_problem(std::string_view name);

// "" or "<at>...: <problem>" for a [[table]] (p.table_dim != 0) that the job cannot serve: rows
// that would straddle slices, an optimizer that tables do not support, an init they do not take.
std::string table_problem(const ModelSpec& spec, const ParamSpec& p, const std::string& at);
// "" if `text` can be a pretrained file path or tensor name (not empty, no NUL byte).
std::string text_problem(std::string_view text, std::string_view what);
// Elements of a shape, or nullopt if its float32 bytes would exceed kMaxParamBytes.
std::optional<std::uint64_t> checked_elements(const std::vector<std::uint64_t>& shape);
std::string too_large_text(const std::vector<std::uint64_t>& shape);
std::string total_too_large_text(std::uint64_t before);
// "1st dimension", "2nd dimension", "3rd dimension", "dimension 4", ...
std::string dimension_name(std::size_t i);

}  // namespace shmps::server::spec_detail
