// --checkpoint-every: "30s", "5m", "2h", "500ms" (a period) or "100clocks" into a
// CheckpointEvery (checkpoint.hpp), or what is wrong with the text.
#include <charconv>
#include <cstdint>

#include <shmps/server/checkpoint.hpp>

namespace shmps::server {

std::string parse_checkpoint_every(std::string_view text, CheckpointEvery& out) {
  out = {};
  std::uint64_t n = 0;
  auto r = std::from_chars(text.data(), text.data() + text.size(), n);
  const std::string_view unit(r.ptr, static_cast<std::size_t>(text.data() + text.size() - r.ptr));
  const std::string usage = "expected a period (500ms, 30s, 5m, 2h) or a number of clocks (100clocks), got \"" +
                            std::string(text) + "\"";
  if (r.ec != std::errc() || r.ptr == text.data()) return usage;
  if (n == 0) return "must be more than 0, got \"" + std::string(text) + "\"";
  if (unit == "clocks" || unit == "clock") {
    out.clocks = n;
    return {};
  }
  std::uint64_t ms_per = 0;
  if (unit == "ms") ms_per = 1;
  else if (unit == "s") ms_per = 1000;
  else if (unit == "m") ms_per = 60'000;
  else if (unit == "h") ms_per = 3'600'000;
  else return usage;
  if (n > UINT64_MAX / ms_per / 2) return "is too long: \"" + std::string(text) + "\"";
  out.period = std::chrono::milliseconds(static_cast<std::int64_t>(n * ms_per));
  return {};
}

}  // namespace shmps::server
