// Stragglers in BSP (docs/consistency.md#stragglers): a worker that is alive but stuck (SIGSTOP)
// is evicted from its group's barrier after straggler_timeout while the healthy workers go on; its
// open step is discarded whole, the eviction is logged, counted and shown; continued, it fails
// with a clear error; shmps-launch --kill-stragglers kills and restarts it with the same rank; and
// a waiting worker's timeout names the worker it waits for and why.
//
// Every check is exact (SGD, learning rate 1, small-integer gradients, BSP "sum"): the final
// values are minus the sum of exactly the steps that were applied.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/expect.hpp"
#include "../support/harness.hpp"
#include "../support/pattern.hpp"

using namespace std::chrono_literals;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Watchdog;
namespace shm = shmps::shm;

namespace {

const std::string kSpec = R"(consistency = "bsp"
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
constexpr std::size_t kW = 40000, kB = 7;
constexpr std::uint64_t kSteps = 20, kStopAt = 5;

using TookPart = std::function<bool(std::uint64_t, std::uint64_t)>;

// Minus the sum of pattern(r, k) over the (rank, step) pairs whose push took part, pulled as rank
// 7: took_part for "w", took_part_b (if given, else the same) for "b".
void expect_exact(const std::string& segment, std::uint64_t workers, const TookPart& took_part,
                  const TookPart& took_part_b = nullptr) {
  shmps::Worker reader(shmps::WorkerOptions{.segment = segment, .rank = 7});
  std::vector<float> gw(kW), gb(kB);
  reader.pull("w", gw);
  reader.pull("b", gb);
  std::vector<double> w(kW, 0.0), b(kB, 0.0);
  for (std::uint64_t r = 0; r < workers; ++r)
    for (std::uint64_t k = 0; k < kSteps; ++k)
    {
      if (took_part(r, k))
        for (std::size_t i = 0; i < kW; ++i) w[i] -= shmps::test::pattern(r, k, i);
      if (took_part_b ? took_part_b(r, k) : took_part(r, k))
        for (std::size_t i = 0; i < kB; ++i) b[i] -= shmps::test::pattern(r, k, i);
    }
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < kW; ++i) wrong += static_cast<double>(gw[i]) != w[i];
  for (std::size_t i = 0; i < kB; ++i) wrong += static_cast<double>(gb[i]) != b[i];
  EXPECT_EQ(wrong, 0u) << "w[0] = " << gw[0] << ", expected " << w[0];
  EXPECT_GT(std::count_if(w.begin(), w.end(), [](double x) { return x != 0.0; }), static_cast<long>(kW / 4));
}

// Three steppers; rank 2 stops itself (SIGSTOP) in step kStopAt after pushing "w". With `check`
// (BSP) the others check every pull against the exact sum of the steps before it, rank 2 absent
// from step kStopAt on.
std::vector<Process*> start_three(Job& job, bool check = true) {
  std::vector<Process*> ps;
  for (int r = 0; r < 3; ++r) {
    std::vector<std::string> argv{"shmps-test-pusher", "steps", "--workers", "3", "--steps", std::to_string(kSteps)};
    if (check) argv.insert(argv.end(), {"--check", "--absent", "2:" + std::to_string(kStopAt)});
    argv.insert(argv.end(), {"--stop-at", "2:" + std::to_string(kStopAt)});
    ps.push_back(&job.start(argv, {{"SHMPS_RANK", std::to_string(r)}}));
  }
  return ps;
}

bool wait_for_output(Process& p, const std::string& what, std::chrono::seconds limit = 30s) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (p.output().find(what) == std::string::npos && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(2ms);
  return p.output().find(what) != std::string::npos;
}

// The row of rank r in `shmps-ctl inspect`'s worker table.
std::string slot_row(const std::string& inspect, unsigned r) {
  std::string head = "\n";  // appended, not "\n" + ...: g++ 12 gives a false -Wrestrict there at -O3
  head += std::to_string(r);
  head += ' ';
  const auto at = inspect.find(head);
  if (at == std::string::npos) return {};
  return inspect.substr(at + 1, inspect.find('\n', at + 1) - at - 1);
}

}  // namespace

TEST(Stragglers, AStoppedWorkerIsEvictedAfterTheTimeoutAndTheOthersFinishWithTheExactSum) {
  Watchdog watchdog(90s);
  Job job("straggler", kSpec);
  job.start_server({"--straggler-timeout", "2s"});
  job.wait_ready();
  auto ps = start_three(job);
  ASSERT_TRUE(wait_for_output(*ps[2], "stopping in step 5")) << ps[2]->output();
  const auto stopped_at = std::chrono::steady_clock::now();
  EXPECT_EQ(ps[0]->wait(40s), 0) << ps[0]->output();
  EXPECT_EQ(ps[1]->wait(40s), 0) << ps[1]->output();
  const auto waited = std::chrono::steady_clock::now() - stopped_at;
  // Evicted no sooner than the timeout, and long before the workers' 30 s call timeout.
  EXPECT_GE(waited, 1900ms);
  EXPECT_LT(waited, 20s);
  EXPECT_TRUE(ps[2]->running()) << "the straggler is still there, stopped";

  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  EXPECT_EQ(shm::load_counter(seg.header().stragglers_evicted), 1u);
  EXPECT_EQ(shm::load_counter(seg.group(0).evictions), 1u);
  EXPECT_EQ(shm::load_acquire(seg.header().straggler_timeout_ms), 2000u);
  const std::uint64_t generation = shm::load_acquire(seg.slot(2).generation);
  EXPECT_EQ(shm::load_acquire(seg.slot(2).evicted_generation), generation);
  EXPECT_GE(shm::load_acquire(seg.slot(2).evicted_behind_ms), 2000u);
  EXPECT_EQ(shm::load_acquire(seg.slot(0).evicted_generation), 0u);
  EXPECT_EQ(shm::load_acquire(seg.slot(1).evicted_generation), 0u);
  // Every step completed; its open step 5 (the lone "w" push) discarded whole.
  EXPECT_EQ(shm::load_counter(seg.header().steps), kSteps);
  EXPECT_EQ(shm::load_counter(seg.header().records_discarded), 1u);
  EXPECT_HAS(job.server().output(), "event=straggler_evicted");
  EXPECT_HAS(job.server().output(), "rank=2 pid=" + std::to_string(ps[2]->pid()));
  EXPECT_HAS(job.server().output(), "behind_ms=");

  const auto inspect = shmps::test::run({"shmps-ctl", "inspect", job.name()});
  EXPECT_EQ(inspect.code, 0) << inspect.out;
  EXPECT_HAS(inspect.out, "stragglers: evicted after 2.0s (1 evicted)");
  EXPECT_HAS(slot_row(inspect.out, 2), "evicted");
  EXPECT_HAS(slot_row(inspect.out, 0), "left");  // done
  const auto workers = shmps::test::run({"shmps-ctl", "workers", job.name()});
  EXPECT_HAS(slot_row(workers.out, 2), "evicted");

  expect_exact(job.name(), 3, [](std::uint64_t r, std::uint64_t k) { return r != 2 || k < kStopAt; });
}

TEST(Stragglers, AnEvictedWorkerThatIsContinuedGetsAClearErrorAndCorruptsNothing) {
  Watchdog watchdog(90s);
  Job job("straggler-cont", kSpec);
  job.start_server({"--straggler-timeout", "2s"});
  job.wait_ready();
  auto ps = start_three(job);
  ASSERT_TRUE(wait_for_output(*ps[2], "stopping in step 5")) << ps[2]->output();
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const auto until = std::chrono::steady_clock::now() + 30s;
  while (shm::load_counter(seg.header().stragglers_evicted) == 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(5ms);
  ASSERT_EQ(shm::load_counter(seg.header().stragglers_evicted), 1u)
      << job.server().output() << "\nrank 2 (running " << ps[2]->running() << "):\n" << ps[2]->output();
  ps[2]->kill(SIGCONT);
  // It goes on with its step: its next call (the push of "b") is refused, and it exits non-zero.
  EXPECT_EQ(ps[2]->wait(20s), 1) << ps[2]->output();
  EXPECT_HAS(ps[2]->output(), "continued in step 5");
  EXPECT_HAS(ps[2]->output(), "worker 2 (pid " + std::to_string(ps[2]->pid()) +
                                  ") was evicted from the BSP barrier as a straggler after ");
  EXPECT_HAS(ps[2]->output(), "restart it (it rejoins with its rank)");
  EXPECT_EQ(ps[0]->wait(40s), 0) << ps[0]->output();
  EXPECT_EQ(ps[1]->wait(40s), 0) << ps[1]->output();
  // Nothing of its step 5 was applied, nothing is left in its ring, and the slot stays evicted.
  EXPECT_EQ(shm::load_counter(seg.header().records_discarded), 1u);
  EXPECT_EQ(shm::load_counter(seg.header().steps), kSteps);
  EXPECT_EQ(shm::load_acquire(seg.slot(2).applied), shm::load_acquire(seg.slot(2).published));
  EXPECT_EQ(shm::load_acquire(seg.ring(2).head), shm::load_acquire(seg.ring(2).tail));
  const auto inspect = shmps::test::run({"shmps-ctl", "inspect", job.name()});
  EXPECT_HAS(slot_row(inspect.out, 2), "evicted");
  expect_exact(job.name(), 3, [](std::uint64_t r, std::uint64_t k) { return r != 2 || k < kStopAt; });

  // A new process takes rank 2 and rejoins at the group's clock, as a restarted worker does.
  shmps::Worker again(shmps::WorkerOptions{.segment = job.name(), .rank = 2});
  EXPECT_EQ(again.current_clock(), kSteps);
  std::vector<float> b(kB);
  again.pull("b", b);
  again.clock();
  again.leave();
}

// SSP (bound 1): the stopped rank 2 holds the others once they are past the bound. It is evicted
// after the timeout once the server has applied every push it committed (its step 5's "w" push
// included: in SSP a push counts when it is committed, not at the step's end), the others finish,
// and continued, it is refused and adds nothing.
TEST(Stragglers, InSspAStoppedWorkerHoldingTheBoundIsEvictedAndEveryPushItCommittedCounts) {
  Watchdog watchdog(90s);
  // kSpec with its first line, consistency = "bsp", changed.
  Job job("straggler-ssp", "consistency = \"ssp:1\"" + kSpec.substr(kSpec.find('\n')));
  job.start_server({"--straggler-timeout", "2s"});
  job.wait_ready();
  auto ps = start_three(job, false);
  ASSERT_TRUE(wait_for_output(*ps[2], "stopping in step 5")) << ps[2]->output();
  const auto stopped_at = std::chrono::steady_clock::now();
  EXPECT_EQ(ps[0]->wait(40s), 0) << ps[0]->output();
  EXPECT_EQ(ps[1]->wait(40s), 0) << ps[1]->output();
  EXPECT_GE(std::chrono::steady_clock::now() - stopped_at, 1900ms) << "the others waited at the bound first";

  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  EXPECT_EQ(shm::load_counter(seg.header().stragglers_evicted), 1u) << job.server().output();
  EXPECT_EQ(shm::load_counter(seg.group(0).evictions), 1u);
  EXPECT_EQ(shm::load_acquire(seg.slot(2).evicted_generation), shm::load_acquire(seg.slot(2).generation));
  EXPECT_EQ(shm::load_counter(seg.header().records_discarded), 0u) << "nothing it committed was dropped";
  EXPECT_HAS(job.server().output(), "event=straggler_evicted");
  EXPECT_HAS(job.server().output(), "held the SSP bound (ssp:1) at clock 5");
  const auto inspect = shmps::test::run({"shmps-ctl", "inspect", job.name()});
  EXPECT_HAS(inspect.out, "stragglers: evicted after 2.0s (1 evicted)");
  EXPECT_HAS(slot_row(inspect.out, 2), "evicted");

  ps[2]->kill(SIGCONT);  // it goes on with its step: the push of "b" is refused
  EXPECT_EQ(ps[2]->wait(20s), 1) << ps[2]->output();
  EXPECT_HAS(ps[2]->output(), "was evicted as a straggler holding the SSP bound at clock 5");
  EXPECT_EQ(shm::load_counter(seg.header().records_discarded), 0u);
  // Every step of ranks 0 and 1; rank 2's steps 0-4 whole and the "w" push of its step 5.
  expect_exact(
      job.name(), 3, [](std::uint64_t r, std::uint64_t k) { return r != 2 || k <= kStopAt; },
      [](std::uint64_t r, std::uint64_t k) { return r != 2 || k < kStopAt; });
}

TEST(Stragglers, TheLauncherKillsAnEvictedStragglerAndRestartsItWithTheSameRank) {
  Watchdog watchdog(90s);
  Job job("straggler-launch", kSpec);
  Process launch({"shmps-launch", "--spec", job.spec_path(), "--name", job.name(), "--workers", "3",
                  "--straggler-timeout", "2s", "--kill-stragglers", "--", "shmps-test-pusher", "steps", "--workers",
                  "3", "--steps", std::to_string(kSteps), "--stop-at", "2:" + std::to_string(kStopAt)});
  ASSERT_EQ(launch.wait(60s), 0) << launch.output();
  const std::string out = launch.output();
  EXPECT_HAS(out, "[w2] stopping in step 5");
  EXPECT_HAS(out, "shmps-launch: worker w2 (pid ");
  EXPECT_HAS(out, ") was evicted from the BSP barrier as a straggler (");
  EXPECT_HAS(out, "--kill-stragglers: killing it with SIGKILL");
  EXPECT_HAS(out, "restarting it with the same rank, where it rejoins (straggler restart 1 of 10)");
  EXPECT_HAS(out, "event=straggler_evicted");
  // Every rank finished its steps (the restarted rank 2 all of its own, from its rejoining clock).
  for (int r = 0; r < 3; ++r) EXPECT_HAS(out, "[w" + std::to_string(r) + "] rank " + std::to_string(r) + " steps 20");
  EXPECT_HAS(out, "shmps-launch: job finished");
}

TEST(Stragglers, AWaitingWorkersTimeoutNamesTheWorkerItWaitsForAndWhy) {
  Watchdog watchdog(60s);
  Job job("straggler-msg", kSpec);
  job.start_server({"--straggler-timeout", "30s"});
  job.wait_ready();
  Process& stuck = job.start({"shmps-test-pusher", "steps", "--workers", "2", "--steps", "3", "--stop-at", "1:0"},
                             {{"SHMPS_RANK", "1"}});
  shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 1500ms});
  w.wait_for_workers(2);
  ASSERT_TRUE(wait_for_output(stuck, "stopping in step 0")) << stuck.output();
  std::vector<float> gw(kW, 1.0f), gb(kB, 1.0f);
  w.pull("w", gw);
  w.push("w", gw);
  w.push("b", gb);
  w.clock();
  std::string message;
  try {
    w.pull("w", gw);
  } catch (const shmps::Error& e) {
    message = e.what();
  }
  EXPECT_HAS(message, "pull of 'w' at clock 1 waited 1500 ms for the server to finish step 0");
  EXPECT_HAS(message, "waiting for worker 1 (pid " + std::to_string(stuck.pid()) + "), alive but ");
  EXPECT_HAS(message, " behind in step 0");
  EXPECT_HAS(message, "the server evicts stragglers after 30.0 s (straggler_timeout)");
  EXPECT_HAS(message, "the server is alive and waits for them");
  EXPECT_EQ(message.find("alive but busy"), std::string::npos) << message;
}
