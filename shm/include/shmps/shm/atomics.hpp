// Every load and store of a shared word in shmps goes through one of these helpers, so the
// memory ordering of the push, pull and apply paths can be read with grep (Aeron's habit).
#pragma once

#include <atomic>

namespace shmps::shm {

// Acquire: what the writer did before its release store is visible after this load.
template <class T>
inline T load_acquire(const std::atomic<T>& word) noexcept {
  return word.load(std::memory_order_acquire);
}

// Release: everything written before becomes visible to an acquire load that sees this value.
template <class T>
inline void store_release(std::atomic<T>& word, T value) noexcept {
  word.store(value, std::memory_order_release);
}

// A word only its owner writes, read back by the owner itself, or a counter read for display
// only: no ordering with other memory is implied.
template <class T>
inline T load_own(const std::atomic<T>& word) noexcept {
  return word.load(std::memory_order_relaxed);
}
template <class T>
inline void store_own(std::atomic<T>& word, T value) noexcept {
  word.store(value, std::memory_order_relaxed);
}
template <class T>
inline void bump_counter(std::atomic<T>& word, T by = 1) noexcept {
  // Single writer: a plain load and store, no locked instruction needed.
  word.store(word.load(std::memory_order_relaxed) + by, std::memory_order_relaxed);
}
template <class T>
inline T load_counter(const std::atomic<T>& word) noexcept {
  return word.load(std::memory_order_relaxed);
}

// Store-then-load ordering between two processes (Dekker): a store before this fence and a load
// after it are not reordered. Used where one side publishes then checks "is the other asleep?".
inline void fence_store_load() noexcept { std::atomic_thread_fence(std::memory_order_seq_cst); }

}  // namespace shmps::shm
