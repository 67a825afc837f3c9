// The machine's own limits, measured in the same run as the workloads (medians):
//   memcpy          one copy of the 64 MiB model, bytes counted once; and two at once (2 threads)
//   sgd             a plain p -= lr * g loop over the model's 16M floats, 1 and 2 threads
//   apply2          p -= lr * (g1 + g2), what a BSP step of two workers must do, 1 and 2 threads
//   pingpong        a round trip over a shared atomic between two processes
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include <shmps/error.hpp>

#include "workloads.hpp"

namespace shmps::bench {
namespace {

double time_memcpy(std::size_t bytes, int reps) {
  std::vector<char> a(bytes, 1), b(bytes, 2);
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_s();
    std::memcpy(b.data(), a.data(), bytes);
    t.push_back(now_s() - t0);
    a[static_cast<std::size_t>(i)] = b[bytes - 1 - static_cast<std::size_t>(i)];  // keep the copies observable
  }
  return median(t);
}

double time_memcpy_two_threads(std::size_t bytes, int reps) {
  std::vector<char> a1(bytes, 1), b1(bytes, 2), a2(bytes, 3), b2(bytes, 4);
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_s();
    std::thread other([&] { std::memcpy(b2.data(), a2.data(), bytes); });
    std::memcpy(b1.data(), a1.data(), bytes);
    other.join();
    t.push_back(now_s() - t0);
  }
  return median(t);
}

// p -= lr * g (one gradient) or p -= lr * (g1 + g2) (two), over [lo, hi).
void sgd_loop(float* __restrict p, const float* __restrict g1, const float* __restrict g2, std::size_t lo,
              std::size_t hi) {
  const float lr = 1e-6f;
  if (g2 == nullptr) {
    for (std::size_t k = lo; k < hi; ++k) p[k] -= lr * g1[k];
  } else {
    for (std::size_t k = lo; k < hi; ++k) p[k] -= lr * (g1[k] + g2[k]);
  }
}

}  // namespace

void plain_sgd_pass(float* p, const float* g, std::size_t floats, int threads) {
  if (threads == 1) {
    sgd_loop(p, g, nullptr, 0, floats);
    return;
  }
  std::thread other([&] { sgd_loop(p, g, nullptr, floats / 2, floats); });
  sgd_loop(p, g, nullptr, 0, floats / 2);
  other.join();
}

namespace {

// Median time of the loop over `floats`, split over `threads` (1 or 2) threads.
double time_sgd(std::size_t floats, int reps, int threads, bool two_gradients) {
  Floats p(floats, 1.0f), g1(floats, 0.5f), g2(two_gradients ? floats : 0, 0.25f);
  const float* g2p = two_gradients ? g2.data() : nullptr;
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_s();
    if (threads == 1) {
      sgd_loop(p.data(), g1.data(), g2p, 0, floats);
    } else {
      std::thread other([&] { sgd_loop(p.data(), g1.data(), g2p, floats / 2, floats); });
      sgd_loop(p.data(), g1.data(), g2p, 0, floats / 2);
      other.join();
    }
    t.push_back(now_s() - t0);
  }
  keep(p.data()[floats / 2]);
  return median(t);
}

// Two processes hand a counter back and forth through one shared atomic word; the median of
// the round trips.
double time_pingpong(int trips) {
  SharedBlock block(4096);
  auto* word = new (block.data()) std::atomic<std::uint64_t>(0);
  const pid_t child = spawn("pingpong", [&] {
    for (std::uint64_t i = 0; i < static_cast<std::uint64_t>(trips) + 100; ++i) {
      while (word->load(std::memory_order_acquire) != 2 * i + 1) {
      }
      word->store(2 * i + 2, std::memory_order_release);
    }
  });
  std::vector<double> t;
  for (std::uint64_t i = 0; i < static_cast<std::uint64_t>(trips) + 100; ++i) {
    const auto t0 = Clock::now();
    word->store(2 * i + 1, std::memory_order_release);
    while (word->load(std::memory_order_acquire) != 2 * i + 2) {
    }
    if (i >= 100) t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());  // 100 warm up
  }
  if (!wait_all({child})) throw Error("pingpong: the child failed");
  return median(t);
}

}  // namespace

Limits measure_limits(const Config& cfg, Report& r) {
  Limits l;
  const std::size_t floats = cfg.floats(), bytes = cfg.bytes();
  l.memcpy_s = time_memcpy(bytes, cfg.reps);
  l.apply2_s = time_sgd(floats, cfg.reps, 1, true);
  l.memcpy2_s = time_memcpy_two_threads(bytes, cfg.reps);
  l.apply2x2_s = time_sgd(floats, cfg.reps, 2, true);
  l.sgd_s = time_sgd(floats, cfg.reps, 1, false);
  l.sgd2_s = time_sgd(floats, cfg.reps, 2, false);
  l.pingpong_rtt_s = time_pingpong(cfg.quick ? 1000 : 20000);
  const double gf = static_cast<double>(floats) / 1e9;
  r.add("limit.memcpy", static_cast<double>(bytes) / l.memcpy_s / 1e9, "GB/s",
        "one copy of " + std::to_string(bytes >> 20) + " MiB");
  r.add("limit.memcpy.time", l.memcpy_s * 1e3, "ms", "");
  r.add("limit.apply2.time", l.apply2_s * 1e3, "ms", "p -= lr*(g1+g2), one thread");
  r.add("limit.memcpy.2threads.time", l.memcpy2_s * 1e3, "ms", "two copies at once");
  r.add("limit.apply2.2threads.time", l.apply2x2_s * 1e3, "ms", "apply2 split over two threads");
  r.add("limit.sgd", gf / l.sgd_s, "Gfloat/s", "plain p -= lr*g over " + std::to_string(floats) + " floats, one thread");
  r.add("limit.sgd.2threads", gf / l.sgd2_s, "Gfloat/s", "the same split over two threads");
  r.add("limit.pingpong.rtt", l.pingpong_rtt_s * 1e6, "us", "round trip over a shared atomic, two processes");
  return l;
}

}  // namespace shmps::bench
