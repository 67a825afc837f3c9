// latency: a 64 KiB (one slice) push by one process until another process's pull sees the new
// version; p50 and p99 over many pushes, one at a time. Next to:
//   - the time of its memory traffic, measured here: copy 64 KiB in (the push), apply
//     p -= lr * g to 16K floats (the server), copy 64 KiB out (the pull);
//   - the two-process ping-pong round trip over a shared atomic (limits).
#include <atomic>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/worker.hpp>

#include "workloads.hpp"

namespace shmps::bench {
namespace {

constexpr std::size_t kSliceFloats = 16384;  // 64 KiB, the default slice
constexpr int kMaxPushes = 20000;

struct Shared {
  std::atomic<std::uint32_t> ready{0};
  std::atomic<std::uint64_t> acked{0};
  std::atomic<std::int64_t> t0_ns{0};
  double latency[kMaxPushes];
};

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

double time_slice_traffic(int reps) {
  Floats grad(kSliceFloats, 0.5f), ring(kSliceFloats), values(kSliceFloats, 1.0f), out(kSliceFloats);
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_s();
    std::memcpy(ring.data(), grad.data(), kSliceFloats * sizeof(float));
    float* __restrict p = values.data();
    const float* __restrict g = ring.data();
    for (std::size_t k = 0; k < kSliceFloats; ++k) p[k] -= 1e-6f * g[k];
    std::memcpy(out.data(), values.data(), kSliceFloats * sizeof(float));
    t.push_back(now_s() - t0);
    keep(out.data()[static_cast<std::size_t>(i) % kSliceFloats]);
  }
  return median(t);
}

}  // namespace

void run_latency(const Config& cfg, const Limits& lim, Report& r) {
  const int pushes = cfg.quick ? 200 : 5000;
  Job job(JobOptions{.params = cfg.params, .per_param = cfg.per_param});
  SharedBlock block(sizeof(Shared));
  auto* sh = new (block.data()) Shared;
  const pid_t reader = spawn("latency reader", [&] {
    Worker w(WorkerOptions{.segment = job.name(), .rank = 1});
    Floats out(kSliceFloats);
    std::uint64_t v = w.pull(Job::param(0), 0, {out.data(), kSliceFloats});
    sh->ready.store(1, std::memory_order_release);
    for (int i = 0; i < pushes; ++i) {
      std::uint64_t seen = v;
      const double give_up = now_s() + 10;
      while (seen == v) {
        seen = w.pull(Job::param(0), 0, {out.data(), kSliceFloats});
        if (now_s() > give_up) throw Error("no new version in 10 s");
        // Three processes share two cores here: a reader that never yields keeps the server
        // (or the pusher) off a core for a scheduler slice.
        if (seen == v) std::this_thread::yield();
      }
      sh->latency[i] = static_cast<double>(now_ns() - sh->t0_ns.load(std::memory_order_acquire)) / 1e9;
      v = seen;
      sh->acked.store(static_cast<std::uint64_t>(i) + 1, std::memory_order_release);
    }
  });
  {
    Worker w(WorkerOptions{.segment = job.name(), .rank = 0});
    Floats grad(kSliceFloats, 1.0f);
    auto wait_for = [&](auto done) {
      const double give_up = now_s() + 10;
      while (!done()) {
        if (now_s() > give_up) throw Error("latency: the reader does not answer");
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    };
    wait_for([&] { return sh->ready.load(std::memory_order_acquire) == 1; });
    for (int i = 0; i < pushes; ++i) {
      sh->t0_ns.store(now_ns(), std::memory_order_release);
      w.push(Job::param(0), 0, {grad.data(), kSliceFloats});
      wait_for([&] { return sh->acked.load(std::memory_order_acquire) == static_cast<std::uint64_t>(i) + 1; });
    }
    w.leave();
  }
  if (!wait_all({reader})) throw Error("latency: the reader failed");
  const std::vector<double> lat(sh->latency, sh->latency + pushes);
  const double p50 = percentile(lat, 0.5), p99 = percentile(lat, 0.99);
  const double traffic = time_slice_traffic(cfg.quick ? 200 : 5000);
  r.add("latency.p50", p50 * 1e6, "us", "64 KiB push until another process's pull sees it, " + std::to_string(pushes) + " pushes");
  r.add("latency.p99", p99 * 1e6, "us", "");
  r.add("latency.traffic", traffic * 1e6, "us", "its memory traffic: copy 64 KiB in, apply 16K floats, copy out");
  r.add("latency.ratio", p50 / traffic, "x", "p50 / memory traffic");
  r.add("latency.p50.pingpong", p50 / lim.pingpong_rtt_s, "x", "p50 / ping-pong round trip");
  r.add("latency.p99.ratio", p99 / p50, "x", "p99 / p50");
}

}  // namespace shmps::bench
