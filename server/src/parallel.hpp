// The server's parallel loop: oneTBB in normal builds. Under ThreadSanitizer, plain std::threads
// instead: libtbb.so is not instrumented, so TSan would report its scheduler's internals as
// races and could not see its synchronisation, which would hide real races in the loop bodies.
// With std::threads TSan checks the bodies (the apply of disjoint slices) for real.
#pragma once

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <thread>
#include <vector>

namespace shmps::server {

// Calls body(i, thread) for every i in [0, n), on up to the arena's concurrency of threads;
// `thread` is the calling thread's index in [0, arena.max_concurrency()), unique among the
// threads running at once (the server gives each its own redo entry by it).
template <class Body>
void parallel_for_index(tbb::task_arena& arena, std::size_t n, Body&& body) {
  if (n == 0) return;
  if (n == 1) {
    body(std::size_t{0}, std::size_t{0});
    return;
  }
#if defined(__SANITIZE_THREAD__)
  std::atomic<std::size_t> next{0};
  auto worker = [&](std::size_t thread) {
    for (std::size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(i, thread);
  };
  const std::size_t extra = std::min<std::size_t>(n, static_cast<std::size_t>(arena.max_concurrency())) - 1;
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < extra; ++t) threads.emplace_back(worker, t + 1);
  worker(0);
  for (auto& t : threads) t.join();
#else
  arena.execute([&] {
    tbb::parallel_for(std::size_t{0}, n, [&](std::size_t i) {
      body(i, static_cast<std::size_t>(tbb::this_task_arena::current_thread_index()));
    });
  });
#endif
}

// The same over [0, n) in contiguous ranges: body(begin, end, thread) for each, so that a body
// can look ahead within its range (prefetching the data of the items it takes next).
template <class Body>
void parallel_for_ranges(tbb::task_arena& arena, std::size_t n, Body&& body) {
  if (n == 0) return;
#if defined(__SANITIZE_THREAD__)
  parallel_for_index(arena, n, [&](std::size_t i, std::size_t thread) { body(i, i + 1, thread); });
#else
  if (n < 4) {
    body(std::size_t{0}, n, std::size_t{0});
    return;
  }
  arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<std::size_t>(0, n), [&](const tbb::blocked_range<std::size_t>& r) {
      body(r.begin(), r.end(), static_cast<std::size_t>(tbb::this_task_arena::current_thread_index()));
    });
  });
#endif
}

}  // namespace shmps::server
