// The soak: the chaos run (test_crash.cpp) made long and busier. For SHMPS_SOAK_SECONDS (default
// 20: the suite's smoke version; RELIABILITY.md records a 1-hour run):
// - four shmps-test-pusher workers push the exact-sum pattern (tests/support/pattern.hpp);
// - a driver SIGKILLs a random worker every 30-300 ms and restarts it with the same rank;
// - it SIGKILLs the server every 1 s to max(4 s, duration / 120) and starts a new one on the
//   same segment; the server runs with --checkpoint-dir and --checkpoint-every 7s, so it also
//   dies in the middle of writing checkpoints;
// - it asks for a checkpoint (shmps-ctl checkpoint) every 2-8 s;
// - the pushers call clock() after every push (--clock-every 1), and the driver switches
//   consistency live (shmps-ctl set consistency=asp|ssp:N|bsp) every 3-10 s; a BSP window lasts
//   0.3-1.5 s, without worker kills (a worker killed in BSP has its open step discarded, by
//   design, which the exact-sum pushers cannot know); SHMPS_SOAK_BSP=0 leaves BSP out;
// - it attaches a monitor every 0.5-3 s: shmps-top --json or --prometheus, shmps-ctl inspect or
//   workers, or a shmps-top --listen (Prometheus over HTTP) that stays until the next one;
// - at the end every pusher finishes up to what its slot committed, and the sum must be exact;
//   the server's anonymous memory (RssAnon) after the last checkpoint must not be above the one
//   after the warm-up's by more than 16 MiB; the server stops gracefully, the newest checkpoint
//   reads back valid, no temporary checkpoint file is left, `shmps-ctl destroy` leaves no
//   segment or lock file in /dev/shm, and no process, log or spec file of the run is left.
// It prints one summary line.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <shmps/server/checkpoint.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/segment.hpp>

#include "../support/exact.hpp"
#include "../support/harness.hpp"

using namespace std::chrono_literals;
using shmps::test::Process;
using shmps::test::Watchdog;
namespace shm = shmps::shm;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

// A line of /proc/<pid>/status in KiB ("VmRSS", "RssAnon"), or -1.
long status_kib(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) return std::atol(line.c_str() + key.size() + 1);
  return -1;
}

// Processes whose parent is this one, and processes whose environment names the segment (a
// grandchild would have it: every worker gets SHMPS_SEGMENT).
std::vector<std::string> processes_left(const std::string& segment) {
  std::vector<std::string> left;
  const std::string self = std::to_string(::getpid());
  const std::string needle = "SHMPS_SEGMENT=" + segment;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/proc", ec)) {
    const std::string pid = entry.path().filename().string();
    if (pid.find_first_not_of("0123456789") != std::string::npos || pid == self) continue;
    std::ifstream stat(entry.path() / "stat");
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const auto close = text.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(text.substr(close + 2));
    std::string state, ppid;
    rest >> state >> ppid;
    std::ifstream env_in(entry.path() / "environ");
    std::string env((std::istreambuf_iterator<char>(env_in)), std::istreambuf_iterator<char>());
    bool names_segment = false;
    for (std::size_t at = env.find(needle); at != std::string::npos; at = env.find(needle, at + 1))
      if ((at == 0 || env[at - 1] == '\0') && (at + needle.size() == env.size() || env[at + needle.size()] == '\0'))
        names_segment = true;
    if (ppid == self || names_segment) left.push_back(pid + " " + text.substr(0, close + 1));
  }
  return left;
}

int soak_seconds() {
  const char* env = std::getenv("SHMPS_SOAK_SECONDS");
  return env ? std::max(5, std::atoi(env)) : 20;
}

}  // namespace

TEST(Soak, KillsCheckpointsSwitchesAndMonitorsLoseNothingLeakNothingAndLeaveNothing) {
  const int seconds = soak_seconds();
  // BSP windows unless SHMPS_SOAK_BSP=0 (the first 1-hour run had none: a switch to BSP under
  // these pushers stopped every worker until switch_consistency started BSP at the oldest step
  // still in a ring; RELIABILITY.md, "Soak").
  const bool with_bsp = std::getenv("SHMPS_SOAK_BSP") == nullptr || std::string(std::getenv("SHMPS_SOAK_BSP")) != "0";
  Watchdog watchdog(std::chrono::seconds(seconds + 300));
  constexpr int kWorkers = 4;
  constexpr std::uint64_t kEndless = 1'000'000'000ULL;
  const unsigned seed = std::random_device{}();
  std::mt19937 rng(seed);
  auto between = [&](long lo, long hi) { return std::chrono::milliseconds(lo + static_cast<long>(rng() % (hi - lo + 1))); };
  std::cout << "soak seed " << seed << ", " << seconds << " s" << std::endl;

  std::string name, spec_path;
  std::vector<std::string> logs;  // every process's log file: none may be left
  const fs::path dir = fs::temp_directory_path() / shmps::test::unique_segment("soak-ckpt");
  fs::create_directories(dir);
  std::uint64_t worker_kills = 0, server_kills = 0, switches = 0, bsp_windows = 0, checkpoints = 0, monitors = 0,
                unexpected_exits = 0, listeners = 0;
  std::vector<std::uint64_t> final_target(kWorkers, 0);
  long warm_anon = -1, warm_rss = -1, end_anon = -1, end_rss = -1, max_anon_at_kill = -1, max_anon_age_s = 0;
  {
    shmps::test::Job job("soak", shmps::test::pattern_spec(8));
    name = job.name();
    spec_path = job.spec_path();
    const std::vector<std::string> server_argv{"shmps-server",      "--spec", job.spec_path(), "--checkpoint-dir",
                                               dir.string(),        "--checkpoint-every", "7s", "--keep", "3"};
    std::unique_ptr<Process> server;
    Clock::time_point server_started;
    auto start_server = [&] {
      const std::uint64_t epoch_before = shmps::test::server_epoch_of(name);
      server = std::make_unique<Process>(server_argv);
      logs.push_back(server->log_path());
      server_started = Clock::now();
      shmps::test::wait_segment_ready(name, *server, epoch_before);
    };
    auto ctl = [&](std::vector<std::string> argv) {
      auto p = std::make_unique<Process>(std::move(argv));
      logs.push_back(p->log_path());
      const int code = p->wait(60s);
      return shmps::test::Ran{code, p->output()};
    };
    std::vector<std::unique_ptr<Process>> pushers(kWorkers);
    auto start_pusher = [&](int r, std::uint64_t target) {
      pushers[r] = std::make_unique<Process>(
          std::vector<std::string>{"shmps-test-pusher", "exact", "--pushes", std::to_string(target), "--clock-every", "1"},
          std::vector<std::pair<std::string, std::string>>{{"SHMPS_SEGMENT", name}, {"SHMPS_RANK", std::to_string(r)}});
      logs.push_back(pushers[r]->log_path());
    };
    std::unique_ptr<Process> listener;  // a shmps-top --listen that stays attached for a while

    start_server();
    for (int r = 0; r < kWorkers; ++r) start_pusher(r, kEndless);

    const auto start = Clock::now();
    const auto end = start + std::chrono::seconds(seconds);
    const auto warm_up = start + std::chrono::seconds(std::clamp(seconds / 20, 3, 60));
    const long server_gap_ms = std::max(4000L, seconds * 1000L / 120);
    auto next_worker_kill = start + between(30, 300);
    auto next_server_kill = start + between(1000, server_gap_ms);
    auto next_checkpoint = start + between(2000, 8000);
    auto next_switch = start + between(3000, 10000);
    auto next_monitor = start + between(500, 3000);
    Clock::time_point bsp_until{}, bsp_at{};
    bool in_bsp = false;
    std::string mode = "asp";
    auto set_consistency = [&](const std::string& to) {
      const auto ran = ctl({"shmps-ctl", "set", name, "consistency=" + to});
      EXPECT_EQ(ran.code, 0) << ran.out;
      EXPECT_NE(ran.out.find("consistency is now"), std::string::npos) << ran.out;
      ++switches;
      mode = to;
    };
    auto checkpoint = [&] {
      const auto ran = ctl({"shmps-ctl", "checkpoint", name});
      EXPECT_EQ(ran.code, 0) << ran.out << "\nserver:\n" << server->output();
      if (ran.code == 0) ++checkpoints;
    };
    auto sample_server = [&](long& anon, long& rss) {
      anon = status_kib(server->pid(), "RssAnon");
      rss = status_kib(server->pid(), "VmRSS");
    };
    auto last_report = start;

    while (Clock::now() < end && !::testing::Test::HasFailure()) {
      std::this_thread::sleep_for(10ms);
      const auto now = Clock::now();
      // A pusher that exited by itself has failed (its target is endless): say why, restart it.
      for (int r = 0; r < kWorkers; ++r)
        if (!pushers[r]->running()) {
          ++unexpected_exits;
          ADD_FAILURE() << "pusher " << r << " exited with " << pushers[r]->wait(1s) << ":\n" << pushers[r]->output();
          start_pusher(r, kEndless);
        }
      if (in_bsp && now >= bsp_until) {
        in_bsp = false;
        set_consistency(rng() % 2 ? "asp" : "ssp:" + std::to_string(1 + rng() % 4));
        next_switch = now + between(3000, 10000);
      }
      if (bsp_at != Clock::time_point{} && now >= bsp_at) {
        set_consistency("bsp");
        in_bsp = true;
        ++bsp_windows;
        bsp_at = Clock::time_point{};
        bsp_until = Clock::now() + between(300, 1500);
      }
      if (!in_bsp && bsp_at == Clock::time_point{} && now >= next_worker_kill) {
        const int r = static_cast<int>(rng() % kWorkers);
        pushers[r]->kill(SIGKILL);
        EXPECT_EQ(pushers[r]->wait(10s), 128 + SIGKILL) << pushers[r]->output();
        ++worker_kills;
        start_pusher(r, kEndless);
        next_worker_kill = now + between(30, 300);
      }
      if (now >= next_server_kill) {
        long anon = -1, rss = -1;
        sample_server(anon, rss);
        if (anon > max_anon_at_kill) {
          max_anon_at_kill = anon;
          max_anon_age_s = std::chrono::duration_cast<std::chrono::seconds>(now - server_started).count();
        }
        server->kill(SIGKILL);
        EXPECT_EQ(server->wait(10s), 128 + SIGKILL) << server->output();
        ++server_kills;
        start_server();
        next_server_kill = Clock::now() + between(1000, server_gap_ms);
      }
      if (now >= next_checkpoint) {
        checkpoint();
        // The warm-up's memory: the first server after the warm-up, after a checkpoint (the
        // first checkpoint of a server allocates its copy buffers).
        if (warm_anon < 0 && now >= warm_up) sample_server(warm_anon, warm_rss);
        next_checkpoint = Clock::now() + between(2000, 8000);
      }
      if (!in_bsp && bsp_at == Clock::time_point{} && now >= next_switch) {
        if (with_bsp && rng() % 4 == 0) {
          // No worker kill in the second before: the old mode applies what a killed worker left
          // in its ring (BSP would discard an unclocked push of a dead generation, by design).
          bsp_at = Clock::now() + 1s;
        } else {
          std::string to = rng() % 2 ? "asp" : "ssp:" + std::to_string(1 + rng() % 4);
          if (to == mode) to = mode == "asp" ? "ssp:2" : "asp";
          set_consistency(to);
          next_switch = Clock::now() + between(3000, 10000);
        }
      }
      if (now >= next_monitor) {
        if (listener) {  // detach the listening monitor first
          listener->kill(rng() % 2 ? SIGKILL : SIGTERM);
          listener->wait(10s);
          listener.reset();
        }
        switch (rng() % 5) {
          case 0: {
            const auto ran = ctl({"shmps-top", name, "--json"});
            EXPECT_EQ(ran.code, 0) << ran.out;
            EXPECT_NE(ran.out.find('{'), std::string::npos) << ran.out;
            break;
          }
          case 1: {
            const auto ran = ctl({"shmps-top", name, "--prometheus"});
            EXPECT_EQ(ran.code, 0) << ran.out;
            break;
          }
          case 2: {
            const auto ran = ctl({"shmps-ctl", "inspect", name});
            EXPECT_EQ(ran.code, 0) << ran.out;
            break;
          }
          case 3: {
            const auto ran = ctl({"shmps-ctl", "workers", name});
            EXPECT_EQ(ran.code, 0) << ran.out;
            break;
          }
          default:
            listener = std::make_unique<Process>(std::vector<std::string>{
                "shmps-top", name, "--listen", "127.0.0.1:0"});
            logs.push_back(listener->log_path());
            ++listeners;
        }
        ++monitors;
        next_monitor = Clock::now() + between(500, 3000);
      }
      if (now - last_report >= 60s) {
        last_report = now;
        std::cout << "soak: " << std::chrono::duration_cast<std::chrono::seconds>(now - start).count() << " s, "
                  << worker_kills << " worker kills, " << server_kills << " server kills, " << switches
                  << " switches, " << checkpoints << " checkpoints, " << monitors << " monitors" << std::endl;
      }
    }
    if (listener) {
      listener->kill(SIGTERM);
      listener->wait(10s);
      listener.reset();
    }
    if (mode != "asp") set_consistency("asp");
    // Every pusher stops at what its slot committed and a new one waits until all is applied.
    {
      auto seg = shm::Segment::open(name, shm::Access::read_only);
      for (int r = 0; r < kWorkers; ++r) {
        pushers[r]->kill(SIGKILL);
        pushers[r]->wait(10s);
        final_target[r] = shm::load_acquire(seg.slot(r).published);
        start_pusher(r, final_target[r]);
      }
      for (int r = 0; r < kWorkers; ++r) EXPECT_EQ(pushers[r]->wait(120s), 0) << pushers[r]->output();
      shmps::test::expect_exact_sum(name, final_target);
      EXPECT_EQ(shm::load_acquire(seg.header().checkpoint_failures), 0u) << server->output();
      std::cout << "soak: segment counters: " << shm::load_acquire(seg.header().checkpoints) << " checkpoints, "
                << shm::load_counter(seg.header().records_skipped) << " slice updates skipped as already applied"
                << std::endl;
    }
    // The end's memory, measured as the warm-up's: after a checkpoint.
    checkpoint();
    sample_server(end_anon, end_rss);
    if (warm_anon < 0) {
      warm_anon = end_anon;
      warm_rss = end_rss;
    }
    // A graceful stop: drains, writes a last checkpoint, exits 0.
    server->kill(SIGTERM);
    EXPECT_EQ(server->wait(60s), 0) << server->output();
    const auto files = shmps::server::CheckpointDir(dir, name).list();
    ASSERT_FALSE(files.empty());
    EXPECT_LE(files.size(), 3u);
    EXPECT_NO_THROW(shmps::server::read_checkpoint(files.back())) << files.back();
    for (const auto& entry : fs::directory_iterator(dir))
      EXPECT_NE(std::find(files.begin(), files.end(), entry.path()), files.end())
          << "left in the checkpoint directory: " << entry.path();
    const auto destroyed = ctl({"shmps-ctl", "destroy", name});
    EXPECT_EQ(destroyed.code, 0) << destroyed.out;
    shmps::test::expect_no_files(name);
    for (const auto& entry : fs::directory_iterator(shm::kShmDir))
      EXPECT_EQ(entry.path().filename().string().find(shm::shm_object_name(name)), std::string::npos)
          << "left in /dev/shm: " << entry.path();
    for (auto& p : pushers) p.reset();
    server.reset();
  }  // the Job: its spec file
  std::error_code ec;
  fs::remove_all(dir, ec);
  for (const auto& log : logs) EXPECT_FALSE(fs::exists(log)) << "log file left: " << log;
  EXPECT_FALSE(fs::exists(spec_path)) << spec_path;
  const auto left = processes_left(name);
  EXPECT_TRUE(left.empty()) << "processes left: " << left.size() << ", first: " << (left.empty() ? "" : left[0]);

  // The server's memory did not grow: anonymous memory (the heap; the segment is shared memory
  // and counted apart) after the last checkpoint against the one after the warm-up's.
  constexpr long kSlackKib = 16 * 1024;
  EXPECT_LE(end_anon, warm_anon + kSlackKib) << "the server's RssAnon grew from " << warm_anon << " KiB to " << end_anon
                                             << " KiB";
  std::uint64_t pushes = 0;
  for (auto t : final_target) pushes += t;
  std::cout << "soak: " << seconds << " s, " << worker_kills << " worker kills, " << server_kills << " server kills, "
            << switches << " consistency switches (" << bsp_windows << " BSP windows), " << checkpoints
            << " checkpoints asked, " << monitors << " monitors (" << listeners << " HTTP listeners), " << pushes
            << " pushes (" << final_target[0] << " " << final_target[1] << " " << final_target[2] << " "
            << final_target[3] << "), " << unexpected_exits << " unexpected exits; server RssAnon warm-up "
            << warm_anon << " KiB, end " << end_anon << " KiB, largest at a kill " << max_anon_at_kill << " KiB (age "
            << max_anon_age_s << " s); VmRSS warm-up " << warm_rss << " KiB, end " << end_rss << " KiB; "
            << (::testing::Test::HasFailure() ? "FAILED" : "exact, nothing left") << std::endl;
  EXPECT_GT(worker_kills, 0u);
  EXPECT_GT(server_kills, 0u);
  EXPECT_GT(checkpoints, 0u);
  EXPECT_GT(switches, 0u);
}
