// The job's policies from their words: consistency ("asp", "bsp", "ssp:N"), bsp_aggregate
// ("sum", "mean") and on_worker_death ("proceed", "wait"). Shared by the spec parser, the
// server's flags and live switch, checkpoints and `shmps-ctl set`, so all accept the same words
// with the same messages.
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "shmps/server/model_spec.hpp"

namespace shmps::server {

std::string parse_consistency(std::string_view text, Consistency& mode, std::uint32_t& staleness) {
  const std::string expected =
      "expected \"asp\", \"bsp\" or \"ssp:N\" (N = staleness bound in clocks, an integer >= 0, e.g. \"ssp:3\"), got \"" +
      std::string(text) + "\"";
  if (text == "asp") {
    mode = Consistency::asp;
    staleness = 0;
    return {};
  }
  if (text == "bsp") {
    mode = Consistency::bsp;
    staleness = 0;
    return {};
  }
  if (text == "ssp") return "\"ssp\" needs its staleness bound: write \"ssp:N\", e.g. \"ssp:3\"";
  if (text.rfind("ssp:", 0) != 0) return expected;
  const std::string_view digits = text.substr(4);
  std::uint64_t bound = 0;
  if (digits.empty() || digits.size() > 10) return expected;
  for (char c : digits) {
    if (c < '0' || c > '9') return expected;
    bound = bound * 10 + static_cast<std::uint64_t>(c - '0');
  }
  if (bound > std::numeric_limits<std::uint32_t>::max()) return expected;
  mode = Consistency::ssp;
  staleness = static_cast<std::uint32_t>(bound);
  return {};
}

std::string parse_bsp_aggregate(std::string_view text, BspAggregate& out) {
  if (text == "sum") out = BspAggregate::sum;
  else if (text == "mean") out = BspAggregate::mean;
  else return "expected \"sum\" or \"mean\", got \"" + std::string(text) + "\"";
  return {};
}

std::string parse_on_worker_death(std::string_view text, OnWorkerDeath& out) {
  if (text == "proceed") out = OnWorkerDeath::proceed;
  else if (text == "wait") out = OnWorkerDeath::wait;
  else return "expected \"proceed\" or \"wait\", got \"" + std::string(text) + "\"";
  return {};
}

}  // namespace shmps::server

namespace shmps::server {

std::string parse_sync_every(std::string_view text, SyncEvery& out) {
  const std::string usage = "expected a period (\"100ms\", \"2s\", \"1m\") or a number of applied pushes (\"50updates\"), got \"" +
                            std::string(text) + "\"";
  std::size_t digits = 0;
  std::uint64_t n = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') {
    if (n > 1'000'000'000'000ULL) return "is too large: \"" + std::string(text) + "\"";
    n = n * 10 + static_cast<std::uint64_t>(text[digits++] - '0');
  }
  if (digits == 0) return usage;
  if (n == 0) return "must be more than 0, got \"" + std::string(text) + "\"";
  const std::string_view unit = text.substr(digits);
  SyncEvery every{std::chrono::milliseconds(0), 0};
  if (unit == "updates" || unit == "update") every.updates = n;
  else if (unit == "ms") every.period = std::chrono::milliseconds(n);
  else if (unit == "s") every.period = std::chrono::milliseconds(n * 1000);
  else if (unit == "m") every.period = std::chrono::milliseconds(n * 60'000);
  else return usage;
  out = every;
  return {};
}

std::string parse_straggler_timeout(std::string_view text, std::chrono::milliseconds& out) {
  if (text == "off" || text == "0") {
    out = std::chrono::milliseconds(0);
    return {};
  }
  const std::string usage = "expected a period (\"10s\", \"500ms\", \"1m\"), or \"0\" or \"off\" to never evict "
                            "stragglers, got \"" + std::string(text) + "\"";
  std::size_t digits = 0;
  std::uint64_t n = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') {
    if (n > 1'000'000'000'000ULL) return "is too large: \"" + std::string(text) + "\"";
    n = n * 10 + static_cast<std::uint64_t>(text[digits++] - '0');
  }
  if (digits == 0) return usage;
  const std::string_view unit = text.substr(digits);
  std::uint64_t ms = 0;
  if (unit == "ms") ms = n;
  else if (unit == "s") ms = n * 1000;
  else if (unit == "m") ms = n * 60'000;
  else return usage;
  // The segment keeps it in 32 bits of milliseconds.
  if (ms > 2'000'000'000ULL) return "is too large (at most 24 days): \"" + std::string(text) + "\"";
  out = std::chrono::milliseconds(ms);
  return {};
}

std::string straggler_timeout_text(std::chrono::milliseconds timeout) {
  const auto ms = timeout.count();
  if (ms == 0) return "off";
  if (ms % 1000 == 0) return std::to_string(ms / 1000) + "s";
  return std::to_string(ms) + "ms";
}

std::string sync_every_text(const SyncEvery& every) {
  if (every.updates != 0) return std::to_string(every.updates) + "updates";
  return std::to_string(every.period.count()) + "ms";
}

}  // namespace shmps::server
