// How the server waits when there is nothing to do: it sleeps on its own futex word in the
// segment (server_wake), which a worker wakes after a commit when it sees server_sleeping, and
// shmps-ctl after submitting a command. Never on anything a worker or a tool can hold.
#pragma once

#include <chrono>
#include <cstdint>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/futex.hpp>
#include <shmps/shm/layout.hpp>

namespace shmps::server {

// Sleeps until woken or `bound` has passed, unless `work_waiting()` (asked after announcing the
// sleep) finds work already.
template <class WorkWaiting>
void sleep_until_woken(shm::SegmentHeader& h, std::chrono::microseconds bound, WorkWaiting&& work_waiting) {
  const std::uint32_t word = shm::load_acquire(h.server_wake);
  shm::store_release(h.server_sleeping, 1U);
  shm::fence_store_load();  // pairs with the worker's fence between its commit and its look at server_sleeping
  if (!work_waiting()) {
    // A worker's FUTEX_WAKE that lands between the check above and the wait is lost (the worker
    // writes nothing here, ARCHITECTURE.md); the bound keeps that rare case to a short delay.
    shm::futex_wait(h.server_wake, word, bound);
  }
  shm::store_release(h.server_sleeping, 0U);
}

}  // namespace shmps::server
