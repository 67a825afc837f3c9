#include "shmps/shm/killpoint.hpp"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace shmps::shm {

namespace {
// "<point>[:<n>]" from environment variable `var`.
struct Target {
  std::string point;
  long hits = 1;
  bool armed = false;
  explicit Target(const char* var) {
    const char* spec = std::getenv(var);
    if (spec == nullptr || *spec == '\0') return;
    point = spec;
    if (const auto colon = point.find(':'); colon != std::string::npos) {
      hits = std::strtol(point.c_str() + colon + 1, nullptr, 10);
      point.resize(colon);
    }
    armed = true;
  }
};
const Target& kill_target() {
  static const Target t("SHMPS_KILL_AT");
  return t;
}
const Target& pause_target() {
  static const Target t("SHMPS_PAUSE_AT");  // <n>: the pause in milliseconds
  return t;
}
std::atomic<long> passes{0};
}  // namespace

void kill_point(const char* point) noexcept {
  const Target& t = kill_target();
  if (!t.armed || t.point != point) return;
  if (passes.fetch_add(1) + 1 >= t.hits) ::kill(::getpid(), SIGKILL);
}

void pause_point(const char* point) noexcept {
  const Target& t = pause_target();
  if (!t.armed || t.point != point) return;
  ::usleep(static_cast<useconds_t>(t.hits) * 1000U);
}

}  // namespace shmps::shm
