#include "format.hpp"

#include <cmath>
#include <cstdio>

namespace shmps::top {

std::string fixed(double v, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

std::string general(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string human_bytes(double b) {
  if (!std::isfinite(b)) return "?";
  if (b >= double(1ULL << 30)) return fixed(b / double(1ULL << 30), 1) + " GiB";
  if (b >= double(1ULL << 20)) return fixed(b / double(1ULL << 20), 1) + " MiB";
  if (b >= 1024) return fixed(b / 1024.0, 1) + " KiB";
  return fixed(b, 0) + " B";
}

std::string human_count(double n) {
  if (!std::isfinite(n)) return "?";
  if (n >= 1e9) return fixed(n / 1e9, 1) + "G";
  if (n >= 1e6) return fixed(n / 1e6, 1) + "M";
  if (n >= 1e4) return fixed(n / 1e3, 1) + "k";
  if (n >= 100 || n == std::floor(n)) return fixed(n, 0);
  return fixed(n, 1);
}

std::string human_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  if (s < 1e-3) return fixed(s * 1e6, 0) + "us";
  if (s < 1) return fixed(s * 1e3, 1) + "ms";
  if (s < 60) return fixed(s, 1) + "s";
  const auto whole = static_cast<std::uint64_t>(s);
  char buf[64];
  if (whole < 3600) std::snprintf(buf, sizeof buf, "%llum%02llus", (unsigned long long)(whole / 60), (unsigned long long)(whole % 60));
  else if (whole < 86400)
    std::snprintf(buf, sizeof buf, "%lluh%02llum", (unsigned long long)(whole / 3600), (unsigned long long)(whole % 3600 / 60));
  else std::snprintf(buf, sizeof buf, "%llud%02lluh", (unsigned long long)(whole / 86400), (unsigned long long)(whole % 86400 / 3600));
  return buf;
}

std::string human_ns(double ns) {
  if (!std::isfinite(ns)) return "?";
  if (ns < 1e3) return fixed(ns, 0) + "ns";
  if (ns < 1e6) return fixed(ns / 1e3, 1) + "us";
  if (ns < 1e9) return fixed(ns / 1e6, 1) + "ms";
  return fixed(ns / 1e9, 2) + "s";
}

std::string percent(double f) {
  if (!std::isfinite(f)) return "?";
  const double p = f * 100;
  return (p > 0 && p < 10 ? fixed(p, 1) : fixed(p, 0)) + "%";
}

std::string range_text(std::uint64_t lo, std::uint64_t hi) {
  return lo == hi ? std::to_string(lo) : std::to_string(lo) + ".." + std::to_string(hi);
}

std::string consistency_text(const Sample& s) {
  std::string text(to_string(s.consistency));
  if (s.consistency == Consistency::ssp) {
    text += ':';
    text += std::to_string(s.staleness);
  }
  if (s.consistency == Consistency::bsp) {
    text += " (";
    text += to_string(s.bsp_aggregate);
    text += ')';
  }
  return text;
}

std::string server_text(const Sample& s) {
  if (s.server_alive) return "alive, pid " + std::to_string(s.server_pid) + ", epoch " + std::to_string(s.epoch);
  if (s.presence != Presence::ready) return "none";
  return "GONE (last: pid " + std::to_string(s.server_pid) + ", epoch " + std::to_string(s.epoch) + ")";
}

std::string printable(const std::string& text) {
  std::string out = text;
  for (char& c : out)
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) c = '?';
  return out;
}

}  // namespace shmps::top
