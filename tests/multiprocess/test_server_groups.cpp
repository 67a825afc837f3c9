// Server groups (SINGA's): one job served by S servers, each with its replica (<job>.g<k>), that
// sync slices with each slice's home group. Real server, worker and tool processes.
//
// The exact checks use SGD with learning rate 1 and small-integer gradients (pattern.hpp): after
// `shmps-ctl sync`, every replica must equal minus the sum of every committed push of every
// group, element by element, whatever was SIGKILLed on the way.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <shmps/server/checkpoint.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/exact.hpp"
#include "../support/expect.hpp"
#include "../support/harness.hpp"
#include "../support/mlp_spec.hpp"
#include "../support/pattern.hpp"

using namespace std::chrono_literals;
using shmps::test::expect_exact_sum;
using shmps::test::Job;
using shmps::test::pattern_spec;
using shmps::test::Process;
using shmps::test::Watchdog;
namespace shm = shmps::shm;

namespace {

constexpr int kReader = 7;  // pattern_spec(8): slot 7 of every replica reads, the others push

using shmps::test::kMlpSpec;

// A job with S server groups: the servers of its groups, and exact-sum pushers; rank r pushes
// through group r mod S, in its slot r / S, with its job-wide rank as the pattern's rank.
class ServerGroups {
 public:
  ServerGroups(const std::string& tag, std::uint32_t groups, const std::string& spec_extra = "",
               std::vector<std::string> server_args = {"--sync-every", "20ms"})
      : job_(tag, pattern_spec(8, spec_extra)), groups_(groups), server_args_(std::move(server_args)), servers_(groups) {}

  std::string replica(std::uint32_t g) const { return shm::replica_name(job_.name(), g); }
  const std::string& name() const { return job_.name(); }
  Job& job() { return job_; }

  Process& start_server(std::uint32_t g, std::vector<std::pair<std::string, std::string>> env = {},
                        std::vector<std::string> extra = {}) {
    const std::uint64_t epoch_before = shmps::test::server_epoch_of(replica(g));
    std::vector<std::string> args{"--server-groups", std::to_string(groups_), "--server-group", std::to_string(g)};
    args.insert(args.end(), server_args_.begin(), server_args_.end());
    args.insert(args.end(), extra.begin(), extra.end());
    servers_[g] = &job_.start_server(args, std::move(env));
    if (env.empty() || env.front().first != "SHMPS_KILL_AT") shmps::test::wait_segment_ready(replica(g), *servers_[g], epoch_before);
    return *servers_[g];
  }
  void start_all(std::vector<std::string> extra = {}) {
    for (std::uint32_t g = 0; g < groups_; ++g) start_server(g, {}, extra);
  }
  Process& server(std::uint32_t g) { return *servers_[g]; }

  Process& start_pusher(std::uint32_t rank, std::uint64_t pushes, std::uint64_t pause_us = 0) {
    return job_.start({"shmps-test-pusher", "exact", "--pushes", std::to_string(pushes), "--pause-us", std::to_string(pause_us)},
                      {{"SHMPS_SEGMENT", replica(rank % groups_)},
                       {"SHMPS_RANK", std::to_string(rank / groups_)},
                       {"SHMPS_GLOBAL_RANK", std::to_string(rank)}});
  }

  // shmps-ctl sync: every replica made equal.
  void sync() {
    const auto synced = shmps::test::run({"shmps-ctl", "sync", name()}, 60s);
    ASSERT_EQ(synced.code, 0) << synced.out;
    EXPECT_HAS(synced.out, "every replica holds the same values");
  }

  // Every replica holds minus the sum of the first pushes[r] pushes of every rank r, and no slice
  // is torn. (Slices may be in flight: the groups go on refreshing slices nobody changes.)
  void expect_every_replica_exact(const std::vector<std::uint64_t>& pushes) {
    for (std::uint32_t g = 0; g < groups_; ++g) {
      SCOPED_TRACE("replica " + replica(g));
      expect_exact_sum(replica(g), pushes, kReader);
      auto seg = shm::Segment::open(replica(g), shm::Access::read_only);
      for (std::uint64_t s = 0; s < seg.header().slice_count; ++s)
        EXPECT_EQ(shm::load_acquire(seg.slice(s).version) & 1U, 0u) << "slice " << s;
    }
  }

 private:
  Job job_;
  std::uint32_t groups_;
  std::vector<std::string> server_args_;
  std::vector<Process*> servers_;
};

}  // namespace

// Two groups, four pushers, no failure: after a sync both replicas hold every push exactly; the
// slices are spread over the groups and inspect shows it; a checkpoint of the job is one file,
// from which a new job of two groups starts with both replicas equal to it.
TEST(ServerGroups, TwoGroupsConvergeToTheExactSumAndCheckpointAsOneFile) {
  Watchdog watchdog(120s);
  ServerGroups job("sgroups2", 2);
  job.start_all();
  std::vector<Process*> pushers;
  for (std::uint32_t r = 0; r < 4; ++r) pushers.push_back(&job.start_pusher(r, 150));
  for (auto* p : pushers) EXPECT_EQ(p->wait(60s), 0) << p->output();
  job.sync();
  job.expect_every_replica_exact({150, 150, 150, 150});

  // Both groups did work as home: each added the other's deltas.
  for (std::uint32_t g = 0; g < 2; ++g) {
    auto seg = shm::Segment::open(job.replica(g), shm::Access::read_only);
    EXPECT_GT(shm::load_counter(seg.header().sync_added), 0u) << "group " << g;
    EXPECT_GT(shm::load_counter(seg.header().sync_taken), 0u) << "group " << g;
  }
  const auto inspect = shmps::test::run({"shmps-ctl", "inspect", job.replica(1)});
  EXPECT_HAS(inspect.out, "server group 1 of 2, home of 4 of 9 slices");
  EXPECT_HAS(inspect.out, "homes 0,1,0,1,0,1,0,1");
  const auto top = shmps::test::run({"shmps-top", job.replica(1), "--json"});
  EXPECT_HAS(top.out, "\"server_groups\": {");
  EXPECT_HAS(top.out, "\"home_slices\": 4");
  EXPECT_HAS(top.out, "\"deltas_added\": ");
  const auto top_text = shmps::test::run({"shmps-top", job.replica(0), "--once"});
  EXPECT_HAS(top_text.out, "sync        server group 0 of 2, home of 5 slices");
  const auto destroy_live = shmps::test::run({"shmps-ctl", "destroy", job.name()});
  EXPECT_NE(destroy_live.code, 0);
  EXPECT_HAS(destroy_live.out, "is alive: stop the job's servers first, or pass --force; nothing was removed");
  const auto of_job = shmps::test::run({"shmps-ctl", "inspect", job.name()});
  EXPECT_NE(of_job.code, 0);
  EXPECT_HAS(of_job.out, "is a job with 2 server groups: inspect one of its replicas");

  // One checkpoint file for the job (synced first), restored into every group of a new job.
  const std::filesystem::path file =
      std::filesystem::temp_directory_path() / ("shmps-sgroups-" + std::to_string(::getpid()) + ".safetensors");
  const auto made = shmps::test::run({"shmps-ctl", "checkpoint", job.name(), file.string()}, 60s);
  ASSERT_EQ(made.code, 0) << made.out;
  {
    ServerGroups restored("sgroups2-restored", 2);
    restored.start_all({"--restore", file.string()});
    restored.expect_every_replica_exact({150, 150, 150, 150});
  }
  std::filesystem::remove(file);
}

// Three groups through SIGKILLs of servers (any of them, at any moment, also mid-sync) and of
// pushers, each restarted: after a final sync all three replicas hold every committed push
// exactly once.
TEST(ServerGroups, ThreeGroupsLoseNothingThroughServerAndWorkerKills) {
  Watchdog watchdog(200s);
  constexpr std::uint32_t kGroups = 3, kRanks = 6;
  constexpr std::uint64_t kPushes = 400;
  ServerGroups job("sgroups3", kGroups, "", {"--sync-every", "5ms"});
  job.start_all();
  std::vector<Process*> pushers;
  for (std::uint32_t r = 0; r < kRanks; ++r) pushers.push_back(&job.start_pusher(r, kPushes, 5000));
  std::mt19937 rng(20261206);
  int server_kills = 0, worker_kills = 0;
  const auto all_done = [&] {
    for (auto* p : pushers)
      if (p->running()) return false;
    return true;
  };
  for (int round = 0; round < 14 && !all_done(); ++round) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100 + rng() % 150));
    if (round % 2 == 0) {
      const auto g = static_cast<std::uint32_t>(rng() % kGroups);
      job.server(g).kill(SIGKILL);
      job.server(g).wait(10s);
      ++server_kills;
      job.start_server(g);
    } else {
      const auto r = static_cast<std::uint32_t>(rng() % kRanks);
      if (!pushers[r]->running()) continue;
      pushers[r]->kill(SIGKILL);
      pushers[r]->wait(10s);
      ++worker_kills;
      pushers[r] = &job.start_pusher(r, kPushes, 5000);
    }
  }
  for (auto* p : pushers) EXPECT_EQ(p->wait(120s), 0) << p->output();
  EXPECT_GE(server_kills, 3);
  job.sync();
  job.expect_every_replica_exact(std::vector<std::uint64_t>(kRanks, kPushes));
}

// A server killed at each step of the sync protocol (adding a delta halfway, taking an answer
// halfway, before a delta's record is sent, before an answer is sent) and restarted: nothing is
// lost or added twice, and what it was writing is repaired (no torn slice, no redo entry left).
TEST(ServerGroups, KilledAtEveryPointOfTheSyncAndRestartedNothingIsLostOrDoubled) {
  Watchdog watchdog(240s);
  for (const char* point : {"sync.mid_add", "sync.mid_take", "sync.before_send", "sync.before_answer"}) {
    SCOPED_TRACE(point);
    ServerGroups job("sgroups-kp", 2, "", {"--sync-every", "2ms"});
    job.start_server(0);
    Process& doomed = job.start_server(1, {{"SHMPS_KILL_AT", std::string(point) + ":3"}});
    shmps::test::wait_segment_ready(job.replica(1), doomed, 0);
    std::vector<Process*> pushers;
    for (std::uint32_t r = 0; r < 4; ++r) pushers.push_back(&job.start_pusher(r, 90, 2000));
    EXPECT_EQ(doomed.wait(60s), 128 + SIGKILL) << "the kill point was not reached:\n" << doomed.output();
    {
      auto seg = shm::Segment::open(job.replica(1), shm::Access::read_only);
      bool mid_write = false;
      for (std::uint32_t e = 0; e < seg.header().redo_count; ++e)
        mid_write |= shm::load_acquire(const_cast<shm::Segment&>(seg).redo(e).valid) != 0;
      const bool writes_a_slice = std::string(point).find("mid_") != std::string::npos;
      EXPECT_EQ(mid_write, writes_a_slice) << "a kill mid-write leaves its redo entry for the next server";
    }
    job.start_server(1);
    for (auto* p : pushers) EXPECT_EQ(p->wait(60s), 0) << p->output();
    job.sync();
    job.expect_every_replica_exact({90, 90, 90, 90});
    auto seg = shm::Segment::open(job.replica(1), shm::Access::read_only);
    for (std::uint32_t e = 0; e < seg.header().redo_count; ++e)
      EXPECT_EQ(shm::load_acquire(const_cast<shm::Segment&>(seg).redo(e).valid), 0u) << "redo entry " << e;
  }
}

// BSP with server groups: synced values go in only at a step boundary, so a worker's zero-copy
// view stays what it pulled for its whole step (the pusher checks every element against a
// copy), and the final sums are exact on both replicas.
TEST(ServerGroups, BspViewsStayConsistentWhileGroupsSync) {
  Watchdog watchdog(120s);
  ServerGroups job("sgroups-bsp", 2, "consistency = \"bsp\"\n", {"--sync-every", "2ms"});
  job.start_all();
  constexpr std::uint64_t kSteps = 15;
  std::vector<Process*> workers;
  for (std::uint32_t r = 0; r < 4; ++r)
    workers.push_back(&job.job().start({"shmps-test-pusher", "views", "--steps", std::to_string(kSteps), "--slow-ms", "3"},
                                       {{"SHMPS_SEGMENT", job.replica(r % 2)}, {"SHMPS_RANK", std::to_string(r / 2)}}));
  for (auto* w : workers) {
    EXPECT_EQ(w->wait(60s), 0) << w->output();
    EXPECT_HAS(w->output(), "view_mismatches 0");
  }
  job.sync();
  // Each group's ranks 0 and 1 pushed pattern(rank, step) to the whole of "w" and "b" every step.
  for (std::uint32_t g = 0; g < 2; ++g) {
    shmps::Worker reader(shmps::WorkerOptions{.segment = job.replica(g), .rank = kReader});
    std::vector<float> w(shmps::test::kPatternW);
    reader.pull("w", w);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < w.size(); ++i) {
      double want = 0;
      for (std::uint64_t r = 0; r < 2; ++r)
        for (std::uint64_t k = 0; k < kSteps; ++k) want -= 2 * shmps::test::pattern(r, k, i);
      wrong += static_cast<double>(w[i]) != want;
    }
    EXPECT_EQ(wrong, 0u) << "replica " << g;
  }
}

// Wrong use gets a clear error and changes nothing.
TEST(ServerGroups, WrongUseIsRefusedWithAClearMessage) {
  Watchdog watchdog(60s);
  Job plain("sgroups-plain", pattern_spec(8));
  plain.start_server();
  plain.wait_ready();
  const auto no_groups = shmps::test::run({"shmps-ctl", "sync", plain.name()});
  EXPECT_NE(no_groups.code, 0);
  EXPECT_HAS(no_groups.out, "has no server groups: there is nothing to sync");

  const auto bad_group = shmps::test::run({"shmps-server", "--spec", plain.spec_path(), "--server-groups", "2", "--server-group", "2"});
  EXPECT_NE(bad_group.code, 0);
  EXPECT_HAS(bad_group.out, "--server-group 2 must be below --server-groups 2");

  Job bsp("sgroups-bspg", pattern_spec(8, "consistency = \"bsp\"\nworkers_per_group = 2\n"));
  const auto groups_in_groups = shmps::test::run({"shmps-server", "--spec", bsp.spec_path(), "--server-groups", "2"});
  EXPECT_NE(groups_in_groups.code, 0);
  EXPECT_HAS(groups_in_groups.out, "server groups in BSP need one worker group per server group");
  EXPECT_FALSE(shm::Segment::exists(shm::replica_name(bsp.name(), 0)));

  const auto reserved = shmps::test::run({"shmps-server", "--spec", plain.spec_path(), "--name", "x.sync"});
  EXPECT_NE(reserved.code, 0);
  EXPECT_HAS(reserved.out, "ends in '.sync', which shmps keeps for the sync segments");
}

// shmps-launch --server-groups 2: one server per group, rank r at group r mod 2 (its job-wide rank
// given to the worker), a SIGKILLed server started again by the launcher, and a final sync before
// the job ends: every replica holds every push exactly.
TEST(ServerGroups, TheLauncherStartsTheGroupsRestartsAKilledServerAndSyncsAtTheEnd) {
  Watchdog watchdog(120s);
  Job job("sgroups-launch", pattern_spec(8));
  Process launch({"shmps-launch", "--spec", job.spec_path(), "--name", job.name(), "--workers", "4", "--server-groups",
                  "2", "--sync-every", "5ms", "--keep", "--", "shmps-test-pusher", "exact", "--pushes", "300",
                  "--pause-us", "4000"});
  const std::string g1 = shm::replica_name(job.name(), 1);
  auto seg = shmps::test::map_when_ready(g1, launch);
  ASSERT_TRUE(seg.has_value());
  std::this_thread::sleep_for(300ms);
  const pid_t first = shm::load_acquire(seg->header().server_pid);
  ASSERT_GT(first, 0);
  ::kill(first, SIGKILL);
  ASSERT_EQ(launch.wait(100s), 0) << launch.output();
  const std::string out = launch.output();
  EXPECT_HAS(out, "the server of group 1 was killed by signal 9");
  EXPECT_HAS(out, "starting it again (restart 1 of 10)");
  EXPECT_HAS(out, "synced the 2 server groups of '" + job.name() + "'");
  EXPECT_NE(shm::load_acquire(seg->header().server_pid), first) << "a new server serves group 1";
  for (std::uint32_t g = 0; g < 2; ++g) {
    SCOPED_TRACE("replica " + std::to_string(g));
    expect_exact_sum(shm::replica_name(job.name(), g), {300, 300, 300, 300}, kReader);
  }
  // --keep kept the replicas; shmps-ctl destroy of the job removes all of them, sync segments too.
  const auto destroyed = shmps::test::run({"shmps-ctl", "destroy", job.name()});
  EXPECT_EQ(destroyed.code, 0) << destroyed.out;
  for (std::uint32_t g = 0; g < 2; ++g) {
    shmps::test::expect_no_files(shm::replica_name(job.name(), g));
    EXPECT_FALSE(std::filesystem::exists(shm::segment_path(shm::sync_segment_name(job.name(), g))));
  }
}

// A put (rank 0 of the job sets a parameter's first values, as DDP broadcasts rank 0's model)
// reaches every replica: group 1's worker puts "big" (init = "put"), and a reader of group 0,
// whose pulls wait for the put, gets exactly those values: the slices homed at group 0 through
// group 1's deltas, the others through group 0's periodic refresh of slices it does not change.
TEST(ServerGroups, APutReachesEveryReplica) {
  Watchdog watchdog(60s);
  ServerGroups job("sgroups-put", 2, "[[param]]\nname = \"big\"\nshape = [300000]\ninit = \"put\"\n");
  job.start_all();
  // Before the put, the groups' periodic refreshes (every second here) must not make "big" look
  // written: its slices stay at version 0 in both replicas, so that pulls of it still wait.
  std::this_thread::sleep_for(1500ms);
  for (std::uint32_t g = 0; g < 2; ++g) {
    auto seg = shm::Segment::open(job.replica(g), shm::Access::read_only);
    const shm::ParamEntry& big = seg.param(static_cast<std::uint64_t>(seg.find_param("big")));
    for (std::uint64_t k = 0; k < big.slice_count; ++k)
      EXPECT_EQ(shm::load_acquire(seg.slice(big.first_slice + k).version), 0u) << "replica " << g << " slice " << k;
    EXPECT_GT(shm::load_counter(seg.header().sync_sent), 0u) << "the refreshes did run";
  }
  auto& putter = job.job().start({"shmps-test-pusher", "put"}, {{"SHMPS_SEGMENT", job.replica(1)}, {"SHMPS_RANK", "0"}});
  ASSERT_EQ(putter.wait(30s), 0) << putter.output();
  for (std::uint32_t g = 0; g < 2; ++g) {
    shmps::Worker reader(shmps::WorkerOptions{.segment = job.replica(g), .rank = kReader});
    std::vector<float> big(300000);
    reader.pull("big", big);  // waits for every slice to have a version: the put, synced
    std::size_t wrong = 0;
    for (std::size_t k = 0; k < big.size(); ++k) wrong += big[k] != 1.0f + static_cast<float>(k % 97);
    EXPECT_EQ(wrong, 0u) << "replica " << g;
  }
}

// The example trainer with two server groups in BSP: each group's start barrier waits for its own
// workers (SHMPS_GROUP_SIZE), the data is sharded by the job-wide rank, and the job ends synced.
TEST(ServerGroups, TheTrainerRunsInBspWithTwoServerGroups) {
#if defined(SHMPS_SANITIZER_BUILD)
  GTEST_SKIP() << "the Eigen trainer runs ~100x slower under sanitizers; the pusher tests above cover the protocol";
#endif
  Watchdog watchdog(120s);
  Job job("sgroups-mlp", kMlpSpec);
  Process launch({"shmps-launch", "--spec", job.spec_path(), "--name", job.name(), "--workers", "4", "--server-groups",
                  "2", "--consistency", "bsp", "--samples", "20000"});
  ASSERT_EQ(launch.wait(100s), 0) << launch.output();
  const std::string out = launch.output();
  EXPECT_HAS(out, "[w0] waiting for all 2 workers to join step 0");
  EXPECT_HAS(out, "[w1] segment " + shm::replica_name(job.name(), 1) + " (bsp), worker 1/4");
  EXPECT_HAS(out, "[w3] segment " + shm::replica_name(job.name(), 1) + " (bsp), worker 3/4");
  EXPECT_HAS(out, "synced the 2 server groups");
  EXPECT_HAS(out, "job finished; segments removed");
  shmps::test::expect_no_files(shm::replica_name(job.name(), 0));
  shmps::test::expect_no_files(shm::replica_name(job.name(), 1));
  EXPECT_FALSE(std::filesystem::exists(shm::segment_path(shm::sync_segment_name(job.name(), 1))));
}

// On a machine with several NUMA nodes the launcher binds each server group's server and workers
// to one node. This machine has one, so a topology of two single-CPU nodes is given
// (SHMPS_NUMA_TOPOLOGY): group 0's worker must run on CPU 0 only, group 1's on CPU 1 only.
TEST(ServerGroups, TheLauncherBindsEachGroupToANumaNode) {
  Watchdog watchdog(60s);
  Job job("sgroups-numa", pattern_spec(8));
  Process launch({"/usr/bin/env", "SHMPS_NUMA_TOPOLOGY=0:0;1:1", shmps::test::bin("shmps-launch"), "--spec",
                  job.spec_path(), "--name", job.name(), "--workers", "2", "--server-groups", "2", "--", "/bin/grep",
                  "Cpus_allowed_list", "/proc/self/status"});
  ASSERT_EQ(launch.wait(60s), 0) << launch.output();
  const std::string out = launch.output();
  EXPECT_HAS(out, "server group 0 and its workers run on NUMA node 0 (cpus 0)");
  EXPECT_HAS(out, "server group 1 and its workers run on NUMA node 1 (cpus 1)");
  EXPECT_HAS(out, "[w0] Cpus_allowed_list:\t0\n");
  EXPECT_HAS(out, "[w1] Cpus_allowed_list:\t1\n");
}

// A sync round whose deltas do not fit the rings (a 12 MiB parameter: each group sends about 6 MiB
// of deltas into 4 MiB rings, both at once): answers travel apart from deltas, so neither home
// waits on the other for room, and the job ends synced and exact.
TEST(ServerGroups, DeltasBiggerThanTheRingsDoNotDeadlockTheGroups) {
  Watchdog watchdog(120s);
  ServerGroups job("sgroups-big", 2, "[[param]]\nname = \"u\"\nshape = [3000000]\n", {"--sync-every", "1ms"});
  job.start_all();
  std::vector<Process*> pushers;
  for (std::uint32_t r = 0; r < 2; ++r)
    pushers.push_back(&job.job().start({"shmps-test-pusher", "uniform", "--pushes", "12"},
                                       {{"SHMPS_SEGMENT", job.replica(r)}, {"SHMPS_RANK", "0"}}));
  for (auto* p : pushers) EXPECT_EQ(p->wait(60s), 0) << p->output();
  job.sync();
  for (std::uint32_t g = 0; g < 2; ++g) {
    shmps::Worker reader(shmps::WorkerOptions{.segment = job.replica(g), .rank = kReader});
    std::vector<float> u(3000000);
    reader.pull("u", u);
    EXPECT_EQ(std::count(u.begin(), u.end(), -24.0f), static_cast<long>(u.size())) << "replica " << g;
    auto seg = shm::Segment::open(job.replica(g), shm::Access::read_only);
    EXPECT_GT(shm::load_counter(seg.header().sync_added), 0u);
  }
}
