// shmps-test-pusher group-steps: a BSP worker of a job with worker groups (test_worker_groups).
//
//   shmps-test-pusher group-steps --workers P --steps B [--check] [--slow-ms X] [--hang-at S]
//                                 [--absent R:S]
//
// The job's parameters: "mark" (one element per worker slot), "w" (shared by every group), and
// "own<g>" for each group g (pushed by group g only). Waits until its group's mates among ranks
// 0 to P-1 are admitted, then does B steps: pull "mark", "own<g>" and "w" (each pull waits for the group's step, BSP), push
// -1 to element <rank> of "mark", pushes ugly(rank, step) to the whole of "own<g>" and
// pattern(rank, step) to the whole of "w", clock(). --check (SGD, lr 1, bsp_aggregate "sum"):
// before step k, mark[m] must be exactly the number of steps before k that member m of this
// worker's group took part in: a step that completed without one of the group's pushes, or with
// a push of another step, shows. --absent R:S: rank R takes part in steps before S only (it is
// killed in step S). --hang-at S: in step S, push "mark" and "own<g>", then sleep forever (a
// worker stuck in the middle of a step, alive). Prints "rank R group G steps B wrong_steps N".
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "group_steps.hpp"
#include "pattern.hpp"

namespace shmps::test {

// Fractional gradients: their sums round, so a different summation order or a step mixed with
// another shows in the last bits.
float ugly(std::uint64_t rank, std::uint64_t step, std::uint64_t element) {
  return static_cast<float>((rank * 7919 + step * 104729 + element * 31) % 1000) / 997.0f - 0.5f;
}

int run_group_steps(Worker& w, const GroupStepsOptions& o) {
  auto seg = shm::Segment::open(w.segment(), shm::Access::read_only);
  const auto rank = static_cast<std::uint64_t>(w.rank());
  const std::uint32_t group = seg.group_of(rank);
  const std::string own = "own" + std::to_string(group);
  const auto attached = static_cast<std::uint32_t>(shm::SlotState::attached);
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (bool all = false; !all;) {
    all = true;
    // Attached and admitted by the server: only then does a worker count for its group's bounds
    // (shm::counts_for_group), so nobody runs ahead of a mate the server has not admitted yet.
    // Its own group's mates only: those cannot end their steps without this worker, while another
    // group's workers may have finished and left before this one first looks (it then waited for
    // them in vain, a flaky "did not attach" when the machine was busy).
    const std::uint64_t end = std::min<std::uint64_t>(seg.group_end_rank(group), o.workers);
    for (std::uint64_t r = seg.group_first_rank(group); r < end; ++r)
      all = all && shm::load_acquire(seg.slot(r).state) == attached &&
            shm::load_acquire(seg.slot(r).admitted_generation) == shm::load_acquire(seg.slot(r).generation);
    if (std::chrono::steady_clock::now() > until) throw Error("the other workers did not attach");
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  auto takes_part = [&](std::uint64_t r, std::uint64_t k) {
    return !(static_cast<std::int64_t>(r) == o.absent_rank && static_cast<std::int64_t>(k) >= o.absent_step);
  };
  std::vector<float> mark(w.param("mark").size), pw(w.param("w").size), gw(pw.size()), po(w.param(own).size),
      go(po.size());
  const std::vector<float> minus_one{-1.0f};
  std::uint64_t last = 0, wrong_steps = 0;
  for (std::uint64_t k = 0; k < o.steps; ++k) {
    w.pull("mark", mark);
    w.pull(own, po);
    w.pull("w", pw);
    if (o.check) {
      for (std::uint64_t m = seg.group_first_rank(group); m < seg.group_end_rank(group) && m < o.workers; ++m) {
        std::uint64_t want = 0;
        for (std::uint64_t j = 0; j < k; ++j) want += takes_part(m, j) ? 1 : 0;
        if (mark[m] != static_cast<float>(want)) {
          ++wrong_steps;
          std::cout << "step " << k << ": mark[" << m << "] is " << mark[m] << ", expected " << want << "\n";
        }
      }
    }
    for (std::size_t i = 0; i < go.size(); ++i) go[i] = ugly(rank, k, i);
    for (std::size_t i = 0; i < gw.size(); ++i) gw[i] = pattern(rank, k, i);
    last = w.push("mark", rank, minus_one);
    last = w.push(own, go);
    if (static_cast<std::int64_t>(k) == o.hang_at) {
      std::cout << "hanging in step " << k << std::endl;
      std::this_thread::sleep_for(std::chrono::hours(1));
    }
    last = w.push("w", gw);
    w.clock();
    if (o.slow_ms) std::this_thread::sleep_for(std::chrono::milliseconds(o.slow_ms));
  }
  w.wait_applied(last);
  std::cout << "rank " << rank << " group " << group << " steps " << o.steps << " clock " << w.current_clock()
            << " wrong_steps " << wrong_steps << std::endl;
  return wrong_steps == 0 ? 0 : 1;
}

}  // namespace shmps::test
