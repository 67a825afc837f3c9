#include "shmps/shm/futex.hpp"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>
#include <ctime>

namespace shmps::shm {

namespace {
long futex(const std::atomic<std::uint32_t>& word, int op, std::uint32_t value, const timespec* timeout) noexcept {
  // Shared (not FUTEX_PRIVATE_FLAG): the kernel keys the wait on the physical page, so processes
  // mapping the segment at different addresses meet on the same word.
  return syscall(SYS_futex, reinterpret_cast<const std::uint32_t*>(&word), op, value, timeout, nullptr, 0);
}
}  // namespace

void futex_wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected, std::chrono::nanoseconds timeout) noexcept {
  if (timeout.count() <= 0) return;
  timespec ts{};
  ts.tv_sec = static_cast<time_t>(timeout.count() / 1'000'000'000);
  ts.tv_nsec = static_cast<long>(timeout.count() % 1'000'000'000);
  futex(word, FUTEX_WAIT, expected, &ts);
}

void futex_wake_all(const std::atomic<std::uint32_t>& word) noexcept { futex(word, FUTEX_WAKE, INT_MAX, nullptr); }

}  // namespace shmps::shm
