// The model spec's value rules and message wording (model_spec_rules.hpp), and name_distance,
// the edit distance behind every "did you mean ...?".
#include "model_spec_rules.hpp"

#include <algorithm>
#include <cstddef>
#include <limits>

#include "shmps/shape.hpp"
#include "shmps/shm/layout.hpp"

namespace shmps::server {

static_assert(kMaxSegmentNameLength + 1 == shm::kMaxNameBytes, "segment names must fit the header");
static_assert(kMaxParamNameBytes + 1 == shm::kMaxNameBytes, "param names must fit a ParamEntry");
static_assert(kMaxParamDims == shm::kMaxDims, "shapes must fit a ParamEntry");

namespace spec_detail {

std::string quote(std::string_view s) {
  constexpr std::size_t kMax = 80;
  std::string out = "\"";
  for (std::size_t i = 0; i < s.size() && i < kMax; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      constexpr char hex[] = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > kMax) out += "...";
  out += '"';
  return out;
}

std::string join(Keys words, std::string_view sep, bool quoted) {
  std::string out;
  for (std::string_view w : words) {
    if (!out.empty()) out += sep;
    out += quoted ? quote(w) : std::string(w);
  }
  return out;
}

bool contains(Keys words, std::string_view w) {
  return std::find(words.begin(), words.end(), w) != words.end();
}

std::string pow2_text(std::uint64_t v) {
  for (int k = 20; k < 64; ++k) {  // 2^20 and above read better as powers of two
    if (v == std::uint64_t{1} << k) return "2^" + std::to_string(k);
  }
  return std::to_string(v);
}

std::string param_name_problem(std::string_view name) {
  if (name.empty()) return "must not be empty";
  if (name.size() > kMaxParamNameBytes) {
    return "is " + std::to_string(name.size()) + " bytes long; the limit is " +
           std::to_string(kMaxParamNameBytes);
  }
  for (std::size_t i = 0; i < name.size(); ++i) {
    const auto c = static_cast<unsigned char>(name[i]);
    if (c <= 0x20 || c == 0x7f) {
      return quote(name) + " contains " +
             (c == ' ' ? std::string("a space") : "a control character") + " at position " +
             std::to_string(i + 1) + ", which is not allowed in a parameter name";
    }
  }
  return {};
}

// "" if `text` can be a pretrained file path or tensor name (not empty, no NUL byte).
std::string text_problem(std::string_view text, std::string_view what) {
  if (text.empty()) return "must not be empty; give " + std::string(what);
  if (const auto nul = text.find('\0'); nul != std::string_view::npos) {
    return quote(text) + " contains a NUL byte at position " + std::to_string(nul + 1);
  }
  return {};
}

// Elements of a shape, or nullopt if its float32 bytes would exceed kMaxParamBytes.
std::optional<std::uint64_t> checked_elements(const std::vector<std::uint64_t>& shape) {
  constexpr std::uint64_t kMaxElements = kMaxParamBytes / sizeof(float);
  std::uint64_t n = 1;
  for (std::uint64_t d : shape) {
    if (d == 0) return 0;
    if (n > kMaxElements / d) return std::nullopt;
    n *= d;
  }
  return n;
}

std::string too_large_text(const std::vector<std::uint64_t>& shape) {
  return "shape " + shape_text(shape) + " is too large: a parameter may hold at most " +
         pow2_text(kMaxParamBytes) + " bytes (" + pow2_text(kMaxParamBytes / sizeof(float)) +
         " float32 elements)";
}

std::string total_too_large_text(std::uint64_t before) {
  return "the parameters up to this one hold more than " + pow2_text(kMaxParamBytes) +
         " bytes in total (" + std::to_string(before) + " bytes before this one)";
}

static std::string_view ordinal(std::size_t i) {
  static constexpr std::string_view kOrd[] = {"1st", "2nd", "3rd"};
  return i < 3 ? kOrd[i] : std::string_view();
}

std::string dimension_name(std::size_t i) {
  const std::string_view ord = ordinal(i);
  return ord.empty() ? "dimension " + std::to_string(i + 1) : std::string(ord) + " dimension";
}

}  // namespace spec_detail

namespace {
char lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }
}  // namespace

std::size_t name_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      const std::size_t cost = lower(a[i - 1]) == lower(b[j - 1]) ? 0 : 1;
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + cost});
      diag = up;
    }
  }
  return row[b.size()];
}

}  // namespace shmps::server
