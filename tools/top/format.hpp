// Short human forms of numbers for the text and terminal views ("12.3 MiB", "4.1k", "1m05s").
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <shmps/shape.hpp>

#include "metrics.hpp"

namespace shmps::top {

std::string human_bytes(double bytes);                 // "512 B", "12.3 KiB", "1.0 GiB"
std::string human_count(double n);                     // "950", "12.3k", "4.1M", "2.0G"
std::string human_duration(double seconds);            // "340us", "12.3ms", "4.2s", "3m05s", "2h03m", "3d04h"
std::string human_ns(double ns);                       // a latency: "850ns", "12.3us", "4.1ms", "1.2s"
std::string percent(double fraction);                  // "12%", "0.4%"
std::string fixed(double v, int decimals);
std::string general(double v);  // printf's %g: "0.05", "1e-08"
// "-" for an absent value, else `f(value)`.
template <class F>
std::string opt(const std::optional<double>& v, F f) {
  return v ? f(*v) : std::string("-");
}
using shmps::shape_text;  // "[3, 40000]" (shmps/shape.hpp)
std::string range_text(std::uint64_t lo, std::uint64_t hi);       // "5" or "3..5"
std::string consistency_text(const Sample& s);                     // "asp", "ssp:3", "bsp (sum)"
std::string server_text(const Sample& s);                          // "alive pid 12 epoch 2" / "gone (...)"
// Only printable ASCII (a name from a spec could hold anything; a terminal must not get it raw).
std::string printable(const std::string& text);

}  // namespace shmps::top
