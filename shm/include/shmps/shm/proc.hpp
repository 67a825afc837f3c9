// Small facts about processes and time, for display and logs.
#pragma once

#include <cstdint>
#include <sys/types.h>

namespace shmps::shm {

// CLOCK_MONOTONIC in nanoseconds (comparable between processes on one boot).
std::uint64_t monotonic_ns() noexcept;
// CLOCK_REALTIME in nanoseconds since the epoch.
std::uint64_t unix_ns() noexcept;
// Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), 0 if unknown. With the
// pid it names a process instance: a reused pid has another start time.
std::uint64_t process_start_time(pid_t pid) noexcept;

}  // namespace shmps::shm
