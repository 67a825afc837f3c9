// Worker groups (SINGA's): BSP and SSP hold inside each group of workers_per_group ranks, and the
// groups run asynchronously to each other. Real server and worker processes
// (shmps-test-pusher group-steps, group_steps.cpp says what each worker checks at every step).
//
// The exact checks use SGD with learning rate 1 and small-integer gradients, so that the values
// must equal minus the sum of every committed push, element by element.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <shmps/server/checkpoint.hpp>
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

constexpr std::size_t kW = 3000, kOwn = 100;
constexpr std::uint32_t kSlots = 6;  // three groups of two: ranks 0-1, 2-3 work; rank 5 (group 2) reads

// `workers_per_group` empty: set on the server's command line instead.
std::string spec(const std::string& consistency, const std::string& optimizer, const std::string& workers_per_group) {
  std::string s = "consistency = \"" + consistency + "\"\nslice_bytes = 4096\nmax_workers = " + std::to_string(kSlots) + "\n";
  if (!workers_per_group.empty()) s += "workers_per_group = " + workers_per_group + "\n";
  s += "[optimizer]\n" + optimizer + "\n";
  s += "[[param]]\nname = \"mark\"\nshape = [" + std::to_string(kSlots) + "]\n";
  s += "[[param]]\nname = \"w\"\nshape = [" + std::to_string(kW) + "]\n";
  for (int g = 0; g < 3; ++g) s += "[[param]]\nname = \"own" + std::to_string(g) + "\"\nshape = [" + std::to_string(kOwn) + "]\n";
  return s;
}

std::vector<float> pull(const std::string& segment, const std::string& param, std::size_t size) {
  shmps::Worker reader(shmps::WorkerOptions{.segment = segment, .rank = kSlots - 1});
  std::vector<float> v(size);
  reader.pull(param, v);
  return v;
}

std::vector<Process*> start_workers(Job& job, std::uint64_t workers, std::uint64_t steps,
                                    const std::vector<std::vector<std::string>>& per_rank) {
  std::vector<Process*> ps;
  for (std::uint64_t r = 0; r < workers; ++r) {
    std::vector<std::string> argv{"shmps-test-pusher", "group-steps", "--workers", std::to_string(workers), "--steps",
                                  std::to_string(steps)};
    if (r < per_rank.size()) argv.insert(argv.end(), per_rank[r].begin(), per_rank[r].end());
    ps.push_back(&job.start(argv, {{"SHMPS_RANK", std::to_string(r)}}));
  }
  return ps;
}

// The elements of "w" (shared by every group) that are not exactly minus the sum of pattern(r, k)
// over the steps k < steps that rank r (of 0-3) took part in.
template <class TakesPart>
std::size_t wrong_in_w(const std::string& segment, std::uint64_t steps, TakesPart takes_part) {
  const std::vector<float> w = pull(segment, "w", kW);
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < kW; ++i) {
    double want = 0;
    for (std::uint64_t r = 0; r < 4; ++r)
      for (std::uint64_t k = 0; k < steps; ++k)
        if (takes_part(r, k)) want -= shmps::test::pattern(r, k, i);
    wrong += static_cast<double>(w[i]) != want;
  }
  return wrong;
}

std::uint64_t clock_of(const shm::Segment& seg, std::uint32_t g) { return shm::load_acquire(seg.group(g).clock); }

template <class Pred>
bool wait_until(Pred pred, std::chrono::milliseconds limit) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

}  // namespace

// Two groups of two in BSP. Rank 2 gets stuck in the middle of step 5 (alive): group 0 still
// finishes all its steps while group 1 stays at clock 5, a checkpoint then holds both clocks, and
// once rank 2 is killed group 1 goes on without it. Every worker checks at every step that its
// group's last step held exactly one push of each member; the applied counts per group say the
// same for the whole run; the sums are exact.
TEST(WorkerGroups, EachGroupStepsOnItsOwnAndAStuckWorkerHoldsOnlyItsGroup) {
  Watchdog watchdog(120s);
  Job job("groups", spec("bsp", "kind = \"sgd\"\nlr = 1.0", "2"));
  auto& server = job.start_server();
  job.wait_ready();
  constexpr std::uint64_t kSteps = 30;
  const std::vector<std::string> check{"--check", "--absent", "2:5"};
  std::vector<std::vector<std::string>> per_rank(4, check);
  per_rank[2].insert(per_rank[2].end(), {"--hang-at", "5"});
  per_rank[3].insert(per_rank[3].end(), {"--slow-ms", "2"});
  auto ps = start_workers(job, 4, kSteps, per_rank);

  // Group 0 ends every step while group 1 is held at step 5 by its stuck member.
  EXPECT_EQ(ps[0]->wait(60s), 0) << ps[0]->output();
  EXPECT_EQ(ps[1]->wait(60s), 0) << ps[1]->output();
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  ASSERT_EQ(seg.header().group_count, 3u);
  EXPECT_EQ(clock_of(seg, 0), kSteps);
  ASSERT_TRUE(wait_until([&] { return ps[2]->output().find("hanging in step 5") != std::string::npos; }, 30s));
  EXPECT_EQ(clock_of(seg, 1), 5u) << "group 1 waits for its stuck member, and only for it";
  EXPECT_TRUE(ps[2]->running() && ps[3]->running());

  // A checkpoint now holds each group's clock.
  const std::filesystem::path file =
      std::filesystem::temp_directory_path() / ("shmps-groups-" + std::to_string(::getpid()) + ".safetensors");
  const auto made = shmps::test::run({"shmps-ctl", "checkpoint", job.name(), file.string()});
  ASSERT_EQ(made.code, 0) << made.out << server.output();
  const auto snapshot = shmps::server::read_checkpoint(file);
  EXPECT_EQ(snapshot.group_clocks, (std::vector<std::uint64_t>{kSteps, 5, 0}));
  EXPECT_EQ(snapshot.workers_per_group, 2u);
  EXPECT_EQ(snapshot.model_clock, 5u) << "the slowest clock of the groups with workers (group 2 has none)";
  {
    // Restored into another grouping with as many groups (7 slots in groups of 3): the clocks
    // belong to other ranks there, so every group starts at the model clock.
    std::string regrouped = spec("bsp", "kind = \"sgd\"\nlr = 1.0", "3");
    regrouped.replace(regrouped.find("max_workers = 6"), 15, "max_workers = 7");
    Job other("groups-regroup", regrouped);
    auto& restored = other.start_server({"--restore", file.string()});
    other.wait_ready();
    auto seg3 = shm::Segment::open(other.name(), shm::Access::read_only);
    ASSERT_EQ(seg3.header().group_count, 3u) << restored.output();
    for (std::uint32_t g = 0; g < 3; ++g) EXPECT_EQ(clock_of(seg3, g), 5u) << "group " << g;
  }
  std::filesystem::remove(file);

  // The monitor and the inspector show the groups and their clocks.
  const auto inspect = shmps::test::run({"shmps-ctl", "inspect", job.name()});
  EXPECT_HAS(inspect.out, "groups       3 of 2 workers");
  EXPECT_HAS(inspect.out, "group 0: ranks 0..1, clock 30, 30 steps of 180 pushes");
  EXPECT_HAS(inspect.out, "group 1: ranks 2..3, clock 5, 5 steps of 30 pushes");
  EXPECT_HAS(inspect.out, "group clocks 30, 5, 0");
  const auto workers = shmps::test::run({"shmps-ctl", "workers", job.name()});
  EXPECT_HAS(workers.out, "RANK  GROUP STATUS");
  const auto top = shmps::test::run({"shmps-top", job.name(), "--json"});
  EXPECT_HAS(top.out, "\"workers_per_group\": 2");
  EXPECT_HAS(top.out, "\"group\": 1");

  // Rank 2 dies: its open step is discarded whole, and group 1 goes on without it.
  ps[2]->kill(SIGKILL);
  EXPECT_EQ(ps[3]->wait(60s), 0) << ps[3]->output() << server.output();
  EXPECT_EQ(clock_of(seg, 1), kSteps);

  // Per group: every step applied exactly one push of "mark", "own<g>" and "w" from each member
  // taking part, nothing from another group.
  const shm::GroupEntry& g0 = seg.group(0);
  const shm::GroupEntry& g1 = seg.group(1);
  EXPECT_EQ(shm::load_counter(g0.steps), kSteps);
  EXPECT_EQ(shm::load_counter(g0.records), kSteps * 2 * 3);
  EXPECT_EQ(shm::load_counter(g0.discarded), 0u);
  EXPECT_EQ(shm::load_counter(g1.steps), kSteps);
  EXPECT_EQ(shm::load_counter(g1.records), 5 * 2 * 3 + (kSteps - 5) * 3);
  EXPECT_EQ(shm::load_counter(g1.discarded), 2u) << "rank 2's step-5 pushes of mark and own1";
  EXPECT_EQ(shm::load_counter(seg.group(2).steps), 0u);

  // Exact sums over every group's committed steps.
  const auto takes_part = [](std::uint64_t r, std::uint64_t k) { return !(r == 2 && k >= 5); };
  const std::vector<float> mark = pull(job.name(), "mark", kSlots);
  EXPECT_EQ(mark, (std::vector<float>{30, 30, 5, 30, 0, 0}));
  EXPECT_EQ(wrong_in_w(job.name(), kSteps, takes_part), 0u);
}

// A straggler policy per group (docs/consistency.md#stragglers): rank 2 gets stuck in the middle of
// step 5 (alive, part of its step pushed). With straggler_timeout 2s the server evicts it from
// group 1's barrier, and only from that one: group 1 goes on with rank 3 alone, its step 5 without
// rank 2's pushes (discarded whole), while group 0, which never waited for it, is untouched. Every
// worker checks each step's membership (--check --absent 2:5); the sums are exact.
TEST(WorkerGroups, AStuckWorkerIsEvictedFromItsOwnGroupOnly) {
  Watchdog watchdog(120s);
  Job job("groups-evict", spec("bsp", "kind = \"sgd\"\nlr = 1.0", "2"));
  auto& server = job.start_server({"--straggler-timeout", "2s"});
  job.wait_ready();
  constexpr std::uint64_t kSteps = 20;
  std::vector<std::vector<std::string>> per_rank(4, {"--check", "--absent", "2:5"});
  per_rank[2].insert(per_rank[2].end(), {"--hang-at", "5"});
  auto ps = start_workers(job, 4, kSteps, per_rank);
  for (int r : {0, 1, 3}) EXPECT_EQ(ps[r]->wait(60s), 0) << "rank " << r << ": " << ps[r]->output();
  EXPECT_TRUE(ps[2]->running()) << "the straggler is still there, stuck";

  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  EXPECT_EQ(clock_of(seg, 0), kSteps);
  EXPECT_EQ(clock_of(seg, 1), kSteps) << "group 1 went on without its stuck member";
  EXPECT_EQ(shm::load_counter(seg.header().stragglers_evicted), 1u) << server.output();
  EXPECT_EQ(shm::load_counter(seg.group(0).evictions), 0u);
  EXPECT_EQ(shm::load_counter(seg.group(1).evictions), 1u);
  EXPECT_EQ(shm::load_acquire(seg.slot(2).evicted_generation), shm::load_acquire(seg.slot(2).generation));
  for (std::uint32_t r : {0u, 1u, 3u}) EXPECT_EQ(shm::load_acquire(seg.slot(r).evicted_generation), 0u) << r;
  // Rank 2's open step 5 ("mark" and "own1" pushed, no clock) discarded whole: two records.
  EXPECT_EQ(shm::load_counter(seg.header().records_discarded), 2u);
  EXPECT_HAS(server.output(), "event=straggler_evicted");
  EXPECT_HAS(server.output(), "rank=2 pid=" + std::to_string(ps[2]->pid()));

  EXPECT_EQ(pull(job.name(), "mark", kSlots), (std::vector<float>{20, 20, 5, 20, 0, 0}));
  EXPECT_EQ(wrong_in_w(job.name(), kSteps, [](std::uint64_t r, std::uint64_t k) { return !(r == 2 && k >= 5); }), 0u);
}

// A group's weights depend on its own pushes only: two runs in which the groups run at different
// speeds (group 1 slow, then group 0 slow and uneven) give the same "own0" and "own1" bit for bit,
// with Adam (whose per-slice step count would show a step mixed with another group's) and
// fractional gradients (whose sums would show another summation order). Groups set on the
// server's command line.
TEST(WorkerGroups, AGroupsWeightsAreBitReproducibleWhateverTheOtherGroupDoes) {
  Watchdog watchdog(120s);
  constexpr std::uint64_t kSteps = 25;
  std::vector<float> own[2][2];
  const std::vector<std::vector<std::vector<std::string>>> speeds{
      {{}, {}, {"--slow-ms", "3"}, {"--slow-ms", "3"}},
      {{"--slow-ms", "3"}, {"--slow-ms", "1"}, {}, {}},
  };
  for (int run = 0; run < 2; ++run) {
    Job job("groups-det", spec("bsp", "kind = \"adam\"\nlr = 0.01", ""));
    auto& server = job.start_server({"--workers-per-group", "2"});
    job.wait_ready();
    for (auto* p : start_workers(job, 4, kSteps, speeds[run])) EXPECT_EQ(p->wait(60s), 0) << p->output();
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    EXPECT_EQ(seg.header().workers_per_group, 2u) << server.output();
    EXPECT_EQ(clock_of(seg, 0), kSteps);
    EXPECT_EQ(clock_of(seg, 1), kSteps);
    own[run][0] = pull(job.name(), "own0", kOwn);
    own[run][1] = pull(job.name(), "own1", kOwn);
  }
  for (int g = 0; g < 2; ++g) {
    EXPECT_EQ(std::memcmp(own[0][g].data(), own[1][g].data(), kOwn * sizeof(float)), 0) << "group " << g;
    EXPECT_NE(own[0][g], std::vector<float>(kOwn, 0.0f)) << "the runs trained it";
  }
  EXPECT_NE(own[0][0], own[0][1]) << "the two groups trained different weights";
}

// SSP's bound holds inside a group: a member stuck at clock 3 holds its group-mate within the
// bound, while the other group runs to the end.
TEST(WorkerGroups, SspBoundsHoldInsideAGroupOnly) {
  Watchdog watchdog(120s);
  Job job("groups-ssp", spec("ssp:1", "kind = \"sgd\"\nlr = 1.0", "2"));
  job.start_server();
  job.wait_ready();
  constexpr std::uint64_t kSteps = 20;
  auto ps = start_workers(job, 4, kSteps, {{}, {}, {"--hang-at", "3"}, {}});
  EXPECT_EQ(ps[0]->wait(60s), 0) << ps[0]->output();
  EXPECT_EQ(ps[1]->wait(60s), 0) << ps[1]->output();
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  // Rank 3 may go one clock past its stuck mate (clock 3): it pulls for clock 5 and waits.
  ASSERT_TRUE(wait_until([&] { return shm::load_acquire(seg.slot(3).clock) == 5; }, 30s));
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(shm::load_acquire(seg.slot(3).clock), 5u) << "held by the bound, not by luck";
  EXPECT_TRUE(ps[3]->running());
  ps[2]->kill(SIGKILL);
  EXPECT_EQ(ps[3]->wait(60s), 0) << ps[3]->output();
}
