// Real processes: shmps-server and several shmps-test-pusher workers on one segment.
//
// The exact-sum check (ARCHITECTURE.md invariant 1): SGD with learning rate 1 and small-integer
// gradients keeps float sums exact, so the final values must equal minus the sum of every
// committed push, element by element — nothing lost, nothing applied twice.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
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

using shmps::test::expect_exact_sum;
using shmps::test::pattern_spec;

TEST(MultiProcess, FourWorkersPushingKnownGradientsGiveTheExactSum) {
  Watchdog watchdog(90s);
  Job job("exact", pattern_spec());
  job.start_server();
  job.wait_ready();
  constexpr std::uint64_t kPushes = 150;
  std::vector<Process*> workers;
  for (int r = 0; r < 4; ++r)
    workers.push_back(&job.start({"shmps-test-pusher", "exact", "--pushes", std::to_string(kPushes)},
                                 {{"SHMPS_RANK", std::to_string(r)}}));
  for (auto* w : workers) EXPECT_EQ(w->wait(60s), 0) << w->output();
  expect_exact_sum(job.name(), std::vector<std::uint64_t>(4, kPushes));

  // Every slot reports its pushes applied, and the server counted each exactly once.
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  for (unsigned r = 0; r < 4; ++r) {
    EXPECT_EQ(shmps::shm::load_acquire(seg.slot(r).published), kPushes);
    EXPECT_EQ(shmps::shm::load_acquire(seg.slot(r).applied), kPushes);
  }
  EXPECT_EQ(shmps::shm::load_counter(seg.header().records_applied), 4 * kPushes);
}

TEST(MultiProcess, PullsDuringHeavyPushingNeverReturnATornSlice) {
  Watchdog watchdog(90s);
  // Eight slices of all-ones pushes: at every version v a slice holds -v everywhere, so a pull
  // that mixes two versions is caught element by element.
  Job job("torn", R"(
slice_bytes = 65536
max_workers = 8
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "u"
shape = [131072]
)");
  job.start_server();
  job.wait_ready();
  auto& pusher0 = job.start({"shmps-test-pusher", "uniform", "--pushes", "1500"}, {{"SHMPS_RANK", "0"}});
  auto& pusher1 = job.start({"shmps-test-pusher", "uniform", "--pushes", "1500"}, {{"SHMPS_RANK", "1"}});
  auto& puller0 = job.start({"shmps-test-pusher", "puller", "--millis", "2000"}, {{"SHMPS_RANK", "2"}});
  auto& puller1 = job.start({"shmps-test-pusher", "puller", "--millis", "2000"}, {{"SHMPS_RANK", "3"}});
  EXPECT_EQ(pusher0.wait(60s), 0) << pusher0.output();
  EXPECT_EQ(pusher1.wait(60s), 0) << pusher1.output();
  EXPECT_EQ(puller0.wait(60s), 0) << puller0.output();
  EXPECT_EQ(puller1.wait(60s), 0) << puller1.output();
  // The pullers checked real, moving data: they saw versions above zero.
  for (auto* puller : {&puller0, &puller1}) {
    const std::string out = puller->output();
    EXPECT_NE(out.find("torn 0"), std::string::npos) << out;
    const auto at = out.find("max_version ");
    ASSERT_NE(at, std::string::npos) << out;
    EXPECT_GT(std::stoull(out.substr(at + 12)), 0u) << out;
  }
  shmps::Worker reader(shmps::WorkerOptions{.segment = job.name(), .rank = 4});
  std::vector<float> u(131072);
  EXPECT_EQ(reader.pull("u", u), 3000u);
  for (float x : u) ASSERT_EQ(x, -3000.0f);
}

TEST(MultiProcess, AKilledWorkerBlocksNobodyAndItsCommittedPushesCountExactlyOnce) {
  Watchdog watchdog(90s);
  Job job("kill", pattern_spec());
  job.start_server();
  job.wait_ready();
  auto& victim = job.start({"shmps-test-pusher", "exact", "--pushes", "1000000"}, {{"SHMPS_RANK", "0"}});
  auto& survivor = job.start({"shmps-test-pusher", "exact", "--pushes", "400"}, {{"SHMPS_RANK", "1"}});
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  // Kill the victim mid-stream, once it has pushed something.
  const auto start = std::chrono::steady_clock::now();
  while (shmps::shm::load_acquire(seg.slot(0).published) < 50 && std::chrono::steady_clock::now() - start < 20s)
    std::this_thread::sleep_for(1ms);
  victim.kill(SIGKILL);
  EXPECT_EQ(victim.wait(10s), 128 + SIGKILL);

  // The server proves the death from the kernel's lock within its detection time.
  const auto killed_at = std::chrono::steady_clock::now();
  while (shmps::shm::load_acquire(seg.slot(0).dead_generation) != shmps::shm::load_acquire(seg.slot(0).generation) &&
         std::chrono::steady_clock::now() - killed_at < 5s)
    std::this_thread::sleep_for(5ms);
  EXPECT_EQ(shmps::shm::load_acquire(seg.slot(0).dead_generation), shmps::shm::load_acquire(seg.slot(0).generation));
  EXPECT_LT(std::chrono::steady_clock::now() - killed_at, 1s);

  EXPECT_EQ(survivor.wait(60s), 0) << survivor.output();
  // Every push the victim committed is in its ring or applied; the server drains the ring.
  while (shmps::shm::load_acquire(seg.ring(0).head) != shmps::shm::load_acquire(seg.ring(0).tail))
    std::this_thread::sleep_for(1ms);
  const std::uint64_t victim_applied = shmps::shm::load_acquire(seg.slot(0).applied);
  EXPECT_GE(victim_applied, 50u);
  EXPECT_GE(victim_applied, shmps::shm::load_acquire(seg.slot(0).published));
  expect_exact_sum(job.name(), {victim_applied, 400});

  // A restarted worker takes over slot 0, with a new generation, and continues the count.
  const std::uint64_t old_generation = shmps::shm::load_acquire(seg.slot(0).generation);
  shmps::Worker restarted(shmps::WorkerOptions{.segment = job.name(), .rank = 0});
  EXPECT_EQ(restarted.published(), victim_applied);
  EXPECT_EQ(shmps::shm::load_acquire(seg.slot(0).generation), old_generation + 1);
}

TEST(MultiProcess, AStoppedServerLeavesTheSegmentAndARestartedOneResumesIt) {
  Watchdog watchdog(90s);
  Job job("restart", pattern_spec());
  job.start_server();
  job.wait_ready();
  auto& first = job.start({"shmps-test-pusher", "exact", "--pushes", "60"}, {{"SHMPS_RANK", "0"}});
  EXPECT_EQ(first.wait(60s), 0) << first.output();
  job.server().kill(SIGTERM);
  EXPECT_EQ(job.server().wait(20s), 0) << job.server().output();
  const std::uint64_t created = [&] {
    auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
    return seg.header().created_unix_ns;
  }();

  job.start_server();
  job.wait_ready();
  // Resumed, not made anew: the segment is the one the first server created (its header says
  // so; the server's "recovered=true" is only in its log, written after "ready").
  {
    auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
    EXPECT_EQ(seg.header().created_unix_ns, created);
  }
  // Rank 0 comes back and continues its sequence; the sum covers both lives.
  auto& second = job.start({"shmps-test-pusher", "exact", "--pushes", "30"}, {{"SHMPS_RANK", "1"}});
  EXPECT_EQ(second.wait(60s), 0) << second.output();
  expect_exact_sum(job.name(), {60, 30});
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  EXPECT_EQ(shmps::shm::load_acquire(seg.header().server_epoch), 2u);
}

// fork() after attach (a data-loader process): the child's inherited Worker refuses every call
// and its destructor leaves the parent's slot alone (state, lock). The Python suite also checks
// that a parent killed while its forked child lives on frees its slot (tests/python/test_fork.py).
TEST(MultiProcess, AChildForkedAfterAttachCanNeitherUseNorReleaseTheParentsSlot) {
  Watchdog watchdog(60s);
  Job job("fork", pattern_spec());
  job.start_server();
  job.wait_ready();
  auto parent = std::make_unique<shmps::Worker>(shmps::WorkerOptions{.segment = job.name(), .rank = 0});
  const std::vector<float> ones(7, 1.0f);
  const pid_t child = fork();
  if (child == 0) {
    int code = 0;
    try {
      parent->push("b", ones);
      code = 10;
    } catch (const shmps::Error& e) {
      if (std::string(e.what()).find("forked from it") == std::string::npos) code = 11;
    }
    parent.reset();  // the destructor: must not leave the slot or unlock the parent's lock
    _exit(code);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  EXPECT_EQ(shmps::shm::load_acquire(seg.slot(0).state), static_cast<std::uint32_t>(shmps::shm::SlotState::attached));
  EXPECT_THROW(shmps::Worker(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 1s}), shmps::Error);
  parent->wait_applied(parent->push("b", ones));
  EXPECT_EQ(parent->published(), 1u);
}
