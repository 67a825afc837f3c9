// BSP steps bigger than the rings: each worker's ring holds 256 KiB, less than one push of "w"
// (120000 floats, 480 KB), so every step's pushes stream through the rings in chunks and the
// server adds them to the step sums as they come (collect.hpp, apply.hpp). The steppers run with
// --check (SGD, lr 1, bsp_aggregate = "sum", small-integer gradients): before each step every
// worker's pull must equal minus the exact sum of the gradients of every earlier step of every
// rank, so a chunk summed twice, lost, or a step applied twice fails them. Workers and the server
// are SIGKILLed mid-step, mid-sum and mid-apply.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/optimizer.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/exact.hpp"
#include "../support/harness.hpp"
#include "../support/pattern.hpp"

using namespace std::chrono_literals;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Watchdog;
namespace shm = shmps::shm;

namespace {

const std::string kSpec = "consistency = \"bsp\"\nbsp_aggregate = \"sum\"\n";
const std::string kSmallRing = "ring_bytes = 262144\n";

// check = false: without --check (an optimizer other than SGD at lr 1, whose sums are not exact).
Process& start_stepper(Job& job, int rank, int workers, int steps, std::vector<std::string> extra = {},
                       std::vector<std::pair<std::string, std::string>> env = {}, bool check = true) {
  std::vector<std::string> argv{"shmps-test-pusher", "steps", "--workers", std::to_string(workers),
                                "--steps",           std::to_string(steps), "--resume"};
  if (check) argv.emplace_back("--check");
  argv.insert(argv.end(), extra.begin(), extra.end());
  env.emplace_back("SHMPS_RANK", std::to_string(rank));
  return job.start(argv, env);
}

// A stepper that finished: exit code 0, and it says its --check found no step wrong.
void expect_finished(Process& p) {
  EXPECT_EQ(p.wait(90s), 0) << p.output();
  EXPECT_NE(p.output().find("wrong_steps 0"), std::string::npos) << p.output();
}

template <class Done>
bool wait_until(Done&& done, std::chrono::milliseconds timeout = 30s) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

}  // namespace

TEST(StreamedStep, TheRingsHoldLessThanAPushAndEveryStepIsTheExactSum) {
  Watchdog watchdog(120s);
  Job job("stream-bsp", kSpec + shmps::test::pattern_spec(8, kSmallRing));
  job.start_server();
  job.wait_ready();
  {
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    EXPECT_TRUE(seg.streams_bsp_steps());
    EXPECT_LT(seg.header().ring_bytes, shmps::test::kPatternW * sizeof(float));
  }
  std::vector<Process*> workers;
  for (int r = 0; r < 4; ++r) workers.push_back(&start_stepper(job, r, 4, 15));
  for (auto* w : workers) expect_finished(*w);
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  EXPECT_EQ(shm::load_acquire(seg.group(0).clock), 15u);
}

// A live switch out of BSP in the middle of a streamed step: the pushes already summed are
// applied as that step, once; the step's other pushes, sent after the switch, as they come; and a
// switch back to BSP at the same step starts from zero sums, so nothing is applied twice.
// With kill = true the server is SIGKILLed after it applied the summed pushes but before it moved
// the clocks past the step; the next server must finish exactly that.
class StreamedStepSwitch : public ::testing::TestWithParam<bool> {};

TEST_P(StreamedStepSwitch, ASwitchOutOfBspMidStepAppliesWhatWasSummedOnceAndLosesNothing) {
  Watchdog watchdog(90s);
  const bool kill = GetParam();
  Job job("stream-switch", kSpec + shmps::test::pattern_spec(8, kSmallRing));
  auto& first = kill ? job.start_server({}, {{"SHMPS_KILL_AT", "switch.after_step_sums"}}) : job.start_server();
  job.wait_ready();
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const std::size_t n = shmps::test::kPatternW;
  shmps::Worker w0(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 30s});
  shmps::Worker w1(shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 30s});
  const auto set = [&](const std::string& setting) {
    Process ctl({"shmps-ctl", "set", job.name(), setting});
    ASSERT_EQ(ctl.wait(20s), 0) << ctl.output();
  };
  const auto expect_w = [&](float want, const char* when) {
    std::vector<float> w(n);
    w0.pull("w", w);
    for (std::size_t k = 0; k < n; ++k) ASSERT_EQ(w[k], want) << when << ", element " << k;
  };
  // Step 0: rank 0's push of "w" (it streams: the ring holds less) is summed; rank 1 has not pushed.
  w0.push("w", std::vector<float>(n, 1.0f));
  ASSERT_TRUE(wait_until([&] { return shm::load_acquire(seg.header().floats_applied) >= n; }));
  EXPECT_EQ(shm::load_acquire(seg.group(0).clock), 0u);
  set("consistency=asp");
  if (kill) {
    EXPECT_EQ(first.wait(30s), 128 + SIGKILL) << "the kill point was not reached:\n" << first.output();
    job.start_server();
    job.wait_ready();
  }
  ASSERT_TRUE(wait_until([&] { return shm::load_acquire(seg.group(0).clock) == 1; }))
      << "the summed step was applied and the clocks moved past it";
  w1.wait_applied(w1.push("w", std::vector<float>(n, 2.0f)));
  expect_w(-3.0f, "rank 0's summed push and rank 1's, after the switch to ASP");
  // Back to BSP before either worker ended step 0: the job starts again at step 0.
  set("consistency=bsp");
  EXPECT_EQ(shm::load_acquire(seg.group(0).clock), 0u);
  w0.push("w", std::vector<float>(n, 3.0f));
  w0.clock();
  w1.push("w", std::vector<float>(n, 3.0f));
  w1.clock();
  expect_w(-9.0f, "one more BSP step of both (its sums must not start from the old ones)");
  EXPECT_EQ(shm::load_acquire(seg.group(0).clock), 1u);
}

INSTANTIATE_TEST_SUITE_P(KilledOrNot, StreamedStepSwitch, ::testing::Bool());

// A worker killed after its push of "w" for step 5 was summed (but before it pushed "b" and ended
// the step) holds the step: the others wait, whatever on_worker_death says. Its successor repeats
// the step, skips the chunks already summed, and every check still holds.
TEST(StreamedStep, AWorkerKilledMidStepHoldsTheStepUntilItsSuccessorFinishesIt) {
  Watchdog watchdog(120s);
  Job job("stream-kill", kSpec + shmps::test::pattern_spec(8, kSmallRing));
  job.start_server();
  job.wait_ready();
  auto& victim = start_stepper(job, 0, 3, 12, {"--hang-at", "5"});
  std::vector<Process*> others{&start_stepper(job, 1, 3, 12), &start_stepper(job, 2, 3, 12)};
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  ASSERT_TRUE(wait_until([&] { return victim.output().find("hanging in step 5") != std::string::npos; }))
      << victim.output();
  // Its chunks of step 5 reach the sums (the ring could not hold them all anyway).
  ASSERT_TRUE(wait_until([&] { return shm::load_acquire(seg.slot(0).streamed_step) == 6; }));
  victim.kill(SIGKILL);
  victim.wait(10s);
  std::this_thread::sleep_for(500ms);  // the server proves the death; the step must not end without it
  EXPECT_EQ(shm::load_acquire(seg.group(0).clock), 5u);
  {
    // What a waiting worker is told when its pull times out: the dead worker that holds the
    // step, and what to do about it.
    shmps::Worker late(shmps::WorkerOptions{.segment = job.name(), .rank = 3, .timeout = 2s});
    late.clock();  // joins at step 5 and ends it at once
    std::vector<float> b(shmps::test::kPatternB);
    try {
      late.pull("b", b);
      ADD_FAILURE() << "the pull did not wait for step 5";
    } catch (const shmps::Error& e) {
      EXPECT_NE(std::string(e.what()).find("workers behind: 0 (gone with part of step 5 summed: start rank 0 again"),
                std::string::npos)
          << e.what();
    }
    late.leave();
  }
  auto& successor = start_stepper(job, 0, 3, 12);
  expect_finished(successor);
  for (auto* w : others) expect_finished(*w);
  EXPECT_TRUE(wait_until([&] { return shm::load_acquire(seg.group(0).clock) == 12u; }))  // its last step may still be applied
      << "group clock " << shm::load_acquire(seg.group(0).clock) << ", want 12";
}

// The last step of a job whose workers end it and leave before the server looks again: its pushes
// were summed in earlier rounds, so the round that finds the ends of the step takes no push and
// nobody is attached any more. The step is still complete (every worker ended it), and the group
// clock must move past it; the server is held with SIGSTOP so that this order is certain.
TEST(StreamedStep, AStepEndedByWorkersThatThenLeaveIsCompletedWithoutThem) {
  Watchdog watchdog(60s);
  Job job("stream-leave", kSpec + shmps::test::pattern_spec(8, kSmallRing));
  auto& server = job.start_server();
  job.wait_ready();
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const std::size_t n = shmps::test::kPatternW;
  {
    shmps::Worker w0(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 30s});
    shmps::Worker w1(shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 30s});
    w0.wait_for_workers(2);
    const std::vector<float> g0(n, 1.0f), g1(n, 2.0f);
    w0.push("w", g0);  // streams: the ring holds less than the push
    w1.push("w", g1);
    ASSERT_TRUE(wait_until([&] { return w0.applied() == w0.published() && w1.applied() == w1.published(); }))
        << "the server did not sum the pushes";
    server.kill(SIGSTOP);
    w0.clock();
    w1.clock();
    w0.leave();
    w1.leave();
  }
  server.kill(SIGCONT);
  EXPECT_TRUE(wait_until([&] { return shm::load_acquire(seg.group(0).clock) == 1u; }, 10s))
      << "group clock " << shm::load_acquire(seg.group(0).clock) << ", want 1";
  const float* w = seg.values(seg.param(static_cast<std::uint32_t>(seg.find_param("w"))));
  for (std::size_t k = 0; k < n; ++k) ASSERT_EQ(w[k], -3.0f) << "element " << k;
}

// Killed between two chunks of the streamed push: the successor skips exactly the chunks its
// predecessor committed, the rest of the push included.
TEST(StreamedStep, AWorkerKilledBetweenChunksIsFinishedByItsSuccessor) {
  Watchdog watchdog(120s);
  Job job("stream-chunk", kSpec + shmps::test::pattern_spec(8, kSmallRing));
  job.start_server();
  job.wait_ready();
  // 8 chunks per push of "w", 7 passes between them per step: the 25th pass is in step 3.
  auto& victim = start_stepper(job, 0, 3, 10, {}, {{"SHMPS_KILL_AT", "push.mid_stream:25"}});
  std::vector<Process*> others{&start_stepper(job, 1, 3, 10), &start_stepper(job, 2, 3, 10)};
  EXPECT_EQ(victim.wait(60s), 128 + SIGKILL) << victim.output();
  auto& successor = start_stepper(job, 0, 3, 10);
  expect_finished(successor);
  for (auto* w : others) expect_finished(*w);
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  EXPECT_EQ(shm::load_acquire(seg.group(0).clock), 10u);
}

// The server killed while it adds a chunk to a slice's sums, or while it copies a step's new
// values in: the next server finishes the copy from the redo entry, adds no chunk twice and
// applies no slice's step twice.
class StreamedStepServerKill : public ::testing::TestWithParam<const char*> {};

// Three steppers, 12 steps, the first server SIGKILLed at `point` and a second one started: every
// step checked by the steppers, the group at step 12, no redo entry left valid.
static void kill_server_mid_steps(const std::string& tag, const std::string& spec, const char* point) {
  Watchdog watchdog(120s);
  Job job(tag, spec);
  auto& first = job.start_server({}, {{"SHMPS_KILL_AT", point}});
  job.wait_ready();
  std::vector<Process*> workers;
  for (int r = 0; r < 3; ++r) workers.push_back(&start_stepper(job, r, 3, 12));
  EXPECT_EQ(first.wait(60s), 128 + SIGKILL) << "the kill point was not reached:\n" << first.output();
  job.start_server();
  job.wait_ready();
  for (auto* w : workers) expect_finished(*w);
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  // A stepper exits once it has ended its last step, which the server may still be applying.
  EXPECT_TRUE(wait_until([&] { return shm::load_acquire(seg.group(0).clock) == 12u; }))
      << "group clock " << shm::load_acquire(seg.group(0).clock) << ", want 12";
  for (std::uint32_t e = 0; e < seg.header().redo_count; ++e) EXPECT_EQ(shm::load_acquire(seg.redo(e).valid), 0u);
}

TEST_P(StreamedStepServerKill, TheNextServerAddsNoChunkTwiceAndAppliesNoStepTwice) {
  kill_server_mid_steps("stream-server", kSpec + shmps::test::pattern_spec(8, kSmallRing), GetParam());
}

INSTANTIATE_TEST_SUITE_P(KillPoints, StreamedStepServerKill,
                         ::testing::Values("apply.mid_sum:30", "apply.mid_copy:20", "apply.mid_chunks:20",
                                           "apply.before_release:15"));

// The same with bf16 values (dtype = "bf16" on both parameters): a step's chunks widen the old
// values from the slice and narrow the new ones in, and the next server finishes a slice from the
// same step sums. SGD at lr 1: the pattern's sums over 12 steps of 3 workers stay within 144 in
// magnitude, which bf16 holds exactly, so the steppers' checks still hold value by value.
class StreamedStepServerKillBf16Values : public ::testing::TestWithParam<const char*> {};

TEST_P(StreamedStepServerKillBf16Values, TheNextServerFinishesTheSliceFromTheSameSums) {
  std::string spec = kSpec + shmps::test::pattern_spec(8, kSmallRing);
  for (const std::string shape : {"shape = [3, 40000]\n", "shape = [7]\n"})
    spec.replace(spec.find(shape), shape.size(), shape + "dtype = \"bf16\"\n");
  ASSERT_NE(spec.find("dtype = \"bf16\""), spec.rfind("dtype = \"bf16\"")) << "both parameters in bf16:\n" << spec;
  kill_server_mid_steps("stream-bf16-values", spec, GetParam());
}

INSTANTIATE_TEST_SUITE_P(KillPoints, StreamedStepServerKillBf16Values,
                         ::testing::Values("apply.mid_copy:20", "apply.mid_chunks:20"));

// The same with Adam and bf16 state (state_dtype = "bf16"): the step sums stay float32 while the
// redo entries carry bf16 state, and a server killed mid-copy or between a slice's chunks has
// its successor copy that state in again and compute the rest. Adam is not exact, so the steppers run without --check; instead every slice must
// have had exactly 12 optimizer steps, and the values must match 12 steps of the bf16 Adam
// kernel over the exact step sums, computed here (the kernel is element-wise, so slicing does
// not change it; a step applied twice or a chunk lost moves values by about lr).
class StreamedStepBf16 : public ::testing::TestWithParam<const char*> {};

TEST_P(StreamedStepBf16, AServerKilledMidApplyLeavesAdamWithBf16StateAsIfNeverKilled) {
  Watchdog watchdog(120s);
  const std::string spec =
      "consistency = \"bsp\"\nbsp_aggregate = \"sum\"\nslice_bytes = 65536\nmax_workers = 8\n" + kSmallRing +
      "[optimizer]\nkind = \"adam\"\nlr = 0.01\nstate_dtype = \"bf16\"\n"
      "[[param]]\nname = \"w\"\nshape = [3, 40000]\n[[param]]\nname = \"b\"\nshape = [7]\n";
  Job job("stream-bf16", spec);
  auto& first = job.start_server({}, {{"SHMPS_KILL_AT", GetParam()}});
  job.wait_ready();
  constexpr int kWorkers = 3, kSteps = 12;
  std::vector<Process*> workers;
  for (int r = 0; r < kWorkers; ++r) workers.push_back(&start_stepper(job, r, kWorkers, kSteps, {}, {}, false));
  EXPECT_EQ(first.wait(60s), 128 + SIGKILL) << "the kill point was not reached:\n" << first.output();
  job.start_server();
  job.wait_ready();
  for (auto* w : workers) EXPECT_EQ(w->wait(90s), 0) << w->output();
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  ASSERT_TRUE(seg.streams_bsp_steps());
  ASSERT_EQ(seg.header().optimizer.state_dtype, shmps::StateDType::bf16);
  // The steppers (no --check) exit once they have ended their last step, which the server may
  // still be applying.
  EXPECT_TRUE(wait_until([&] { return shm::load_acquire(seg.group(0).clock) == std::uint64_t{kSteps}; }))
      << "group clock " << shm::load_acquire(seg.group(0).clock) << ", want " << kSteps;
  for (std::uint32_t e = 0; e < seg.header().redo_count; ++e) EXPECT_EQ(shm::load_acquire(seg.redo(e).valid), 0u);
  for (std::uint64_t s = 0; s < seg.header().slice_count; ++s) EXPECT_EQ(seg.slice(s).step, std::uint64_t{kSteps}) << s;
  const shmps::OptimizerSettings settings = seg.header().optimizer;
  for (const char* name : {"w", "b"}) {
    const shm::ParamEntry& p = seg.param(static_cast<std::uint32_t>(seg.find_param(name)));
    std::vector<float> want(p.size, 0.0f), g(p.size);
    std::vector<std::uint16_t> m(p.size, 0), v(p.size, 0);
    for (int t = 0; t < kSteps; ++t) {
      for (std::size_t i = 0; i < p.size; ++i) {
        g[i] = 0.0f;
        for (int r = 0; r < kWorkers; ++r)
          g[i] += shmps::test::pattern(static_cast<std::uint64_t>(r), static_cast<std::uint64_t>(t), i);
      }
      shmps::server::apply_update_bf16(settings, want, g, m, v, static_cast<std::uint64_t>(t + 1), 1.0f);
    }
    const float* got = seg.values(p);
    double worst = 0.0;
    for (std::size_t i = 0; i < p.size; ++i) worst = std::max(worst, std::fabs(static_cast<double>(got[i]) - want[i]));
    EXPECT_LT(worst, 1e-3) << name << ": values differ from 12 bf16 Adam steps by up to " << worst;
  }
}

INSTANTIATE_TEST_SUITE_P(KillPoints, StreamedStepBf16, ::testing::Values("apply.mid_copy:20", "apply.mid_chunks:20"));
