// Wake-ups between processes: a futex on a 32-bit word in the segment (not FUTEX_PRIVATE, so it
// works across processes that map the same memory). std::atomic::wait does not work across
// processes in libstdc++ 12 (ARCHITECTURE.md rule 3).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace shmps::shm {

// Sleeps while *word == expected, at most `timeout`. Returns at once if the word differs.
// Spurious returns are possible: callers re-check their condition.
void futex_wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected, std::chrono::nanoseconds timeout) noexcept;

// Wakes every process sleeping on `word`. Writes nothing: the word may be read-only for the caller.
void futex_wake_all(const std::atomic<std::uint32_t>& word) noexcept;

}  // namespace shmps::shm
