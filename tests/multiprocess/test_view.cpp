// Zero-copy reads (Worker::view, issue 14) against a real server.
//
// In BSP a view must be a consistent snapshot: equal, element by element, to a pull taken in the
// same step, and unchanged until the worker's clock(), also while other workers and the server
// are SIGKILLed and restarted. Small-integer gradients with SGD at learning rate 1 keep every sum
// exact (ARCHITECTURE.md invariant 1), so the final values are checked exactly too. And view()
// must refuse what pull() refuses, with the same kind of message, changing nothing.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/exact.hpp"
#include "../support/expect.hpp"
#include "../support/harness.hpp"
#include "../support/pattern.hpp"

using namespace std::chrono_literals;
using shmps::test::error_of;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Watchdog;

namespace {

// Waits (bounded) until worker `rank` has ended `steps` steps of its own: it has published
// 2 * steps + 1 pushes (two a step), so it is in the step after, in a view, a pull, a push or the
// pause before its clock(). (Its slot's clock alone would not do: a worker that attaches late
// enters at the job's clock, having ended no step yet.)
void wait_for_steps(const shmps::shm::Segment& seg, int rank, std::uint64_t steps) {
  const auto start = std::chrono::steady_clock::now();
  while (shmps::shm::load_acquire(seg.slot(static_cast<unsigned>(rank)).published) < 2 * steps + 1 &&
         std::chrono::steady_clock::now() - start < 60s)
    std::this_thread::sleep_for(1ms);
}

}  // namespace

TEST(View, RefusesWhatPullRefusesAndCountsAsAPull) {
  Watchdog watchdog(60s);
  Job job("view-api", shmps::test::pattern_spec(4));
  job.start_server();
  job.wait_ready();
  shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 0});
  const std::size_t n = w.param("w").size;

  EXPECT_HAS(error_of([&] { w.view("nope"); }), "unknown parameter 'nope'");
  EXPECT_HAS(error_of([&] { w.view("nope"); }), "it has w, b");
  EXPECT_HAS(error_of([&] { w.view("w", 0, 0); }), "view of 'w': the range is empty");
  EXPECT_HAS(error_of([&] { w.view("w", n - 10, 11); }), "view of 'w': elements [" + std::to_string(n - 10) + ", " +
                                                             std::to_string(n + 1) + ") are outside the parameter");
  EXPECT_HAS(error_of([&] { w.view("w", n + 1, 1); }), "are outside the parameter");
  EXPECT_HAS(error_of([&] { w.view("b", SIZE_MAX, 2); }), "are outside the parameter");

  // The values themselves, where the server keeps them, and what a pull copies.
  std::vector<float> grad(n);
  for (std::size_t i = 0; i < n; ++i) grad[i] = shmps::test::pattern(0, 0, i);
  w.wait_applied(w.push("w", grad));
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  const auto& slot = seg.slot(0);
  const std::uint64_t pulls = shmps::shm::load_acquire(slot.pulls), bytes = shmps::shm::load_acquire(slot.pull_bytes);
  const std::span<const float> all = w.view("w");
  const std::span<const float> part = w.view("w", 1000, 500);
  EXPECT_EQ(all.size(), n);
  EXPECT_EQ(part.data(), all.data() + 1000);
  EXPECT_EQ(part.size(), 500u);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(all.data()) % 64, 0u);
  std::vector<float> copy(n);
  w.pull("w", copy);
  for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(all[i], -grad[i]) << i;
  EXPECT_EQ(std::vector<float>(all.begin(), all.end()), copy);
  // Two views and the pull count as three pulls; only the pull moved bytes.
  EXPECT_EQ(shmps::shm::load_acquire(slot.pulls), pulls + 3);
  EXPECT_EQ(shmps::shm::load_acquire(slot.pull_bytes), bytes + n * sizeof(float));

  // After leave() view refuses, as pull does; the span taken before stays readable.
  w.leave();
  EXPECT_HAS(error_of([&] { w.view("w"); }), "this worker has left the job");
  EXPECT_EQ(all[0], -grad[0]);
}

TEST(View, BspViewsEqualPullsAndHoldStillThroughTheStepWhileWorkersAndTheServerAreKilled) {
  Watchdog watchdog(240s);
  constexpr int kWorkers = 4, kReader = kWorkers;
  constexpr std::uint64_t kSteps = 40;
  Job job("view-bsp", "consistency = \"bsp\"\n" + shmps::test::pattern_spec(kWorkers + 1));
  job.start_server();
  job.wait_ready();
  auto start_worker = [&](int rank) -> Process& {
    // --slow-ms: the worker holds its views a while after pushing, so that the other workers'
    // steps end (and the server tries to move on) while it still checks them.
    return job.start({"shmps-test-pusher", "views", "--steps", std::to_string(kSteps), "--slow-ms", "3"},
                     {{"SHMPS_RANK", std::to_string(rank)}});
  };
  std::vector<Process*> workers;
  for (int r = 0; r < kWorkers; ++r) workers.push_back(&start_worker(r));
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);

  // Mid-run: a worker killed in a step (its open step is discarded; its restart redoes it from
  // the resume state), the server killed and restarted (recovery replays its redo log), then two
  // more workers. Every surviving view check must still hold.
  auto kill_and_restart_worker = [&](int rank) {
    workers[rank]->kill(SIGKILL);
    EXPECT_EQ(workers[rank]->wait(10s), 128 + SIGKILL) << workers[rank]->output();
    workers[rank] = &start_worker(rank);
  };
  wait_for_steps(seg, 1, 8);
  kill_and_restart_worker(1);
  wait_for_steps(seg, 0, 16);
  job.server().kill(SIGKILL);
  EXPECT_EQ(job.server().wait(10s), 128 + SIGKILL);
  job.start_server();
  job.wait_ready();
  wait_for_steps(seg, 2, 24);
  kill_and_restart_worker(2);
  wait_for_steps(seg, 3, 30);
  kill_and_restart_worker(3);

  for (auto* w : workers) {
    EXPECT_EQ(w->wait(120s), 0) << w->output();
    EXPECT_HAS(w->output(), "view_mismatches 0");
  }
  // The kills happened mid-run: each victim's second process resumed after steps its first one
  // had ended, and a second server served the segment.
  for (int r = 1; r < kWorkers; ++r) {
    EXPECT_EQ(shmps::shm::load_acquire(seg.slot(static_cast<unsigned>(r)).generation), 2u) << r;
    EXPECT_FALSE(shmps::test::has(workers[r]->output(), "steps 0.."))
        << "rank " << r << " restarted from step 0: " << workers[r]->output();
  }
  EXPECT_EQ(shmps::shm::load_acquire(seg.header().server_epoch), 2u);
  // Every step of every rank counted exactly once (the killed ones' open steps discarded and
  // redone): the values are minus the sum of all their gradients.
  std::vector<double> want_w(shmps::test::kPatternW, 0.0), want_b(shmps::test::kPatternB, 0.0);
  for (std::uint64_t r = 0; r < kWorkers; ++r)
    for (std::uint64_t k = 0; k < kSteps; ++k) {
      for (std::size_t i = 0; i < want_w.size(); ++i) want_w[i] -= shmps::test::pattern(r, k, i);
      for (std::size_t i = 0; i < want_b.size(); ++i) want_b[i] -= shmps::test::pattern(r, k, i);
    }
  shmps::Worker reader(shmps::WorkerOptions{.segment = job.name(), .rank = kReader});
  const std::span<const float> w = reader.view("w"), b = reader.view("b");
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < want_w.size(); ++i) wrong += static_cast<double>(w[i]) != want_w[i];
  for (std::size_t i = 0; i < want_b.size(); ++i) wrong += static_cast<double>(b[i]) != want_b[i];
  EXPECT_EQ(wrong, 0u) << "w[0] = " << w[0] << ", expected " << want_w[0];
  EXPECT_NE(want_w[0], 0.0);  // the check can fail
  EXPECT_GE(shmps::shm::load_counter(seg.header().steps), kSteps);
}

TEST(View, AfterALiveSwitchFromAspToBspAViewHoldsStillUntilClock) {
  Watchdog watchdog(60s);
  Job job("view-switch", shmps::test::pattern_spec(4));
  job.start_server();
  job.wait_ready();
  shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 0});
  const std::vector<float> ones(shmps::test::kPatternB, 1.0f);
  w.wait_applied(w.push("b", ones));  // ASP: applied as it comes, under any view
  const std::span<const float> before = w.view("b");
  EXPECT_EQ(before[0], -1.0f);

  Process ctl({"shmps-ctl", "set", job.name(), "consistency=bsp"});
  ASSERT_EQ(ctl.wait(20s), 0) << ctl.output();
  ASSERT_EQ(w.consistency(), "bsp");
  // Taken again in BSP (the same memory): now a snapshot of this worker's step, which the server
  // cannot take before this worker's clock(), however many rounds it runs meanwhile.
  const std::span<const float> view = w.view("b");
  EXPECT_EQ(view.data(), before.data());
  const std::uint64_t seq = w.push("b", ones);
  std::this_thread::sleep_for(300ms);
  for (std::size_t i = 0; i < view.size(); ++i) EXPECT_EQ(view[i], -1.0f) << i;
  EXPECT_LT(w.applied(), seq);
  w.clock();
  w.wait_applied(seq);
  const std::span<const float> next = w.view("b");  // the next step's values
  for (std::size_t i = 0; i < next.size(); ++i) EXPECT_EQ(next[i], -2.0f) << i;
}
