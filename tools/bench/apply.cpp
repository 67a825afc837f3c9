// apply: the server's optimizer (shmps_optim's apply_update, called here in-process as the
// server calls it: one 64 KiB slice at a time) applies SGD, and Adam, to 16M floats from queued
// gradients (one gradient buffer per parameter, not in cache), with 1 and 2 threads; Gfloat/s
// next to the plain p -= lr * g loop with as many threads.
//
// push-to-apply: 1 and 2 worker processes push whole-model gradients continuously (--rounds each)
// to a real server (ASP, SGD, all cores, default ring); applied Gfloat/s from the earliest
// worker's first push to the latest worker's wait_applied() of its last, next to the plain loop
// on one thread. push-to-apply.zero-copy: the same, each push a borrow_push whose buffer the
// worker fills with 1.0f (the values push copies) before it commits.
#include <algorithm>
#include <atomic>
#include <new>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/optimizer.hpp>
#include <shmps/worker.hpp>

#include "workloads.hpp"

namespace shmps::bench {
namespace {

constexpr std::size_t kSliceFloats = 16384;

// Median time of one optimizer step over every slice of the model, split over `threads`.
double time_apply(const Config& cfg, OptimizerKind kind, int threads) {
  OptimizerSettings s;
  s.kind = kind;
  s.lr = 1e-6f;
  const bool adam = kind == OptimizerKind::adam;
  std::vector<Floats> values, grads, m, v;
  for (std::size_t i = 0; i < cfg.params; ++i) {
    values.emplace_back(cfg.per_param, 1.0f);
    grads.emplace_back(cfg.per_param, 0.5f);
    m.emplace_back(adam ? cfg.per_param : 0);
    v.emplace_back(adam ? cfg.per_param : 0);
  }
  const std::size_t slices_per_param = (cfg.per_param + kSliceFloats - 1) / kSliceFloats;
  const std::size_t slices = cfg.params * slices_per_param;
  auto run = [&](std::size_t lo, std::size_t hi, std::uint64_t step) {
    for (std::size_t k = lo; k < hi; ++k) {
      const std::size_t p = k / slices_per_param, off = (k % slices_per_param) * kSliceFloats;
      const std::size_t n = std::min(kSliceFloats, cfg.per_param - off);
      std::span<float> st0, st1;
      if (adam) {
        st0 = {m[p].data() + off, n};
        st1 = {v[p].data() + off, n};
      }
      server::apply_update(s, {values[p].data() + off, n}, {grads[p].data() + off, n}, st0, st1, step, 1.0f);
    }
  };
  std::vector<double> t;
  for (int rep = 0; rep < cfg.reps; ++rep) {
    const auto step = static_cast<std::uint64_t>(rep) + 1;
    const double t0 = now_s();
    if (threads == 1) {
      run(0, slices, step);
    } else {
      std::thread other([&] { run(slices / 2, slices, step); });
      run(0, slices / 2, step);
      other.join();
    }
    t.push_back(now_s() - t0);
  }
  keep(values[0].data()[0]);
  return median(t);
}

struct PushShared {
  std::atomic<int> ready{0};
  std::atomic<int> go{0};
  double start[2] = {0, 0};
  double end[2] = {0, 0};
};

// Applied floats per second with `workers` pushing `rounds` whole models each, with push() or
// (zero_copy) with borrow_push(), fill, commit().
double push_to_apply(const Config& cfg, int workers, int rounds, bool zero_copy) {
  Job job(JobOptions{.params = cfg.params, .per_param = cfg.per_param});
  SharedBlock block(sizeof(PushShared));
  auto* sh = new (block.data()) PushShared;
  std::vector<pid_t> pids;
  for (int rank = 0; rank < workers; ++rank) {
    pids.push_back(spawn("push-to-apply worker " + std::to_string(rank), [&, rank] {
      Worker w(WorkerOptions{.segment = job.name(), .rank = rank});
      Floats grad(cfg.per_param, 1.0f);
      sh->ready.fetch_add(1);
      while (sh->go.load(std::memory_order_acquire) == 0) std::this_thread::yield();
      sh->start[rank] = now_s();
      std::uint64_t seq = 0;
      for (int round = 0; round < rounds; ++round)
        for (std::size_t i = 0; i < cfg.params; ++i) {
          if (!zero_copy) {
            seq = w.push(Job::param(i), {grad.data(), cfg.per_param});
            continue;
          }
          PushBuffer buf = w.borrow_push(Job::param(i));
          std::fill(buf.data(), buf.data() + buf.size(), 1.0f);
          seq = buf.commit();
        }
      w.wait_applied(seq);
      sh->end[rank] = now_s();
      w.leave();
    }));
  }
  const double give_up = now_s() + 30;
  while (sh->ready.load() < workers) {
    if (now_s() > give_up) break;  // a worker failed; wait_all reports it
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  sh->go.store(1, std::memory_order_release);
  if (!wait_all(pids)) throw Error("push-to-apply: a worker failed");
  double first = sh->start[0], last = sh->end[0];
  for (int rank = 1; rank < workers; ++rank) {
    first = std::min(first, sh->start[rank]);
    last = std::max(last, sh->end[rank]);
  }
  return static_cast<double>(workers) * rounds * static_cast<double>(cfg.floats()) / (last - first);
}

}  // namespace

void run_apply(const Config& cfg, const Limits& lim, Report& r) {
  const double gf = static_cast<double>(cfg.floats()) / 1e9;
  const double sgd1 = time_apply(cfg, OptimizerKind::sgd, 1);
  const double sgd2 = time_apply(cfg, OptimizerKind::sgd, 2);
  const double adam1 = time_apply(cfg, OptimizerKind::adam, 1);
  const double adam2 = time_apply(cfg, OptimizerKind::adam, 2);
  r.add("apply.sgd", gf / sgd1, "Gfloat/s", "the server's optimizer, SGD, slice by slice, one thread");
  r.add("apply.sgd.ratio", lim.sgd_s / sgd1, "x", "apply.sgd / plain loop, one thread (target >= 0.85)");
  r.add("apply.sgd.2threads", gf / sgd2, "Gfloat/s", "the same on two threads");
  r.add("apply.sgd.2threads.ratio", lim.sgd2_s / sgd2, "x", "/ plain loop, two threads (target >= 0.85)");
  r.add("apply.adam", gf / adam1, "Gfloat/s", "Adam, one thread");
  r.add("apply.adam.vs_sgd", adam1 / sgd1, "x", "Adam time / SGD time, one thread (target <= 2)");
  r.add("apply.adam.2threads", gf / adam2, "Gfloat/s", "Adam, two threads");
  r.add("apply.adam.2threads.vs_sgd", adam2 / sgd2, "x", "Adam time / SGD time, two threads (target <= 2)");
}

void run_push_to_apply(const Config& cfg, const Limits& lim, Report& r) {
  const int rounds = cfg.quick ? 2 : cfg.rounds;
  const double sgd_gfs = static_cast<double>(cfg.floats()) / lim.sgd_s / 1e9;
  for (const bool zero_copy : {false, true})
    for (int workers = 1; workers <= 2; ++workers) {
      const double gfs = push_to_apply(cfg, workers, rounds, zero_copy) / 1e9;
      const std::string name = std::string(zero_copy ? "push-to-apply.zero-copy." : "push-to-apply.") +
                               std::to_string(workers);
      r.add(name, gfs, "Gfloat/s",
            std::to_string(workers) + " worker(s) x " + std::to_string(rounds) +
                (zero_copy ? " whole-model borrow_push, fill 1.0f, commit" : " whole-model pushes") +
                ", applied end to end");
      r.add(name + ".ratio", gfs / sgd_gfs, "x", "/ plain loop, one thread (target >= 0.5)");
    }
}

}  // namespace shmps::bench
