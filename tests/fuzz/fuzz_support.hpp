// What the harnesses of tests/fuzz share: a private scratch directory, unique segment names and
// their removal, a file written from the fuzzer's bytes, a quiet log, and a check that aborts
// (so that libFuzzer reports it and saves the input) when an invariant does not hold.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <spdlog/spdlog.h>

#include <shmps/shm/names.hpp>

namespace shmps::fuzz {

// The harness's own scratch directory (removed at exit), e.g. /dev/shm/shmps-fuzz-<target>-<pid>:
// in memory where there is /dev/shm (each input is written to a file there), else in TMPDIR.
inline const std::filesystem::path& scratch_dir(const char* target) {
  static const std::filesystem::path dir = [&] {
    std::error_code ec;
    const std::filesystem::path base =
        std::filesystem::is_directory("/dev/shm", ec) ? std::filesystem::path("/dev/shm") : std::filesystem::temp_directory_path();
    std::filesystem::path d = base /
                              ("shmps-fuzz-" + std::string(target) + "-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    static const std::filesystem::path to_remove = d;
    std::atexit([] {
      std::error_code ignored;
      std::filesystem::remove_all(to_remove, ignored);
    });
    return d;
  }();
  return dir;
}

// A segment name of this process only; a new one for each call.
inline std::string unique_segment(const char* target) {
  static std::uint64_t n = 0;
  return "fz-" + std::string(target) + "-" + std::to_string(::getpid()) + "-" + std::to_string(++n);
}

inline void remove_segment(const std::string& name) {
  std::error_code ec;
  std::filesystem::remove(shm::segment_path(name), ec);
  std::filesystem::remove(shm::server_lock_path(name), ec);
  std::filesystem::remove(shm::slots_lock_path(name), ec);
}

inline void write_file(const std::filesystem::path& path, const std::uint8_t* data, std::size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
}

// The server logs every refusal at error level: millions of lines would slow the fuzzer down.
// SHMPS_FUZZ_LOG=1 keeps them (to see what an input does).
inline void quiet_log() {
  if (std::getenv("SHMPS_FUZZ_LOG") == nullptr) spdlog::set_level(spdlog::level::off);
}

#define SHMPS_FUZZ_CHECK(cond)                                                               \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);     \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)

}  // namespace shmps::fuzz
