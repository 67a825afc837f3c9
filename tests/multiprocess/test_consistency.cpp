// Consistency models with real processes: BSP exactness step by step, the SSP bound under a
// slow worker, a worker killed in the middle of a BSP step, uneven data, and live switches.
//
// Every check is exact: SGD with learning rate 1, small-integer gradients, BSP summing the
// gradients of a step ("sum"), so the values are integers and any lost or doubled push shows.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <optional>
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
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Watchdog;

namespace {

std::string spec(const std::string& consistency) {
  return "consistency = \"" + consistency + R"("
slice_bytes = 65536
max_workers = 8
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "w"
shape = [40000]
[[param]]
name = "b"
shape = [7]
)";
}
constexpr std::size_t kW = 40000, kB = 7;

struct Values {
  std::vector<float> w, b;
  bool operator==(const Values&) const = default;
};

Values pull_values(const std::string& segment) {
  shmps::Worker reader(shmps::WorkerOptions{.segment = segment, .rank = 7});
  Values v{std::vector<float>(kW), std::vector<float>(kB)};
  reader.pull("w", v.w);
  reader.pull("b", v.b);
  return v;
}

// Minus the sum of pattern(r, k) over the (rank, step) pairs that took part.
void expect_exact(const Values& got, std::uint64_t workers, const std::function<bool(std::uint64_t, std::uint64_t)>& took_part,
                  std::uint64_t max_steps) {
  std::vector<double> w(kW, 0.0), b(kB, 0.0);
  for (std::uint64_t r = 0; r < workers; ++r)
    for (std::uint64_t k = 0; k < max_steps; ++k)
      if (took_part(r, k)) {
        for (std::size_t i = 0; i < kW; ++i) w[i] -= shmps::test::pattern(r, k, i);
        for (std::size_t i = 0; i < kB; ++i) b[i] -= shmps::test::pattern(r, k, i);
      }
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < kW; ++i) wrong += static_cast<double>(got.w[i]) != w[i];
  for (std::size_t i = 0; i < kB; ++i) wrong += static_cast<double>(got.b[i]) != b[i];
  EXPECT_EQ(wrong, 0u) << "w[0] = " << got.w[0] << ", expected " << w[0];
  // The sums are far from the initial zeros, so the check can fail.
  EXPECT_GT(std::count_if(w.begin(), w.end(), [](double x) { return x != 0.0; }), static_cast<long>(kW / 4));
}

std::vector<Process*> start_steppers(Job& job, std::uint64_t workers, const std::vector<std::string>& args,
                                     const std::vector<std::vector<std::string>>& per_rank = {}) {
  std::vector<Process*> ps;
  for (std::uint64_t r = 0; r < workers; ++r) {
    std::vector<std::string> argv{"shmps-test-pusher", "steps", "--workers", std::to_string(workers)};
    argv.insert(argv.end(), args.begin(), args.end());
    if (r < per_rank.size()) argv.insert(argv.end(), per_rank[r].begin(), per_rank[r].end());
    ps.push_back(&job.start(argv, {{"SHMPS_RANK", std::to_string(r)}}));
  }
  return ps;
}

std::uint64_t field(const std::string& out, const std::string& name) {
  const auto at = out.find(name + " ");
  if (at == std::string::npos) return UINT64_MAX;
  return std::stoull(out.substr(at + name.size() + 1));
}

}  // namespace

TEST(Bsp, EveryPullSeesExactlyTheSumOfAllEarlierStepsAndTwoRunsAgreeBitForBit) {
  Watchdog watchdog(90s);
  Values runs[2];
  for (auto& result : runs) {
    Job job("bsp", spec("bsp"));
    job.start_server();
    job.wait_ready();
    // --check: each worker compares every pull with the exact sum of all earlier steps.
    for (auto* p : start_steppers(job, 3, {"--steps", "25", "--check"})) EXPECT_EQ(p->wait(60s), 0) << p->output();
    result = pull_values(job.name());
    expect_exact(result, 3, [](std::uint64_t, std::uint64_t k) { return k < 25; }, 25);
    auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
    EXPECT_EQ(shmps::shm::load_counter(seg.header().steps), 25u);
    EXPECT_EQ(shmps::shm::load_acquire(seg.group(0).clock), 25u);
  }
  EXPECT_TRUE(runs[0] == runs[1]);
}

TEST(Ssp, NoPullIsStalerThanTheBoundWhileOneWorkerIsSlow) {
  Watchdog watchdog(90s);
  Job job("ssp", spec("ssp:2"));
  job.start_server();
  job.wait_ready();
  auto ps = start_steppers(job, 3, {"--steps", "30"}, {{}, {}, {"--slow-ms", "20"}});
  std::vector<std::uint64_t> staleness;
  for (auto* p : ps) {
    EXPECT_EQ(p->wait(60s), 0) << p->output();
    staleness.push_back(field(p->output(), "max_staleness"));
  }
  for (auto s : staleness) EXPECT_LE(s, 2u);
  // The fast workers ran into the bound (so the bound, not luck, kept them there).
  EXPECT_EQ(staleness[0], 2u);
  EXPECT_EQ(staleness[1], 2u);
  expect_exact(pull_values(job.name()), 3, [](std::uint64_t, std::uint64_t k) { return k < 30; }, 30);
  // The fast workers' time at the bound is on record in their slots.
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  EXPECT_GT(shmps::shm::load_counter(seg.slot(0).wait_ns), 0u);
}

TEST(Bsp, AWorkerKilledMidStepIsDroppedWithinTheDetectionTimeAndItsOpenStepIsDiscardedWhole) {
  Watchdog watchdog(90s);
  Job job("bspkill", spec("bsp"));
  job.start_server();
  job.wait_ready();
  // Rank 0 pushes "w" in step 5, then hangs before "b" and clock(); the others expect rank 0 to
  // count for steps 0..4 only (the documented rule: a step the worker did not finish is
  // discarded whole).
  auto ps = start_steppers(job, 3, {"--steps", "20", "--check", "--absent", "0:5"}, {{"--hang-at", "5"}});
  const auto until = std::chrono::steady_clock::now() + 30s;
  while (ps[0]->output().find("hanging in step 5") == std::string::npos && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(2ms);
  ASSERT_NE(ps[0]->output().find("hanging in step 5"), std::string::npos) << ps[0]->output();
  std::this_thread::sleep_for(100ms);  // the others are now waiting at the step-5 barrier
  const auto killed_at = std::chrono::steady_clock::now();
  ps[0]->kill(SIGKILL);
  EXPECT_EQ(ps[0]->wait(10s), 128 + SIGKILL);
  EXPECT_EQ(ps[1]->wait(30s), 0) << ps[1]->output();
  EXPECT_EQ(ps[2]->wait(30s), 0) << ps[2]->output();
  // 15 more steps with a detection time of 100 ms: well within a few seconds.
  EXPECT_LT(std::chrono::steady_clock::now() - killed_at, 5s);
  expect_exact(pull_values(job.name()), 3, [](std::uint64_t r, std::uint64_t k) { return k < 20 && (r != 0 || k < 5); }, 20);
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  EXPECT_EQ(shmps::shm::load_counter(seg.header().records_discarded), 1u);  // the lone "w" push of step 5
  // The server proved rank 0's holder dead: its slot says so (shmps-top and shmps-ctl show it "dead").
  const std::uint64_t generation = shmps::shm::load_acquire(seg.slot(0).generation);
  EXPECT_GT(generation, 0u);
  EXPECT_EQ(shmps::shm::load_acquire(seg.slot(0).dead_generation), generation) << job.server().output();
  EXPECT_EQ(shmps::shm::load_acquire(seg.slot(1).dead_generation), 0u);
  EXPECT_EQ(shmps::shm::load_acquire(seg.slot(2).dead_generation), 0u);
}

TEST(Bsp, AWorkerWhoseDeathIsAwaitedIsReplacedAndTheStepCompletes) {
  Watchdog watchdog(90s);
  Job job("bspwait", spec("bsp"));
  job.start_server({"--on-worker-death", "wait"});
  job.wait_ready();
  auto ps = start_steppers(job, 2, {"--steps", "10"}, {{"--hang-at", "3"}});
  const auto until = std::chrono::steady_clock::now() + 30s;
  while (ps[0]->output().find("hanging in step 3") == std::string::npos && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(2ms);
  ps[0]->kill(SIGKILL);
  ps[0]->wait(10s);
  // With on_worker_death = wait, rank 1 must still be waiting for step 3 a while later.
  std::this_thread::sleep_for(500ms);
  EXPECT_TRUE(ps[1]->running());
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  EXPECT_EQ(shmps::shm::load_acquire(seg.group(0).clock), 3u);
  // A new process takes slot 0: it enters at the current clock and the barrier moves on.
  shmps::Worker replacement(shmps::WorkerOptions{.segment = job.name(), .rank = 0});
  EXPECT_EQ(replacement.current_clock(), 3u);
  for (int k = 3; k < 10; ++k) {
    std::vector<float> w(kW);
    replacement.pull("w", w);
    replacement.clock();
  }
  replacement.leave();
  EXPECT_EQ(ps[1]->wait(30s), 0) << ps[1]->output();
  EXPECT_EQ(shmps::shm::load_counter(seg.header().records_discarded), 1u);
}

TEST(Consistency, WorkersWithDifferentAmountsOfDataAllFinish) {
  Watchdog watchdog(120s);
  for (const std::string mode : {"bsp", "ssp:1"}) {
    SCOPED_TRACE(mode);
    Job job("uneven", spec(mode));
    job.start_server();
    job.wait_ready();
    // Rank r does 10 + 7r steps; the ones that finish leave, and nobody waits for them.
    std::vector<std::string> args{"--steps", "10", "--extra", "7"};
    if (mode == "bsp") args.push_back("--check");
    for (auto* p : start_steppers(job, 3, args)) EXPECT_EQ(p->wait(60s), 0) << p->output();
    expect_exact(pull_values(job.name()), 3, [](std::uint64_t r, std::uint64_t k) { return k < 10 + 7 * r; }, 24);
  }
}

TEST(Consistency, ALiveSwitchAspBspSspLosesAndDuplicatesNothing) {
  Watchdog watchdog(120s);
  Job job("switch", spec("asp"));
  job.start_server();
  job.wait_ready();
  auto ps = start_steppers(job, 2, {"--steps", "600", "--slow-ms", "1"});
  auto set = [&](const std::string& setting) {
    Process ctl({"shmps-ctl", "set", job.name(), setting});
    EXPECT_EQ(ctl.wait(20s), 0) << ctl.output();
    return ctl.output();
  };
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  // Let each mode do real work before the next switch (conditions, not sleeps: a slow machine
  // or a sanitizer build must not turn this into a test of nothing).
  auto published = [&] {
    return shmps::shm::load_acquire(seg.slot(0).published) + shmps::shm::load_acquire(seg.slot(1).published);
  };
  auto wait_until = [](const std::function<bool()>& done) {
    const auto until = std::chrono::steady_clock::now() + 30s;
    while (!done() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
    return done();
  };
  EXPECT_TRUE(wait_until([&] { return published() >= 40; }));
  EXPECT_NE(set("consistency=bsp").find("consistency is now bsp (was asp)"), std::string::npos);
  EXPECT_TRUE(wait_until([&] { return shmps::shm::load_counter(seg.header().steps) >= 10; }));
  EXPECT_NE(set("consistency=ssp:1").find("consistency is now ssp:1 (was bsp)"), std::string::npos);
  const auto at_ssp = published();
  EXPECT_TRUE(wait_until([&] { return published() >= at_ssp + 40; }));
  EXPECT_NE(set("consistency=asp").find("now asp"), std::string::npos);
  // A bad setting is refused and changes nothing.
  Process bad({"shmps-ctl", "set", job.name(), "consistency=bsq"});
  EXPECT_EQ(bad.wait(20s), 1);
  EXPECT_NE(bad.output().find("expected \"asp\", \"bsp\" or \"ssp:N\""), std::string::npos) << bad.output();
  for (auto* p : ps) EXPECT_EQ(p->wait(60s), 0) << p->output();
  expect_exact(pull_values(job.name()), 2, [](std::uint64_t, std::uint64_t k) { return k < 600; }, 600);
  EXPECT_GT(shmps::shm::load_counter(seg.header().steps), 0u);  // some steps ran synchronously
  EXPECT_EQ(shmps::shm::load_acquire(seg.header().consistency), static_cast<std::uint32_t>(shmps::Consistency::asp));
}

TEST(Bsp, WorkersJoiningWhileStepsCompleteNeitherHangNorCountTwice) {
  Watchdog watchdog(120s);
  // Rings that hold little more than one step: a worker whose first step landed in a step that
  // had already been decided without it would need two steps of room, and hang.
  std::string body = spec("bsp");
  body.insert(body.find("[optimizer]"), "ring_bytes = 330048\n");
  for (int round = 0; round < 5; ++round) {
    Job job("bspjoin", body);
    job.start_server();
    job.wait_ready();
    std::vector<Process*> ps;
    for (int r = 0; r < 3; ++r) {
      ps.push_back(&job.start({"shmps-test-pusher", "steps", "--workers", "3", "--steps", "40", "--no-wait-for-peers"},
                              {{"SHMPS_RANK", std::to_string(r)}}));
      std::this_thread::sleep_for(std::chrono::milliseconds(3 * r));
    }
    for (auto* p : ps) ASSERT_EQ(p->wait(60s), 0) << p->output();
    // Whoever joined when, every push counted once ("sum" and lr 1 make the total exact).
    expect_exact(pull_values(job.name()), 3, [](std::uint64_t, std::uint64_t k) { return k < 40; }, 40);
  }
}

// BSP, 4 slots, SGD at lr 1 with summed steps over one small parameter: exact values.
const std::string kBarrierSpec =
    "consistency = \"bsp\"\nbsp_aggregate = \"sum\"\nmax_workers = 4\n"
    "[optimizer]\nkind = \"sgd\"\nlr = 1.0\n[[param]]\nname = \"b\"\nshape = [7]\n";

// The start barrier: a worker that calls wait_for_workers(2) before its first BSP step shares
// step 0 with a worker whose process starts later; without the barrier it would end step 0 alone
// (b = -1 after it) and the late worker's push would be step 1's.
TEST(Bsp, WaitForWorkersPutsALateStartingWorkerInStepZero) {
  Watchdog watchdog(60s);
  Job job("bsp-barrier", kBarrierSpec);
  job.start_server();
  job.wait_ready();
  shmps::Worker w0(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  std::string late_error;
  std::jthread late([&] {  // joined also when an expectation below throws
    try {
      std::this_thread::sleep_for(300ms);  // starts after rank 0 is already waiting
      shmps::Worker w1(shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 20s});
      w1.wait_for_workers(2);
      w1.push("b", std::vector<float>(7, 2.0f));
      w1.clock();
    } catch (const std::exception& e) {
      late_error = e.what();
    }
  });
  w0.wait_for_workers(2);
  EXPECT_EQ(w0.current_clock(), 0u);
  w0.push("b", std::vector<float>(7, 1.0f));
  w0.clock();
  std::vector<float> b(7);
  w0.pull("b", b);  // waits for step 0
  late.join();
  EXPECT_EQ(late_error, "");
  for (float v : b) EXPECT_EQ(v, -3.0f) << "step 0 must hold both workers' pushes (-1: rank 0 ended it alone)";
}

// A worker that ends its step and leaves while the server reads the rings still counts for that
// step: the server decides who counts before it reads a ring (collect_step), so it either sees the
// worker attached and waits for its clock record, or sees it left and finds that record in the
// ring. The server pauses 200 ms after reading the group's last ring (SHMPS_PAUSE_AT); rank 0 ends
// step 0 once the server is idle again after its push, so that the round that reads rank 0's
// clock record starts then, and rank 1 pushes, ends step 0 and leaves inside that pause. Read the
// other way round (a ring first, then whether its worker counts), step 0 ended with rank 0's push
// alone (b = -1), as a loaded machine did now and then without the pause.
TEST(Bsp, AWorkerThatEndsItsStepAndLeavesWhileTheServerReadsTheRingsStillCounts) {
  Watchdog watchdog(120s);
  const std::string spec = "consistency = \"bsp\"\nbsp_aggregate = \"sum\"\nmax_workers = 2\n"
                           "[optimizer]\nkind = \"sgd\"\nlr = 1.0\n[[param]]\nname = \"b\"\nshape = [7]\n";
  for (const int offset_ms : {40, 120}) {
    Job job("bsp-leave-mid-scan", spec);
    job.start_server({}, {{"SHMPS_PAUSE_AT", "collect.after_scan:200"}});
    job.wait_ready();
    shmps::Worker w0(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
    std::optional<shmps::Worker> w1(std::in_place, shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 20s});
    w0.wait_for_workers(2);
    w1->wait_for_workers(2);
    w0.push("b", std::vector<float>(7, 1.0f));
    std::this_thread::sleep_for(500ms);  // the round the push woke is over
    w0.clock();
    std::this_thread::sleep_for(std::chrono::milliseconds(offset_ms));
    w1->push("b", std::vector<float>(7, 2.0f));
    w1->clock();
    w1.reset();  // leaves at once
    std::vector<float> b(7);
    w0.pull("b", b);  // waits for step 0
    for (float v : b) ASSERT_EQ(v, -3.0f) << "offset " << offset_ms << " ms: step 0 must hold both workers' pushes";
  }
}

TEST(Bsp, WaitForWorkersNamesTheRanksThatNeverCameAndRefusesBadCounts) {
  Watchdog watchdog(60s);
  Job job("bsp-barrier-bad", kBarrierSpec);
  job.start_server();
  job.wait_ready();
  shmps::Worker w0(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  shmps::Worker w2(shmps::WorkerOptions{.segment = job.name(), .rank = 2, .timeout = 20s});
  // Both admitted before the short waits below (a loaded machine's server may take a while).
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  const auto admitted = [&](std::uint32_t r) {
    return shmps::shm::load_acquire(seg.slot(r).admitted_generation) == shmps::shm::load_acquire(seg.slot(r).generation);
  };
  for (const auto until = std::chrono::steady_clock::now() + 20s;
       !(admitted(0) && admitted(2)) && std::chrono::steady_clock::now() < until;)
    std::this_thread::sleep_for(2ms);
  ASSERT_TRUE(admitted(0) && admitted(2));
  const auto message = [&](std::size_t count, std::chrono::milliseconds timeout) -> std::string {
    try {
      w0.wait_for_workers(count, timeout);
    } catch (const shmps::Error& e) {
      return e.what();
    }
    return "(returned)";
  };
  EXPECT_HAS(message(4, 300ms), "ranks 1, 3 of segment");
  EXPECT_HAS(message(0, 300ms), "pass a count from 1 to 4");
  EXPECT_HAS(message(5, 300ms), "has 4 worker slots");
  EXPECT_EQ(message(1, 300ms), "(returned)");
  EXPECT_EQ(w0.current_clock(), 0u) << "a failed wait changes nothing";
}

// The barrier counts the workers of this run only: a slot whose process ended its steps and left
// before this worker entered (a kept segment, a job joined again) does not make it return.
TEST(Bsp, WaitForWorkersDoesNotCountAWorkerThatLeftBeforeThisOneEntered) {
  Watchdog watchdog(60s);
  Job job("bsp-barrier-old", kBarrierSpec);
  job.start_server();
  job.wait_ready();
  {
    shmps::Worker a(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
    shmps::Worker b(shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 20s});
    std::jthread other([&] { b.wait_for_workers(2); });
    a.wait_for_workers(2);
    other.join();
    a.push("b", std::vector<float>(7, 1.0f));
    a.clock();
    b.push("b", std::vector<float>(7, 1.0f));
    b.clock();
    std::vector<float> v(7);
    a.pull("b", v);
    ASSERT_EQ(v[0], -2.0f);
  }  // both leave after step 0
  shmps::Worker again(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  again.wait_for_workers(1, 20s);  // admitted, at step 1
  EXPECT_EQ(again.current_clock(), 1u);
  try {
    again.wait_for_workers(2, 300ms);
    ADD_FAILURE() << "returned although rank 1's process left before this one entered";
  } catch (const shmps::Error& e) {
    EXPECT_HAS(std::string(e.what()), "ranks 1 of segment");
  }
}

// A switch to BSP while fast pushers are a ring's length ahead of the server (ASP lets a ring
// hold many finished steps not yet applied): BSP must start at the oldest step still in a ring,
// not at the slowest worker's clock. Started there, the records of the earlier steps stayed in
// the rings until that step ended, and a worker whose next step no longer fit beside them waited
// for room forever: every worker stopped (found by the soak, tests/crash/test_soak.cpp).
TEST(Consistency, ASwitchToBspWhileTheRingsHoldEarlierStepsGoesOnAndLosesNothing) {
  Watchdog watchdog(180s);
  Job job("switch-backlog", shmps::test::pattern_spec(8));
  job.start_server();
  job.wait_ready();
  constexpr int kWorkers = 4;
  std::vector<Process*> ps;
  for (int r = 0; r < kWorkers; ++r)
    ps.push_back(&job.start({"shmps-test-pusher", "exact", "--pushes", "1000000000", "--clock-every", "1"},
                            {{"SHMPS_RANK", std::to_string(r)}}));
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  auto published = [&] {
    std::uint64_t sum = 0;
    for (int r = 0; r < kWorkers; ++r) sum += shmps::shm::load_acquire(seg.slot(r).published);
    return sum;
  };
  auto wait_until = [](const std::function<bool()>& done, std::chrono::seconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    while (!done() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(5ms);
    return done();
  };
  // Every ring full of steps the server has not taken yet.
  ASSERT_TRUE(wait_until([&] { return published() >= 4000; }, 60s));
  std::this_thread::sleep_for(1s);
  auto set = [&](const std::string& setting) {
    Process ctl({"shmps-ctl", "set", job.name(), setting});
    EXPECT_EQ(ctl.wait(20s), 0) << ctl.output();
  };
  set("consistency=bsp");
  const std::uint64_t at_switch = published();
  const std::uint64_t steps_at_switch = shmps::shm::load_counter(seg.header().steps);
  // Steps complete in BSP, and the workers go on pushing.
  EXPECT_TRUE(wait_until([&] { return published() >= at_switch + 60; }, 30s))
      << "no worker got on in BSP: published " << published() << ", at the switch " << at_switch;
  EXPECT_GT(shmps::shm::load_counter(seg.header().steps), steps_at_switch);
  set("consistency=asp");
  // Every worker stops at what its slot committed, and a new one waits until all is applied.
  std::vector<std::uint64_t> final_target(kWorkers);
  for (int r = 0; r < kWorkers; ++r) {
    ps[r]->kill(SIGKILL);
    ps[r]->wait(10s);
    final_target[r] = shmps::shm::load_acquire(seg.slot(r).published);
  }
  for (int r = 0; r < kWorkers; ++r) {
    auto& p = job.start({"shmps-test-pusher", "exact", "--pushes", std::to_string(final_target[r])},
                        {{"SHMPS_RANK", std::to_string(r)}});
    EXPECT_EQ(p.wait(60s), 0) << p.output();
  }
  shmps::test::expect_exact_sum(job.name(), final_target);
}
