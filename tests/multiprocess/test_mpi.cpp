// Server groups on several hosts, kept in step over MPI: real `mpirun --oversubscribe` ranks on
// this machine, each with its own replica (<job>.h<K>) as if on its own host.
//
// The exact checks use SGD with learning rate 1 and small-integer gradients (pattern.hpp): after
// `shmps-ctl sync --mpi`, every replica must equal minus the sum of every committed push of every
// rank's workers, element by element, whatever was SIGKILLed on the way. Open MPI ends the whole
// servers job when one rank dies, so a server kill here restarts every rank's server.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <shmps/server/checkpoint_manifest.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/liveness.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/segment.hpp>

#include "../support/exact.hpp"
#include "../support/expect.hpp"
#include "../support/harness.hpp"
#include "../support/pattern.hpp"

using namespace std::chrono_literals;
using shmps::test::expect_exact_sum;
using shmps::test::Job;
using shmps::test::pattern_spec;
using shmps::test::Process;
using shmps::test::Watchdog;
namespace fs = std::filesystem;
namespace shm = shmps::shm;

namespace {

constexpr int kReader = 7;  // pattern_spec(8): slot 7 of every replica reads, the others push

std::string mpirun_path() {
  std::stringstream path(std::getenv("PATH") ? std::getenv("PATH") : "/usr/bin");
  for (std::string dir; std::getline(path, dir, ':');)
    if (::access((dir + "/mpirun").c_str(), X_OK) == 0) return dir + "/mpirun";
  return "mpirun (not found on PATH: install openmpi-bin)";
}

// `ranks` MPI ranks of shmps-server --mpi on this machine, and exact-sum pushers on every rank:
// job-wide rank r pushes through rank r mod ranks's replica, in its slot r / ranks.
class MpiJob {
 public:
  MpiJob(const std::string& tag, std::uint32_t ranks, const std::string& spec_extra = "")
      : job_(tag, pattern_spec(8, spec_extra)), ranks_(ranks) {}

  const std::string& name() const { return job_.name(); }
  const std::string& spec_path() const { return job_.spec_path(); }
  std::string replica(std::uint32_t k) const { return shm::host_replica_name(job_.name(), k); }
  Job& job() { return job_; }

  // mpirun with `ranks` ranks on this machine, then argv.
  std::vector<std::string> mpirun(std::vector<std::string> argv, std::uint32_t ranks = 0) const {
    std::vector<std::string> a{mpirun_path()};
    if (::geteuid() == 0) a.push_back("--allow-run-as-root");  // CI runs as root
    a.insert(a.end(), {"-np", std::to_string(ranks ? ranks : ranks_), "--oversubscribe", "--bind-to", "none"});
    a.insert(a.end(), argv.begin(), argv.end());
    return a;
  }

  // Every rank's server; returns once every replica is ready (with an epoch past the one it had).
  Process& start_servers(std::vector<std::string> extra = {}) {
    std::vector<std::uint64_t> before;
    for (std::uint32_t k = 0; k < ranks_; ++k) before.push_back(shmps::test::server_epoch_of(replica(k)));
    std::vector<std::string> argv{shmps::test::bin("shmps-server"), "--mpi", "--spec", spec_path(), "--name", name(),
                                  "--sync-every", "20ms"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    servers_ = &job_.start(mpirun(argv));
    for (std::uint32_t k = 0; k < ranks_; ++k) wait_ready(k, before[k]);
    return *servers_;
  }
  Process& servers() { return *servers_; }

  // SIGKILL of rank k's server: Open MPI ends the others, and the servers' mpirun exits.
  void kill_server(std::uint32_t k) {
    const auto seg = shm::Segment::open(replica(k), shm::Access::read_only);
    const pid_t pid = static_cast<pid_t>(shm::load_acquire(seg.header().server_pid));
    ASSERT_GT(pid, 0);
    ::kill(pid, SIGKILL);
    EXPECT_NE(servers_->wait(60s), 0) << "mpirun should fail when a rank is killed";
  }
  // SIGTERM to the servers' mpirun: every rank stops (applies what is committed) and leaves.
  // Seen once in a loaded CI run: every rank logged its stop, and mpirun itself still had not
  // exited 60 s later. What the tests check is the servers, so a mpirun left alone after all of
  // them are gone (no rank holds its server lock) is killed and said so; a rank still alive fails.
  void stop_servers() {
    servers_->kill(SIGTERM);
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (servers_->running() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(50ms);
    if (!servers_->running()) {
      servers_->wait(10s);
      return;
    }
    for (std::uint32_t k = 0; k < ranks_; ++k) {
      shm::LockFile probe = shm::LockFile::open_for_probe(shm::server_lock_path(replica(k)));
      EXPECT_NE(probe.probe(0), shm::Holder::alive) << "the server of rank " << k << " did not stop:\n" << servers_->output();
    }
    std::cout << "mpirun had not exited 60 s after its ranks stopped; killed\n";
    servers_->kill(SIGKILL);
    servers_->wait(10s);
  }

  Process& start_pusher(std::uint32_t rank, std::uint64_t pushes, std::uint64_t pause_us = 0) {
    return job_.start({"shmps-test-pusher", "exact", "--pushes", std::to_string(pushes), "--pause-us", std::to_string(pause_us)},
                      {{"SHMPS_SEGMENT", replica(rank % ranks_)},
                       {"SHMPS_RANK", std::to_string(rank / ranks_)},
                       {"SHMPS_GLOBAL_RANK", std::to_string(rank)}});
  }

  shmps::test::Ran ctl(std::vector<std::string> args) {
    args.insert(args.begin(), shmps::test::bin("shmps-ctl"));
    return shmps::test::run(mpirun(args), 180s);
  }
  void sync() {
    const auto synced = ctl({"sync", "--mpi", name()});
    ASSERT_EQ(synced.code, 0) << synced.out;
    EXPECT_HAS(synced.out, "every replica holds the same values");
  }

  // Every replica holds minus the sum of the first pushes[r] pushes of every rank r, no slice is
  // torn, and every replica took part in the sync as home and as requester.
  void expect_every_replica_exact(const std::vector<std::uint64_t>& pushes) {
    for (std::uint32_t k = 0; k < ranks_; ++k) {
      SCOPED_TRACE("replica " + replica(k));
      expect_exact_sum(replica(k), pushes, kReader);
      const auto seg = shm::Segment::open(replica(k), shm::Access::read_only);
      EXPECT_EQ(seg.header().server_group, k);
      EXPECT_EQ(seg.header().server_groups, ranks_);
      const auto& h = seg.header();
      EXPECT_GT(shm::load_counter(h.sync_added), 0u)
          << "sent " << shm::load_counter(h.sync_sent) << " taken " << shm::load_counter(h.sync_taken) << " duplicates "
          << shm::load_counter(h.sync_duplicates) << " rounds " << shm::load_counter(h.sync_rounds);
      EXPECT_GT(shm::load_counter(h.sync_taken), 0u);
      for (std::uint64_t s = 0; s < seg.header().slice_count; ++s)
        EXPECT_EQ(shm::load_acquire(seg.slice(s).version) & 1U, 0u) << "slice " << s;
    }
  }

  ~MpiJob() {
    if (servers_ != nullptr && servers_->running()) stop_servers();
    for (std::uint32_t k = 0; k < ranks_; ++k) shmps::test::remove_segment(replica(k));
  }

 private:
  void wait_ready(std::uint32_t k, std::uint64_t epoch_before) {
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (std::chrono::steady_clock::now() < deadline) {
      try {
        if (shm::Segment::exists(replica(k))) {
          const auto seg = shm::Segment::open(replica(k), shm::Access::read_only);
          if (shm::load_acquire(seg.header().state) == static_cast<std::uint32_t>(shm::SegmentState::ready) &&
              shm::load_acquire(seg.header().server_epoch) > epoch_before)
            return;
        }
      } catch (const shmps::Error&) {
      }
      if (!servers_->running()) FAIL() << "the servers' mpirun exited before " << replica(k) << " was ready:\n" << servers_->output();
      std::this_thread::sleep_for(20ms);
    }
    FAIL() << replica(k) << " not ready within 60 s:\n" << servers_->output();
  }

  Job job_;
  std::uint32_t ranks_;
  Process* servers_ = nullptr;
};

}  // namespace

// 2 and 3 ranks with two pushers each, through SIGKILLs of pushers (restarted with the same rank)
// and of one server rank (Open MPI ends the job; every server restarts from its replica): after a
// final sync, every replica holds every committed push exactly once.
TEST(Mpi, TwoAndThreeRanksLoseNothingThroughKillsOfWorkersAndOfAServerRank) {
  Watchdog watchdog(400s);
  for (const std::uint32_t ranks : {2U, 3U}) {
    SCOPED_TRACE(std::to_string(ranks) + " ranks");
    MpiJob job("mpi" + std::to_string(ranks), ranks);
    job.start_servers();
    const std::uint32_t pushers_n = 2 * ranks;
    constexpr std::uint64_t kPushes = 300;
    std::vector<Process*> pushers;
    for (std::uint32_t r = 0; r < pushers_n; ++r) pushers.push_back(&job.start_pusher(r, kPushes, 4000));
    std::mt19937 rng(20261206 + ranks);
    int server_kills = 0, worker_kills = 0;
    for (int round = 0; round < 6; ++round) {
      std::this_thread::sleep_for(std::chrono::milliseconds(150 + rng() % 150));
      if (round % 3 == 1) {
        job.kill_server(static_cast<std::uint32_t>(rng() % ranks));
        ++server_kills;
        job.start_servers();
      } else {
        const auto r = static_cast<std::uint32_t>(rng() % pushers_n);
        if (!pushers[r]->running()) continue;
        pushers[r]->kill(SIGKILL);
        pushers[r]->wait(10s);
        ++worker_kills;
        pushers[r] = &job.start_pusher(r, kPushes, 4000);
      }
    }
    for (auto* p : pushers) EXPECT_EQ(p->wait(120s), 0) << p->output();
    EXPECT_GE(server_kills, 2);
    EXPECT_GE(worker_kills, 1);
    job.sync();
    job.expect_every_replica_exact(std::vector<std::uint64_t>(pushers_n, kPushes));

    // shmps-top on any host: its group, the sync, and per peer the lag of its slices here.
    const std::string last = job.replica(ranks - 1);
    const auto text = shmps::test::run({"shmps-top", last, "--once"});
    EXPECT_HAS(text.out, "sync        server group " + std::to_string(ranks - 1) + " of " + std::to_string(ranks));
    EXPECT_HAS(text.out, "  peer      group 0: home of ");
    EXPECT_HAS(text.out, "slices here, values from ");
    const auto json = shmps::test::run({"shmps-top", last, "--json"});
    EXPECT_HAS(json.out, "\"peers\": [");
    EXPECT_HAS(json.out, "\"lag_s\": ");
    const auto prom = shmps::test::run({"shmps-top", last, "--prometheus"});
    EXPECT_HAS(prom.out, "shmps_sync_peer_lag_seconds{segment=\"" + last + "\",peer_group=\"0\"} ");
    EXPECT_HAS(prom.out, "shmps_sync_bytes_sent_total{segment=\"" + last + "\"} ");
  }
}

// A checkpoint of every host, taken while the pushers go on (after a sync, with the sync paused
// across the ranks: one consistent cut), the replicas removed, restored, and the pushers
// continued: the job ends at the same exact sums. A damaged part is refused on every rank, and
// nothing is created.
TEST(Mpi, ACheckpointOfEveryHostRestoresAndContinuesToTheExactSums) {
  Watchdog watchdog(300s);
  constexpr std::uint32_t kRanks = 3, kPushers = 6;
  // The pushers push until they are killed after the checkpoint (so, whatever the machine's load,
  // they were pushing while it was taken), then, restored, up to this many more than the most any
  // of them had committed in the checkpoint.
  constexpr std::uint64_t kEndless = 1'000'000, kMore = 100;
  const fs::path dir = fs::temp_directory_path() / ("shmps-mpi-ckpt-" + std::to_string(::getpid()));
  const fs::path damaged = dir.string() + "-damaged";
  {
    MpiJob job("mpickpt", kRanks);
    job.start_servers();
    std::vector<Process*> pushers;
    for (std::uint32_t r = 0; r < kPushers; ++r) pushers.push_back(&job.start_pusher(r, kEndless, 10000));
    std::this_thread::sleep_for(500ms);
    const auto made = job.ctl({"checkpoint", "--mpi", job.name(), dir.string()});
    ASSERT_EQ(made.code, 0) << made.out;
    EXPECT_HAS(made.out, "names 3 parts");
    const shmps::server::Manifest manifest = shmps::server::read_manifest(dir);
    ASSERT_EQ(manifest.ranks, kRanks);
    for (std::uint32_t k = 0; k < kRanks; ++k) EXPECT_EQ(shmps::server::check_part(dir, manifest, k), "");
    for (auto* p : pushers) {
      p->kill(SIGKILL);
      p->wait(10s);
    }
    job.stop_servers();
    for (std::uint32_t k = 0; k < kRanks; ++k) shmps::test::remove_segment(job.replica(k));

    // A part changed after the checkpoint: refused on every rank before anything is created.
    fs::copy(dir, damaged, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
    {
      std::fstream part(damaged / manifest.parts[1].file, std::ios::in | std::ios::out | std::ios::binary);
      part.seekp(-4, std::ios::end);
      part.put('\x7f');
    }
    const auto refused = shmps::test::run(job.mpirun({shmps::test::bin("shmps-server"), "--mpi", "--spec", job.spec_path(),
                                                      "--name", job.name(), "--restore", damaged.string()}),
                                          60s);
    EXPECT_NE(refused.code, 0);
    // Every rank says it (rank 1 why); mpirun may end the others before they print, once one exited.
    EXPECT_TRUE(refused.out.find("the part of rank 1 is missing or damaged") != std::string::npos ||
                refused.out.find("it is damaged or from another checkpoint") != std::string::npos)
        << refused.out;
    for (std::uint32_t k = 0; k < kRanks; ++k) EXPECT_FALSE(shm::Segment::exists(job.replica(k))) << job.replica(k);

    // Restored from the whole checkpoint: the pushers continue after their slots' last push in it.
    job.start_servers({"--restore", dir.string()});
    std::uint64_t most = 0;
    for (std::uint32_t r = 0; r < kPushers; ++r) {
      const auto seg = shm::Segment::open(job.replica(r % kRanks), shm::Access::read_only);
      const std::uint64_t restored = shm::load_acquire(seg.slot(r / kRanks).published);
      EXPECT_GT(restored, 0u) << "rank " << r << " had pushed nothing when the checkpoint was taken";
      most = std::max(most, restored);
    }
    const std::uint64_t pushes = most + kMore;
    pushers.clear();
    for (std::uint32_t r = 0; r < kPushers; ++r) pushers.push_back(&job.start_pusher(r, pushes));
    for (auto* p : pushers) EXPECT_EQ(p->wait(120s), 0) << p->output();
    job.sync();
    job.expect_every_replica_exact(std::vector<std::uint64_t>(kPushers, pushes));
  }
  fs::remove_all(dir);
  fs::remove_all(damaged);
}

// Wrong use gets a clear error: ranks that serve different models, --server-groups with --mpi,
// a restore with another number of ranks.
TEST(Mpi, WrongUseIsRefusedWithAClearError) {
  Watchdog watchdog(120s);
  MpiJob job("mpibad", 2);
  Job other("mpibad-other", pattern_spec(4));
  const std::string server = shmps::test::bin("shmps-server");
  // MPMD: rank 0 with one spec, rank 1 with another.
  std::vector<std::string> mixed = job.mpirun({server, "--mpi", "--spec", job.spec_path(), "--name", job.name()}, 1);
  const std::vector<std::string> second{":", "-np", "1", "--oversubscribe", "--bind-to", "none", server, "--mpi",
                                        "--spec", other.spec_path(), "--name", job.name()};
  mixed.insert(mixed.end(), second.begin(), second.end());
  const auto differ = shmps::test::run(mixed, 60s);
  EXPECT_NE(differ.code, 0);
  EXPECT_HAS(differ.out, "serves another model than rank");
  EXPECT_HAS(differ.out, "give every rank the same model spec");

  const auto groups = shmps::test::run(
      job.mpirun({server, "--mpi", "--server-groups", "2", "--spec", job.spec_path(), "--name", job.name()}), 60s);
  EXPECT_NE(groups.code, 0);
  EXPECT_HAS(groups.out, "--mpi takes the server groups from mpirun (one per rank)");

  const auto no_manifest = shmps::test::run(
      job.mpirun({server, "--mpi", "--spec", job.spec_path(), "--name", job.name(), "--restore", fs::temp_directory_path()}),
      60s);
  EXPECT_NE(no_manifest.code, 0);
  EXPECT_HAS(no_manifest.out, "no manifest here");

  // shmps-launch --mpi --restore whose servers fail before every rank's replica is restored (here:
  // no manifest) is not restarted: a restart would resume from whatever replicas exist.
  job.start_servers();
  job.stop_servers();
  const auto restore_refused = shmps::test::run(
      {shmps::test::bin("shmps-launch"), "--mpi", "--ranks", "2", "--spec", job.spec_path(), "--name", job.name(),
       "--workers", "1", "--restore", fs::temp_directory_path(), "--", "shmps-test-pusher", "exact", "--pushes", "10"},
      120s);
  EXPECT_NE(restore_refused.code, 0);
  EXPECT_HAS(restore_refused.out, "before every rank's replica was restored from");
  EXPECT_HAS(restore_refused.out, "nothing is restarted");
  EXPECT_EQ(restore_refused.out.find("starting every rank's server again"), std::string::npos) << restore_refused.out;
}

// shmps-launch --mpi: servers and each host's workers through mpirun, a server rank SIGKILLed
// mid-job (the launcher restarts the servers' job), a final sync: with --keep, every replica
// holds every push exactly once, and every line of output says which host and rank it comes from.
TEST(Mpi, TheLauncherRidesThroughAServerRankKillAndSyncsAtTheEnd) {
  Watchdog watchdog(240s);
  constexpr std::uint32_t kRanks = 2;
  MpiJob job("mpilaunch", kRanks);
  Process& launch = job.job().start({"shmps-launch", "--mpi", "--ranks", std::to_string(kRanks), "--spec", job.spec_path(),
                                     "--workers", "2", "--keep", "--sync-every", "20ms", "--", "shmps-test-pusher",
                                     "exact", "--pushes", "400", "--pause-us", "4000"});
  const auto seg = shmps::test::map_when_ready(job.replica(1), launch, 60s);
  ASSERT_TRUE(seg.has_value());
  std::this_thread::sleep_for(700ms);
  const pid_t victim = static_cast<pid_t>(shm::load_acquire(seg->header().server_pid));
  ASSERT_GT(victim, 0);
  ::kill(victim, SIGKILL);
  ASSERT_EQ(launch.wait(180s), 0) << launch.output();
  const std::string out = launch.output();
  EXPECT_HAS(out, "starting every rank's server again (restart 1 of 10)");
  EXPECT_HAS(out, "synced the 2 ranks' replicas");
  EXPECT_HAS(out, "/r1 w3] ");
  EXPECT_HAS(out, "shmps-server[");
  EXPECT_HAS(out, "job finished; replicas kept");
  job.expect_every_replica_exact(std::vector<std::uint64_t>(2 * kRanks, 400));
}
