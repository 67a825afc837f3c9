// Crash safety with kill -9: a server or a worker stopped at a named point (SHMPS_KILL_AT, see
// shm/include/shmps/shm/killpoint.hpp), then restarted; and a chaos run that SIGKILLs random
// workers and, less often, the server. Every check is the exact sum: SGD with learning rate 1 and
// small-integer gradients, so the final values must equal minus the sum of every committed push.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <algorithm>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <random>
#include <thread>
#include <vector>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/harness.hpp"
#include "../support/exact.hpp"

using namespace std::chrono_literals;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Watchdog;
namespace shm = shmps::shm;
using shmps::test::expect_exact_sum;
using shmps::test::pattern_spec;

namespace {

Process& start_pusher(Job& job, int rank, std::uint64_t pushes, std::vector<std::pair<std::string, std::string>> env = {}) {
  env.emplace_back("SHMPS_RANK", std::to_string(rank));
  return job.start({"shmps-test-pusher", "exact", "--pushes", std::to_string(pushes)}, env);
}

// Kills the server at `point`, checks the crash left what it should, restarts the server, lets
// the pushers finish, and checks the exact sum.
void kill_server_at(const std::string& point, const std::function<void(const shm::Segment&)>& check_crash_state,
                    const std::string& expect_in_restart_log) {
  Watchdog watchdog(90s);
  Job job("kill-server", pattern_spec());
  auto& first = job.start_server({}, {{"SHMPS_KILL_AT", point}});
  job.wait_ready();
  std::vector<Process*> pushers;
  for (int r = 0; r < 3; ++r) pushers.push_back(&start_pusher(job, r, 300));
  EXPECT_EQ(first.wait(30s), 128 + SIGKILL) << "the kill point was not reached:\n" << first.output();
  {
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    check_crash_state(seg);
  }
  auto& second = job.start_server();
  job.wait_ready();
  for (auto* p : pushers) EXPECT_EQ(p->wait(60s), 0) << p->output();
  expect_exact_sum(job.name(), {300, 300, 300});
  {
    // What the crash left is gone, in the segment: no slice with its version word odd (torn),
    // no redo entry still marked valid.
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    for (std::uint64_t i = 0; i < seg.header().slice_count; ++i)
      EXPECT_EQ(shm::load_acquire(seg.slice(i).version) & 1U, 0u) << "slice " << i;
    for (std::uint32_t e = 0; e < seg.header().redo_count; ++e)
      EXPECT_EQ(shm::load_acquire(seg.redo(e).valid), 0u) << "redo entry " << e;
  }
  // Which repair the restarted server made (e.g. a redo) is said only in its log: the segment
  // keeps no count of it, so that part is still read from there.
  if (!expect_in_restart_log.empty()) {
    EXPECT_NE(second.output().find(expect_in_restart_log), std::string::npos) << second.output();
  }
}

}  // namespace

TEST(ServerCrash, KilledInTheMiddleOfCopyingASliceInTheNextServerRedoesItOnce) {
  kill_server_at(
      "apply.mid_copy:40",
      [](const shm::Segment& seg) {
        // The crash state: slices with their version word odd (one per apply thread that was
        // copying at that moment), each with a valid redo entry naming it.
        auto& s = const_cast<shm::Segment&>(seg);
        std::uint64_t odd = 0, covered = 0;
        for (std::uint64_t i = 0; i < seg.header().slice_count; ++i) {
          if ((shm::load_acquire(seg.slice(i).version) & 1U) == 0) continue;
          ++odd;
          for (std::uint32_t e = 0; e < seg.header().redo_count; ++e)
            if (shm::load_acquire(s.redo(e).valid) != 0 && s.redo(e).slice == i) {
              ++covered;
              break;
            }
        }
        EXPECT_GE(odd, 1u);
        EXPECT_EQ(covered, odd);
      },
      "event=redo");
}

TEST(ServerCrash, KilledBetweenApplyAndCursorAdvanceAppliesNothingTwice) {
  kill_server_at(
      "apply.before_release:25",
      [](const shm::Segment& seg) {
        // The crash state: slices applied, yet the records are still in the rings.
        std::uint64_t pending = 0;
        for (std::uint32_t r = 0; r < 3; ++r)
          pending += shm::load_acquire(seg.ring(r).tail) - shm::load_acquire(seg.ring(r).head);
        EXPECT_GT(pending, 0u);
      },
      "");
}

TEST(WorkerCrash, KilledAfterWritingARecordButBeforeItsCommitLeavesNothingAndResumes) {
  Watchdog watchdog(90s);
  Job job("kill-worker", pattern_spec());
  job.start_server();
  job.wait_ready();
  auto& victim = start_pusher(job, 0, 200, {{"SHMPS_KILL_AT", "push.before_commit:50"}});
  auto& other = start_pusher(job, 1, 200);
  EXPECT_EQ(victim.wait(30s), 128 + SIGKILL) << victim.output();
  {
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    // Push 50 was written in full but never committed: the slot has published 49.
    EXPECT_EQ(shm::load_acquire(seg.slot(0).published), 49u);
  }
  auto& restarted = start_pusher(job, 0, 200);  // continues from push 50
  EXPECT_EQ(restarted.wait(60s), 0) << restarted.output();
  EXPECT_EQ(other.wait(60s), 0) << other.output();
  expect_exact_sum(job.name(), {200, 200});
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  EXPECT_EQ(shm::load_acquire(seg.slot(0).generation), 2u);
}

// The chaos run: workers push toward a target while a driver SIGKILLs random workers and, less
// often, the server, and restarts them. SHMPS_CHAOS_SECONDS sets how long the killing goes on
// (default 20 s: the suite's version; the long version runs for minutes, see RELIABILITY.md).
TEST(Chaos, RandomKillsOfWorkersAndServerLoseNothingAndDoubleNothing) {
  const char* env = std::getenv("SHMPS_CHAOS_SECONDS");
  const int chaos_seconds = env ? std::atoi(env) : 20;
#if defined(SHMPS_SANITIZER_BUILD)
  constexpr std::uint64_t kTarget = 3000;  // sanitized processes are several times slower
#else
  constexpr std::uint64_t kTarget = 25000;
#endif
  const std::uint64_t target = env ? 1'000'000'000ULL : kTarget;  // long runs: kill until the time is up
  Watchdog watchdog(std::chrono::seconds(chaos_seconds + 120));
  constexpr int kWorkers = 4;
  Job job("chaos", pattern_spec());
  job.start_server();
  job.wait_ready();
  const unsigned seed = std::random_device{}();
  std::cout << "chaos seed " << seed << ", " << chaos_seconds << " s\n";
  std::mt19937 rng(seed);
  std::vector<Process*> pushers(kWorkers);
  std::vector<bool> done(kWorkers, false);
  std::uint64_t worker_kills = 0, server_kills = 0;
  for (int r = 0; r < kWorkers; ++r) pushers[r] = &start_pusher(job, r, target);

  const auto start = std::chrono::steady_clock::now();
  auto next_server_kill = start + std::chrono::milliseconds(1000 + rng() % 2000);
  while (std::chrono::steady_clock::now() - start < std::chrono::seconds(chaos_seconds)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20 + rng() % 150));
    const int r = static_cast<int>(rng() % kWorkers);
    if (!done[r] && pushers[r]->running()) {
      pushers[r]->kill(SIGKILL);
      pushers[r]->wait(10s);
      ++worker_kills;
    }
    if (!pushers[r]->running() && !done[r]) {
      if (pushers[r]->wait(1s) == 0)
        done[r] = true;
      else
        pushers[r] = &start_pusher(job, r, target);
    }
    if (std::chrono::steady_clock::now() > next_server_kill) {
      job.server().kill(SIGKILL);
      job.server().wait(10s);
      ++server_kills;
      job.start_server();
      job.wait_ready();
      next_server_kill = std::chrono::steady_clock::now() + std::chrono::milliseconds(1000 + rng() % 2000);
    }
    if (std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
  }
  // No more killing: in the long version the workers stop at what they have; here they finish.
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  std::vector<std::uint64_t> final_target(kWorkers, target);
  for (int r = 0; r < kWorkers; ++r) {
    if (done[r]) continue;
    if (target > 100000) {  // the long version: stop it, and finish up to what its slot committed
      pushers[r]->kill(SIGKILL);
      pushers[r]->wait(10s);
      final_target[r] = shm::load_acquire(seg.slot(r).published);
      pushers[r] = &start_pusher(job, r, final_target[r]);
    } else if (!pushers[r]->running() && pushers[r]->wait(1s) != 0) {
      pushers[r] = &start_pusher(job, r, final_target[r]);  // killed last and not restarted yet
    }
    // A pusher still running simply goes on to its target.
  }
  for (int r = 0; r < kWorkers; ++r) EXPECT_EQ(pushers[r]->wait(120s), 0) << pushers[r]->output();
  for (int r = 0; r < kWorkers; ++r) EXPECT_EQ(shm::load_acquire(seg.slot(r).published), final_target[r]) << r;
  expect_exact_sum(job.name(), final_target);
  std::cout << "chaos: " << worker_kills << " worker kills, " << server_kills << " server kills, "
            << shm::load_counter(seg.header().records_skipped) << " slice updates skipped as already applied, pushes";
  for (auto t : final_target) std::cout << " " << t;
  std::cout << ", exact\n";
  EXPECT_GT(worker_kills, 0u);
  EXPECT_GT(server_kills, 0u);
}

TEST(ServerCrash, ASegmentLeftHalfCreatedIsDetectedAndRecreated) {
  Watchdog watchdog(60s);
  Job job("half", pattern_spec());
  {
    // What a server killed during creation leaves: the file, still all zeros ("creating").
    shm::Segment::create(job.name(), 1 << 20);
  }
  auto& server = job.start_server();
  job.wait_ready();
  {
    // Made anew, not recovered: a whole, valid segment (open() validates it) of the spec's size,
    // at the first epoch of its first server.
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    EXPECT_EQ(seg.header().total_bytes, seg.size());
    EXPECT_GT(seg.header().total_bytes, std::uint64_t{1} << 20);
    EXPECT_EQ(shm::load_acquire(seg.header().server_epoch), 1u);
  }
  // That the server found a half-created segment (rather than none) is said only in its log.
  EXPECT_NE(server.output().find("event=recreate"), std::string::npos) << server.output();
  auto& pusher = start_pusher(job, 0, 30);
  EXPECT_EQ(pusher.wait(30s), 0) << pusher.output();
  expect_exact_sum(job.name(), {30});
}
