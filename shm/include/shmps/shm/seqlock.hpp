// The per-slice seqlock: one writer (a server thread, which owns the slice during an apply
// round), any number of readers in any process, readers never write.
//
// The word holds 2 x (updates applied). The writer makes it odd, writes the values, and makes it
// even again with a release store; a reader loads it (acquire), copies, loads it again, and keeps
// the copy only if both loads are equal and even.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>

namespace shmps::shm {

// Writer side (server only).
inline std::uint64_t seqlock_write_begin(std::atomic<std::uint64_t>& word) noexcept {
  const std::uint64_t before = word.load(std::memory_order_relaxed);
  word.store(before + 1, std::memory_order_relaxed);
  // The odd word must be visible before any value store that follows.
  std::atomic_thread_fence(std::memory_order_release);
  return before;
}
// `updates` >= 1: the number of updates applied between begin and end.
inline void seqlock_write_end(std::atomic<std::uint64_t>& word, std::uint64_t before, std::uint64_t updates) noexcept {
  word.store(before + 2 * updates, std::memory_order_release);
}

enum class SeqlockRead { ok, retry };

// Reader side: one attempt. `copy` copies the protected data. On ok, `version` holds the word.
template <class Copy>
inline SeqlockRead seqlock_try_read(const std::atomic<std::uint64_t>& word, std::uint64_t& version, Copy&& copy) noexcept {
  const std::uint64_t first = word.load(std::memory_order_acquire);
  if (first & 1U) return SeqlockRead::retry;
  copy();
  // The copy's loads must complete before the second load of the word.
  std::atomic_thread_fence(std::memory_order_acquire);
  const std::uint64_t second = word.load(std::memory_order_relaxed);
  if (first != second) return SeqlockRead::retry;
  version = first;
  return SeqlockRead::ok;
}

// Copies floats that a writer in another thread or process may be changing. The seqlock
// discards any copy that raced; under ThreadSanitizer the copy uses relaxed atomic loads so
// that the (intended, discarded) race is not reported.
inline void racy_copy_floats(float* dst, const float* src, std::size_t n) noexcept {
#if defined(__SANITIZE_THREAD__)
  const auto* s = reinterpret_cast<const std::uint32_t*>(src);
  auto* d = reinterpret_cast<std::uint32_t*>(dst);
  for (std::size_t i = 0; i < n; ++i) d[i] = __atomic_load_n(s + i, __ATOMIC_RELAXED);
#else
  std::memcpy(dst, src, n * sizeof(float));
#endif
}
// The same for 2-byte elements (the values of a bf16 or fp16 parameter).
inline void racy_copy_halves(std::uint16_t* dst, const std::uint16_t* src, std::size_t n) noexcept {
#if defined(__SANITIZE_THREAD__)
  for (std::size_t i = 0; i < n; ++i) dst[i] = __atomic_load_n(src + i, __ATOMIC_RELAXED);
#else
  std::memcpy(dst, src, n * sizeof(std::uint16_t));
#endif
}

}  // namespace shmps::shm
