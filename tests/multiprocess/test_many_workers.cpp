// Sixteen worker processes on one segment (issue 14: many workers on a big box), ASP and BSP,
// each checked exactly: SGD with learning rate 1 and small-integer gradients keep every float sum
// exact (ARCHITECTURE.md invariant 1), so any push lost or applied twice shows element by element.
//
// On a 2-core machine the 16 workers and the server are heavily oversubscribed: that is the point
// (scheduling is hostile), and the sizes are kept small so that each test stays well under a
// minute; the watchdog fails a hang fast.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>

#include "../support/exact.hpp"
#include "../support/harness.hpp"

using namespace std::chrono_literals;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Watchdog;

namespace {

constexpr int kWorkers = 16;
constexpr int kReader = kWorkers;  // a slot of its own for the test's reading worker

Process& start_pusher(Job& job, int rank, std::uint64_t pushes) {
  return job.start({"shmps-test-pusher", "exact", "--pushes", std::to_string(pushes)},
                   {{"SHMPS_RANK", std::to_string(rank)}});
}

}  // namespace

TEST(ManyWorkers, SixteenAspWorkersGiveTheExactSum) {
  Watchdog watchdog(120s);
  Job job("many-asp", shmps::test::pattern_spec(kWorkers + 1));
  job.start_server();
  job.wait_ready();
  constexpr std::uint64_t kPushes = 40;
  std::vector<Process*> workers;
  for (int r = 0; r < kWorkers; ++r) workers.push_back(&start_pusher(job, r, kPushes));
  for (auto* w : workers) EXPECT_EQ(w->wait(90s), 0) << w->output();
  shmps::test::expect_exact_sum(job.name(), std::vector<std::uint64_t>(kWorkers, kPushes), kReader);
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  EXPECT_EQ(shmps::shm::load_counter(seg.header().records_applied), kWorkers * kPushes);
}

TEST(ManyWorkers, SixteenAspWorkersOfWhichFourAreKilledAndRestartedGiveTheExactSum) {
  Watchdog watchdog(120s);
  Job job("many-kill", shmps::test::pattern_spec(kWorkers + 1));
  job.start_server();
  job.wait_ready();
  constexpr std::uint64_t kPushes = 60;
  const std::vector<int> victims{0, 5, 10, 15};
  // The victims push without end, so that each is surely alive, somewhere in a push, when killed.
  std::vector<Process*> workers;
  for (int r = 0; r < kWorkers; ++r) {
    const bool victim = std::find(victims.begin(), victims.end(), r) != victims.end();
    workers.push_back(&start_pusher(job, r, victim ? 1000000 : kPushes));
  }
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  std::vector<std::uint64_t> pushes(kWorkers, kPushes);
  for (int v : victims) {
    const auto start = std::chrono::steady_clock::now();
    while (shmps::shm::load_acquire(seg.slot(v).published) < 5 && std::chrono::steady_clock::now() - start < 30s)
      std::this_thread::sleep_for(1ms);
    workers[v]->kill(SIGKILL);
    EXPECT_EQ(workers[v]->wait(10s), 128 + SIGKILL) << workers[v]->output();
  }
  // Once the server has seen each death and is done with every push the victim committed (its
  // slot's `applied` reaches `published`: an empty ring is not enough, since the collector frees
  // a record before its round's apply ends), the restart continues after it, 20 more (exactly once).
  for (int v : victims) {
    const auto start = std::chrono::steady_clock::now();
    while ((shmps::shm::load_acquire(seg.slot(v).dead_generation) != shmps::shm::load_acquire(seg.slot(v).generation) ||
            shmps::shm::load_acquire(seg.slot(v).applied) < shmps::shm::load_acquire(seg.slot(v).published)) &&
           std::chrono::steady_clock::now() - start < 30s)
      std::this_thread::sleep_for(1ms);
    const std::uint64_t applied = shmps::shm::load_acquire(seg.slot(v).applied);
    EXPECT_GE(applied, 5u);
    pushes[v] = applied + 20;
    workers[v] = &start_pusher(job, v, pushes[v]);
  }
  for (auto* w : workers) EXPECT_EQ(w->wait(90s), 0) << w->output();
  shmps::test::expect_exact_sum(job.name(), pushes, kReader);
}

TEST(ManyWorkers, SixteenBspWorkersSeeTheExactSumOfEveryEarlierStep) {
  Watchdog watchdog(120s);
  Job job("many-bsp", "consistency = \"bsp\"\n" + shmps::test::pattern_spec(kWorkers + 1));
  job.start_server();
  job.wait_ready();
  constexpr int kSteps = 12;
  std::vector<Process*> workers;
  // --check: before every step each worker compares its pull with minus the sum of the gradients
  // of every earlier step of all 16 ranks.
  for (int r = 0; r < kWorkers; ++r)
    workers.push_back(&job.start({"shmps-test-pusher", "steps", "--workers", std::to_string(kWorkers), "--steps",
                                  std::to_string(kSteps), "--check"},
                                 {{"SHMPS_RANK", std::to_string(r)}}));
  for (auto* w : workers) EXPECT_EQ(w->wait(90s), 0) << w->output();
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  EXPECT_EQ(shmps::shm::load_counter(seg.header().steps), static_cast<std::uint64_t>(kSteps));
  EXPECT_EQ(shmps::shm::load_acquire(seg.group(0).clock), static_cast<std::uint64_t>(kSteps));
}
