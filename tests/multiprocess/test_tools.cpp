// shmps-launch and shmps-ctl as an operator runs them: real processes, real segments.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/expect.hpp"
#include "../support/harness.hpp"
#include "../support/mlp_spec.hpp"
#include <shmps/server/safetensors.hpp>

#include "../support/exact.hpp"
#include "../support/independent_safetensors.hpp"

using namespace std::chrono_literals;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Watchdog;
namespace shm = shmps::shm;

using shmps::test::file_exists;
using shmps::test::has;
using shmps::test::expect_no_files;
using shmps::test::Ran;
using shmps::test::run;

namespace {

using shmps::test::kMlpSpec;

// "u" is for the puller (shmps-test-pusher puller); "w" and "b" for the exact pusher.
const std::string kSpec = shmps::test::pattern_spec(4) + "[[param]]\nname = \"u\"\nshape = [50000]\n";





std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

std::vector<std::string> words(const std::string& line) {
  std::vector<std::string> out;
  std::istringstream in(line);
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

// Gone, or a zombie waiting for a reaper that is not the launcher (an orphan's new parent).
bool pid_gone(pid_t pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return true;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const auto paren = text.rfind(')');
  return paren != std::string::npos && paren + 2 < text.size() && text[paren + 2] == 'Z';
}

// The pids a child printed as "[label] <tag> <pid>" lines.
std::vector<pid_t> printed_pids(const std::string& out, const std::string& label, const std::string& tag) {
  std::vector<pid_t> pids;
  for (const auto& line : lines_of(out)) {
    const auto w = words(line);
    if (w.size() == 3 && w[0] == "[" + label + "]" && w[1] == tag) pids.push_back(std::stoi(w[2]));
  }
  return pids;
}

// The words of the first line of `text` whose first word is `first` (empty if none).
std::vector<std::string> row(const std::string& text, const std::string& first) {
  for (const auto& line : lines_of(text)) {
    auto w = words(line);
    if (!w.empty() && w[0] == first) return w;
  }
  return {};
}

// The "min..max" versions column of a parameter's row in `shmps-ctl inspect`.
std::pair<std::uint64_t, std::uint64_t> versions(const std::string& inspect, const std::string& param) {
  const auto r = row(inspect, param);
  if (r.empty()) return {0, 0};
  const std::string v = r.back();
  const auto dots = v.find("..");
  if (dots == std::string::npos) return {0, 0};
  return {std::stoull(v.substr(0, dots)), std::stoull(v.substr(dots + 2))};
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A gate for shmps-launch's workers: gate.wait() is a shell line that waits (at most 20 s) until
// the gate is opened, so that the test can map the segment before the job can end and
// shmps-launch remove it (the mapping outlives the removal: the header's final state can be read).
struct Gate {
  std::string path;
  explicit Gate(const Job& job) : path("/tmp/shmps-test-gate-" + job.name()) {}
  ~Gate() {
    std::error_code ec;
    std::filesystem::remove(path, ec);
  }
  std::string wait() const {
    return "n=0; while [ ! -e '" + path + "' ] && [ $n -lt 2000 ]; do sleep 0.01; n=$((n+1)); done; ";
  }
  void open() const { std::ofstream(path) << "open\n"; }
};

std::uint32_t state_of(const shm::Segment& seg) { return shm::load_acquire(seg.header().state); }
constexpr auto kStopped = static_cast<std::uint32_t>(shm::SegmentState::stopped);

std::vector<std::string> launch_argv(const Job& job, int workers, std::vector<std::string> extra) {
  std::vector<std::string> argv{"shmps-launch", "--spec", job.spec_path(), "--name", job.name(),
                                "--workers", std::to_string(workers)};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return argv;
}

}  // namespace

// ---- shmps-launch ---------------------------------------------------------------------------------

TEST(Launch, RunsWorkersWithPrefixedOutputThenStopsTheServerAndRemovesTheSegment) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("launch", kSpec);
  const Gate gate(job);
  Process launch(launch_argv(job, 3, {"--", "/bin/sh", "-c", gate.wait() + "exec " + shmps::test::bin("shmps-test-pusher") +
                                                                   " exact --pushes 30"}));
  const auto seg = shmps::test::map_when_ready(job.name(), launch);
  gate.open();
  ASSERT_TRUE(seg.has_value());
  ASSERT_EQ(launch.wait(45s), 0) << launch.output();
  const std::string out = launch.output();
  for (int r = 0; r < 3; ++r) {
    const std::string p = "[w" + std::to_string(r) + "] ";
    EXPECT_HAS(out, "\n" + p + "rank " + std::to_string(r) + " pushed 30 applied 30\n");
  }
  // Every line is the launcher's own or prefixed with where it came from.
  for (const auto& line : lines_of(out)) {
    const bool ok = line.rfind("shmps-launch: ", 0) == 0 || line.rfind("[server] ", 0) == 0 ||
                    line.rfind("[w0] ", 0) == 0 || line.rfind("[w1] ", 0) == 0 || line.rfind("[w2] ", 0) == 0;
    EXPECT_TRUE(ok) << "unprefixed line: " << line;
  }
  EXPECT_HAS(out, "starting 3 workers");
  // Drained, then stopped: what the server left in the header (read through the test's mapping,
  // which outlived the segment's removal).
  EXPECT_EQ(state_of(*seg), kStopped) << out;
  EXPECT_EQ(shm::load_counter(seg->header().records_applied), 90u) << out;
  EXPECT_HAS(out, "removed=true");
  EXPECT_HAS(out, "shmps-launch: job finished; segment removed");
  expect_no_files(job.name());
}

TEST(Launch, AFailingWorkerIsNamedAndTheJobIsStoppedAndCleanedUp) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("fail", kSpec);
  const Gate gate(job);
  const auto t0 = std::chrono::steady_clock::now();
  // Rank 1 fails at once (once the test has mapped the segment); the others would run for 30 s
  // unless stopped, they and the command their shell started.
  Process launch(launch_argv(job, 3,
                             {"--", "/bin/sh", "-c",
                              "if [ \"$SHMPS_RANK\" = 1 ]; then " + gate.wait() + "sleep 0.2; echo giving up; exit 3; fi; "
                              "sleep 30 & echo \"sleeper $!\"; wait $!; echo late"}));
  const auto seg = shmps::test::map_when_ready(job.name(), launch);
  gate.open();
  ASSERT_TRUE(seg.has_value());
  const int code = launch.wait(45s);
  const std::string out = launch.output();
  EXPECT_EQ(code, 1) << out;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 20s) << "the other workers were not stopped";
  EXPECT_HAS(out, "[w1] giving up");
  EXPECT_HAS(out, "shmps-launch: worker w1 exited with code 3; stopping the job");
  EXPECT_FALSE(has(out, "worker w0 ")) << out;  // stopped by the launcher: not a failure of theirs
  EXPECT_FALSE(has(out, "worker w2 ")) << out;
  EXPECT_FALSE(has(out, "job finished")) << out;
  EXPECT_FALSE(has(out, "late")) << out;
  EXPECT_EQ(state_of(*seg), kStopped) << out;  // the server was stopped, not killed
  expect_no_files(job.name());
  std::vector<pid_t> sleepers = printed_pids(out, "w0", "sleeper");
  const auto w2 = printed_pids(out, "w2", "sleeper");
  sleepers.insert(sleepers.end(), w2.begin(), w2.end());
  ASSERT_EQ(sleepers.size(), 2u) << out;
  // The launcher signalled their process groups; on a loaded machine a signalled process may
  // take a moment to be scheduled and die, so "left running" means still alive 5 s later.
  for (pid_t p : sleepers) {
    const auto until = std::chrono::steady_clock::now() + 5s;
    while (!pid_gone(p) && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(10ms);
    EXPECT_TRUE(pid_gone(p)) << "a worker's child, pid " << p << ", was left running";
  }
}

TEST(Launch, MoreWorkersThanSlotsIsRefusedBeforeStartingAnything) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("slots", kSpec);
  Process launch(launch_argv(job, 5, {"--", "shmps-test-pusher", "exact", "--pushes", "3"}));
  const int code = launch.wait(45s);
  const std::string out = launch.output();
  EXPECT_EQ(code, 1) << out;
  EXPECT_HAS(out, "--workers 5 is more than the 4 worker slots");
  EXPECT_FALSE(has(out, "[server]")) << out;  // nothing was started
  expect_no_files(job.name());
}

TEST(Launch, ABadSpecFailsBeforeStartingAnything) {
  Watchdog wd(std::chrono::seconds(60));
  std::string spec = kSpec;
  spec.replace(spec.find("lr = 1.0"), 8, "lr = 0");
  Job job("badspec", spec);
  Process launch(launch_argv(job, 2, {"--", "shmps-test-pusher", "exact", "--pushes", "3"}));
  const int code = launch.wait(20s);
  const std::string out = launch.output();
  EXPECT_EQ(code, 2) << out;
  EXPECT_HAS(out, job.spec_path() + ":6:");
  EXPECT_HAS(out, "optimizer.lr");
  EXPECT_FALSE(has(out, "[server]")) << out;
  EXPECT_FALSE(has(out, "[w0]")) << out;
  expect_no_files(job.name());
}

TEST(Launch, SigintOrSigtermStopsWorkersAndServerAndLeavesNothing) {
  Watchdog wd(std::chrono::seconds(60));
  for (int sig : {SIGINT, SIGTERM}) {
    SCOPED_TRACE(strsignal(sig));
    Job job("signal", kSpec);
    Process launch(launch_argv(job, 3, {"--", "shmps-test-pusher", "puller", "--millis", "60000"}));
    // Wait until the server and all three workers are up, and learn their pids.
    std::vector<pid_t> pids;
    std::optional<shm::Segment> mapped;  // kept: it outlives the segment's removal
    const auto deadline = std::chrono::steady_clock::now() + 20s;
    while (pids.empty() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(20ms);
      ASSERT_TRUE(launch.running()) << launch.output();
      try {
        if (!shm::Segment::exists(job.name())) continue;
        auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
        if (shm::load_acquire(seg.header().state) != static_cast<std::uint32_t>(shm::SegmentState::ready)) continue;
        std::vector<pid_t> found{shm::load_acquire(seg.header().server_pid)};
        for (unsigned r = 0; r < 3; ++r)
          if (shm::load_acquire(seg.slot(r).state) == static_cast<std::uint32_t>(shm::SlotState::attached))
            found.push_back(shm::load_acquire(seg.slot(r).pid));
        if (found.size() == 4) {
          pids = found;
          mapped = std::move(seg);
        }
      } catch (const shmps::Error&) {
      }
    }
    ASSERT_EQ(pids.size(), 4u) << "the job did not start:\n" << launch.output();
    for (pid_t p : pids) ASSERT_FALSE(pid_gone(p));

    launch.kill(sig);
    const int code = launch.wait(30s);
    const std::string out = launch.output();
    EXPECT_EQ(code, 128 + sig) << out;
    EXPECT_HAS(out, std::string("shmps-launch: ") + strsignal(sig) + ": stopping the job");
    EXPECT_EQ(state_of(*mapped), kStopped) << out;  // the server was stopped, not killed
    EXPECT_FALSE(has(out, "job finished")) << out;
    for (pid_t p : pids) EXPECT_TRUE(pid_gone(p)) << "pid " << p << " is still there";
    expect_no_files(job.name());
  }
}

TEST(Launch, AfterRunsWhileTheServerLivesAndKeepKeepsTheSegment) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("after", kSpec);
  Process launch(launch_argv(job, 2,
                             {"--keep", "--after", "echo \"after sees $SHMPS_SEGMENT\"; shmps-ctl inspect \"$SHMPS_SEGMENT\"",
                              "--", "shmps-test-pusher", "exact", "--pushes", "30"}));
  ASSERT_EQ(launch.wait(45s), 0) << launch.output();
  const std::string out = launch.output();
  // The command ran after both workers finished, with the segment set, the server alive.
  const auto after_at = out.find("[after] after sees " + job.name() + "\n");
  ASSERT_NE(after_at, std::string::npos) << out;
  EXPECT_LT(out.find("[w0] rank 0 pushed 30 applied 30"), after_at) << out;
  EXPECT_LT(out.find("[w1] rank 1 pushed 30 applied 30"), after_at) << out;
  EXPECT_HAS(out, "[after] server       alive");
  EXPECT_HAS(out, "[after] state        ready");
  EXPECT_HAS(out, "job finished");
  EXPECT_FALSE(has(out, "segment removed")) << out;
  EXPECT_HAS(out, "removed=false");

  // --keep: the segment and its values are still there, its server gone.
  ASSERT_TRUE(file_exists(shm::segment_path(job.name())));
  const Ran inspect = run({"shmps-ctl", "inspect", job.name()});
  ASSERT_EQ(inspect.code, 0) << inspect.out;
  EXPECT_HAS(inspect.out, "server       not running");
  EXPECT_HAS(inspect.out, "state        stopped");
  EXPECT_HAS(inspect.out, "applied      60 pushes");
  EXPECT_GT(versions(inspect.out, "w").first, 0u) << inspect.out;
  EXPECT_GT(versions(inspect.out, "b").first, 0u) << inspect.out;

  const Ran destroy = run({"shmps-ctl", "destroy", job.name()});
  EXPECT_EQ(destroy.code, 0) << destroy.out;
  EXPECT_HAS(destroy.out, "removed segment '" + job.name() + "'");
  expect_no_files(job.name());
}

TEST(Launch, SigintDuringTheAfterCommandStopsIt) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("afterint", kSpec);
  Process launch(launch_argv(job, 1,
                             {"--after", "sleep 30 & echo \"sleeper $!\"; wait $!; echo late", "--",
                              "shmps-test-pusher", "exact", "--pushes", "3"}));
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (!has(launch.output(), "[after] sleeper ") && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(10ms);
  ASSERT_TRUE(has(launch.output(), "[after] sleeper ")) << launch.output();
  const auto t0 = std::chrono::steady_clock::now();
  launch.kill(SIGINT);
  const int code = launch.wait(30s);
  const std::string out = launch.output();
  EXPECT_EQ(code, 128 + SIGINT) << out;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 15s) << "the --after command was not stopped";
  EXPECT_FALSE(has(out, "late")) << out;
  EXPECT_FALSE(has(out, "the --after command")) << "an interrupted --after is not reported as a failure:\n" << out;
  const auto sleepers = printed_pids(out, "after", "sleeper");
  ASSERT_EQ(sleepers.size(), 1u) << out;
  EXPECT_TRUE(pid_gone(sleepers[0]));
  expect_no_files(job.name());
}

TEST(Launch, AFailingAfterCommandFailsTheJob) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("afterfail", kSpec);
  Process launch(launch_argv(job, 1, {"--after", "exit 4", "--", "shmps-test-pusher", "exact", "--pushes", "3"}));
  const int code = launch.wait(45s);
  const std::string out = launch.output();
  EXPECT_EQ(code, 1) << out;
  EXPECT_HAS(out, "the --after command exited with code 4");
  expect_no_files(job.name());
}

// ---- shmps-ctl -------------------------------------------------------------------------------------

TEST(Ctl, ListInspectAndDestroyOfALiveSegment) {
  Watchdog wd(std::chrono::seconds(60));
  // A long segment name, a long parameter name and a wide shape must not run into the next column.
  Job job("ctl-with-a-long-name", std::string(kSpec) + R"([[param]]
name = "encoder.layers.0.attention.query.weight"
shape = [10, 10, 10, 10]
)");
  ASSERT_GT(job.name().size(), 24u);
  Process& server = job.start_server();
  job.wait_ready();
  Process& pusher = job.start({"shmps-test-pusher", "exact", "--pushes", "30"}, {{"SHMPS_RANK", "0"}});
  ASSERT_EQ(pusher.wait(30s), 0) << pusher.output();
  shmps::Worker live(shmps::WorkerOptions{.segment = job.name(), .rank = 2});
  const std::string server_pid = std::to_string(server.pid());

  const Ran list = run({"shmps-ctl", "list"});
  ASSERT_EQ(list.code, 0) << list.out;
  const auto entry = row(list.out, job.name());
  ASSERT_FALSE(entry.empty()) << list.out;
  EXPECT_EQ(entry.at(1), "ready") << list.out;
  EXPECT_EQ(entry.at(2), "alive") << list.out;
  EXPECT_EQ(entry.at(4), server_pid) << list.out;
  EXPECT_EQ(entry.at(6), "1/4") << list.out;  // the live worker; the pusher has left

  const Ran inspect = run({"shmps-ctl", "inspect", job.name()});
  ASSERT_EQ(inspect.code, 0) << inspect.out;
  const std::string& s = inspect.out;
  EXPECT_HAS(s, "server       alive, pid " + server_pid);
  EXPECT_HAS(s, "optimizer    sgd lr=1");
  EXPECT_HAS(s, "applied      30 pushes");
  // Parameters: name, shape, elements, slices, versions.
  for (const auto& [name, shape, elements, slices] :
       std::vector<std::tuple<std::string, std::string, std::string, std::string>>{
           {"w", "[3, 40000]", "120000", "8"},
           {"b", "[7]", "7", "1"},
           {"u", "[50000]", "50000", "4"},
           {"encoder.layers.0.attention.query.weight", "[10, 10, 10, 10]", "10000", "1"}}) {
    SCOPED_TRACE(name);
    EXPECT_TRUE(has(s, shape)) << s;
    const auto r = row(s, name);
    ASSERT_GE(r.size(), 5u) << s;
    std::string shown;
    for (std::size_t k = 1; k + 3 < r.size(); ++k) shown += (k > 1 ? " " : "") + r[k];
    EXPECT_EQ(shown, shape) << s;
    EXPECT_EQ(r[r.size() - 3], elements);
    EXPECT_EQ(r[r.size() - 2], slices);
  }
  EXPECT_GE(versions(s, "w").first, 10u) << s;  // every third push is the whole of "w"
  EXPECT_EQ(versions(s, "b").first, 10u) << s;
  EXPECT_EQ(versions(s, "u").second, 0u) << s;  // never pushed
  // Slots: RANK STATUS PID GEN PUBLISHED APPLIED RING(2 words) REJECTED HEARTBEAT
  const auto left = row(s, "0");
  ASSERT_GE(left.size(), 9u) << s;
  EXPECT_EQ(left[1], "left");
  EXPECT_EQ(left[2], std::to_string(pusher.pid()));
  EXPECT_EQ(left[4], "30");
  EXPECT_EQ(left[5], "30");
  const auto alive = row(s, "2");
  ASSERT_GE(alive.size(), 9u) << s;
  EXPECT_EQ(alive[1], "alive");
  EXPECT_EQ(alive[2], std::to_string(::getpid()));
  EXPECT_TRUE(row(s, "1").empty()) << "a free slot is not listed:\n" << s;

  // destroy refuses while the server lives, and removes nothing.
  const Ran refused = run({"shmps-ctl", "destroy", job.name()});
  EXPECT_EQ(refused.code, 1) << refused.out;
  EXPECT_HAS(refused.out, "segment '" + job.name() + "' is served by a live server (pid " + server_pid + ")");
  EXPECT_HAS(refused.out, "--force");
  EXPECT_TRUE(file_exists(shm::segment_path(job.name())));
  EXPECT_TRUE(file_exists(shm::server_lock_path(job.name())));
  EXPECT_TRUE(server.running());

  const Ran forced = run({"shmps-ctl", "destroy", job.name(), "--force"});
  EXPECT_EQ(forced.code, 0) << forced.out;
  expect_no_files(job.name());
  const Ran gone = run({"shmps-ctl", "list"});
  EXPECT_TRUE(row(gone.out, job.name()).empty()) << gone.out;
}

TEST(Ctl, DestroyWorksOnceTheServerHasStopped) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("ctlstop", kSpec);
  Process& server = job.start_server();
  job.wait_ready();
  server.kill(SIGTERM);
  ASSERT_EQ(server.wait(20s), 0) << server.output();
  const Ran list = run({"shmps-ctl", "list"});
  const auto entry = row(list.out, job.name());
  ASSERT_GE(entry.size(), 3u) << list.out;
  EXPECT_EQ(entry[1], "stopped");
  EXPECT_EQ(entry[2], "none");
  const Ran destroy = run({"shmps-ctl", "destroy", job.name()});
  EXPECT_EQ(destroy.code, 0) << destroy.out;
  expect_no_files(job.name());
}

TEST(Ctl, MissingSegmentGivesAClearErrorAndExit1) {
  Watchdog wd(std::chrono::seconds(60));
  const std::string name = shmps::test::unique_segment("missing");
  struct Cleanup {
    std::string name;
    ~Cleanup() { shmps::test::remove_segment(name); }
  } cleanup{name};
  const Ran inspect = run({"shmps-ctl", "inspect", name});
  EXPECT_EQ(inspect.code, 1) << inspect.out;
  EXPECT_HAS(inspect.out, "shmps-ctl: error: segment '" + name + "' does not exist (no " + shm::segment_path(name) + ")");
  EXPECT_HAS(inspect.out, "shmps-ctl list");
  const Ran destroy = run({"shmps-ctl", "destroy", name});
  EXPECT_EQ(destroy.code, 1) << destroy.out;
  EXPECT_HAS(destroy.out, "shmps-ctl: error: segment '" + name + "' does not exist");
  // Only the lock files of a server that failed before creating the segment: destroy cleans them.
  std::ofstream(shm::server_lock_path(name)).put('\0');
  const Ran stale = run({"shmps-ctl", "destroy", name});
  EXPECT_EQ(stale.code, 0) << stale.out;
  EXPECT_HAS(stale.out, "removed its leftover lock files");
  expect_no_files(name);

  const Ran bad = run({"shmps-ctl", "destroy", "../etc"});
  EXPECT_EQ(bad.code, 1) << bad.out;
  EXPECT_HAS(bad.out, "'/'");
  expect_no_files(name);
}

TEST(Ctl, InspectAndListChangeNothing) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("readonly", kSpec);
  Process& server = job.start_server();
  job.wait_ready();
  // While a worker pushes, inspect and list run again and again and disturb nothing.
  Process& pusher = job.start({"shmps-test-pusher", "exact", "--pushes", "600"}, {{"SHMPS_RANK", "1"}});
  int runs = 0;
  while (pusher.running() || runs < 6) {
    const Ran r = runs % 2 ? run({"shmps-ctl", "list"}) : run({"shmps-ctl", "inspect", job.name()});
    EXPECT_EQ(r.code, 0) << r.out;
    ++runs;
  }
  ASSERT_EQ(pusher.wait(30s), 0) << pusher.output();
  EXPECT_HAS(pusher.output(), "rank 1 pushed 600 applied 600");

  // At rest (server stopped), the bytes and times of the segment and its lock files stay the same.
  server.kill(SIGTERM);
  ASSERT_EQ(server.wait(20s), 0) << server.output();
  const std::vector<std::string> files{shm::segment_path(job.name()), shm::server_lock_path(job.name()),
                                       shm::slots_lock_path(job.name())};
  std::vector<std::string> bytes;
  std::vector<struct stat> before(files.size());
  for (std::size_t i = 0; i < files.size(); ++i) {
    bytes.push_back(file_bytes(files[i]));
    ASSERT_EQ(::stat(files[i].c_str(), &before[i]), 0) << files[i];
  }
  std::this_thread::sleep_for(20ms);  // a write now would get a later mtime
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(run({"shmps-ctl", "inspect", job.name()}).code, 0);
    EXPECT_EQ(run({"shmps-ctl", "list"}).code, 0);
  }
  for (std::size_t i = 0; i < files.size(); ++i) {
    SCOPED_TRACE(files[i]);
    struct stat after {};
    ASSERT_EQ(::stat(files[i].c_str(), &after), 0);
    EXPECT_TRUE(file_bytes(files[i]) == bytes[i]) << "modified";
    EXPECT_EQ(after.st_mtim.tv_sec, before[i].st_mtim.tv_sec);
    EXPECT_EQ(after.st_mtim.tv_nsec, before[i].st_mtim.tv_nsec);
    EXPECT_EQ(after.st_ctim.tv_nsec, before[i].st_ctim.tv_nsec);
    EXPECT_EQ(after.st_mode, before[i].st_mode);
  }
}

TEST(Launch, AKilledWorkerIsRestartedWithItsRankAndResumesExactly) {
  Watchdog wd(std::chrono::seconds(90));
  Job job("restart", kSpec);
  // --chaos SIGKILLs the last worker 0.05 s after its first push; --max-restarts brings it back with the same rank,
  // and the pusher continues after the last push its slot committed.
  Process launch(launch_argv(job, 2, {"--keep", "--chaos", "--chaos-after", "0.05", "--", "shmps-test-pusher",
                                      "exact", "--pushes", "3000"}));
  const int code = launch.wait(60s);
  const std::string out = launch.output();
  ASSERT_EQ(code, 0) << out;
  EXPECT_HAS(out, "--chaos: killing worker w1");
  EXPECT_HAS(out, "worker w1 was killed by signal 9");
  EXPECT_HAS(out, "restarting it with the same rank (restart 1 of 1)");
  EXPECT_HAS(out, "[w1] rank 1 pushed 3000 applied 3000");
  // Exactly once across both lives of rank 1: the final values are the exact sum.
  shmps::test::expect_exact_sum(job.name(), {3000, 3000}, 3);
  // shmps-ctl workers shows the second generation of slot 1.
  const Ran workers = run({"shmps-ctl", "workers", job.name()});
  ASSERT_EQ(workers.code, 0) << workers.out;
  const auto w1 = row(workers.out, "1");
  ASSERT_GE(w1.size(), 6u) << workers.out;
  EXPECT_EQ(w1[1], "left");
  EXPECT_EQ(w1[3], "2");  // generation
  EXPECT_EQ(w1[4], "3000");
  EXPECT_EQ(w1[5], "3000");
  EXPECT_EQ(row(workers.out, "2").at(1), "free");  // `workers` lists free slots too
}

TEST(Launch, AWorkerThatKeepsDyingStopsTheJobInsteadOfLooping) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("dying", kSpec);
  Process launch(launch_argv(job, 1, {"--max-restarts", "2", "--", "/bin/sh", "-c", "exit 3"}));
  const int code = launch.wait(45s);
  const std::string out = launch.output();
  EXPECT_EQ(code, 1) << out;
  EXPECT_HAS(out, "restart 1 of 2");
  EXPECT_HAS(out, "restart 2 of 2");
  EXPECT_HAS(out, "worker w0 exited with code 3 and has used its 2 restarts (--max-restarts); stopping the job");
  EXPECT_FALSE(has(out, "restart 3 of 2")) << out;
  expect_no_files(job.name());
}

TEST(Launch, TheTrainerKilledByChaosResumesItsScheduleAndFinishes) {
#if defined(SHMPS_SANITIZER_BUILD)
  GTEST_SKIP() << "the Eigen trainer runs ~100x slower under sanitizers; the launcher's restarts and BSP "
                  "determinism are covered here by the shmps-test-pusher tests";
#endif
  Watchdog wd(std::chrono::seconds(120));
  Job job("trainer", kMlpSpec);
  Process launch({"shmps-launch", "--spec", job.spec_path(), "--name", job.name(), "--workers", "2", "--chaos",
                  "--chaos-after", "0.4", "--samples", "60000", "--after", "shmps-worker --evaluate"});
  const int code = launch.wait(100s);
  const std::string out = launch.output();
  ASSERT_EQ(code, 0) << out;
  EXPECT_HAS(out, "--chaos: killing worker w1");
  EXPECT_HAS(out, "[w1] resuming: generation 2 of slot 1 continues at batch");
  EXPECT_HAS(out, "[w1] trained");  // the restarted trainer finished its schedule
  EXPECT_HAS(out, "[after] test loss");
  // Both workers' 938 batches (60000 / 64 rounded up, split 469 + 469) were pushed: four
  // pushes each, plus at most the one step w1 was in when it died (ASP repeats it).
  const auto at = out.find("records_applied=");
  ASSERT_NE(at, std::string::npos) << out;
  const auto applied = std::stoull(out.substr(at + 16));
  EXPECT_GE(applied, 938u * 4);
  EXPECT_LE(applied, 938u * 4 + 4);
}

TEST(Launch, TheTrainerInBspGivesBitIdenticalWeightsRunAfterRunAndAfterARestore) {
#if defined(SHMPS_SANITIZER_BUILD)
  GTEST_SKIP() << "the Eigen trainer runs ~100x slower under sanitizers; the launcher's restarts and BSP "
                  "determinism are covered here by the shmps-test-pusher tests";
#endif
  Watchdog wd(std::chrono::seconds(120));
  std::vector<std::string> hashes;
  for (int run = 0; run < 2; ++run) {
    Job job("bsphash", kMlpSpec);
    Process launch({"shmps-launch", "--spec", job.spec_path(), "--name", job.name(), "--workers", "2",
                    "--consistency", "bsp", "--samples", "20000", "--after", "shmps-worker --evaluate"});
    ASSERT_EQ(launch.wait(100s), 0) << launch.output();
    const std::string out = launch.output();
    // The start barrier (Worker::wait_for_workers): without it a worker that starts late can
    // find step 0 ended by the other alone, and the weights differ from run to run.
    EXPECT_HAS(out, "[w1] waiting for all 2 workers to join step 0");
    const auto at = out.find("[after] weights-hash ");
    ASSERT_NE(at, std::string::npos) << out;
    hashes.push_back(out.substr(at + 21, 18));
  }
  EXPECT_EQ(hashes[0], hashes[1]);

  // Once more, interrupted (Ctrl-C) mid-training: the launcher stops the job, the server writes a
  // last checkpoint and the shared memory is removed. Launched again with the same checkpoint
  // directory, the server restores it, the trainers resume their data cursors, and the weights
  // come out bit-identical.
  Job job("bspckpt", kMlpSpec);
  const std::string dir = "/tmp/shmps-test-ckpt-" + job.name();
  std::vector<std::string> argv{"shmps-launch", "--spec", job.spec_path(), "--name", job.name(), "--workers", "2",
                                "--consistency", "bsp", "--samples", "20000", "--checkpoint-dir", dir,
                                "--after", "shmps-worker --evaluate"};
  {
    Process first(argv);
    const auto until = std::chrono::steady_clock::now() + 60s;
    std::uint64_t clock = 0;
    std::optional<shm::Segment> mapped;  // kept to the end: it outlives the segment's removal
    while (clock < 40 && std::chrono::steady_clock::now() < until && first.running()) {
      try {
        if (!mapped) {
          auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
          if (state_of(seg) == static_cast<std::uint32_t>(shm::SegmentState::ready)) mapped = std::move(seg);
        }
        if (mapped) clock = shm::load_acquire(mapped->group(0).clock);
      } catch (const shmps::Error&) {
      }
      std::this_thread::sleep_for(1ms);
    }
    ASSERT_TRUE(mapped.has_value()) << first.output();
    first.kill(SIGINT);
    first.wait(30s);
    const std::string log = first.output();
    // The server's last checkpoint, at its stop, holds the final model clock, and is in the directory.
    const auto& h = mapped->header();
    EXPECT_EQ(state_of(*mapped), kStopped) << log;
    EXPECT_GE(shm::load_acquire(h.checkpoints), 1u) << log;
    EXPECT_EQ(shm::load_acquire(h.checkpoint_failures), 0u) << log;
    EXPECT_EQ(shm::load_acquire(h.last_checkpoint_clock), shm::load_acquire(mapped->group(0).clock)) << log;
    EXPECT_GE(shm::load_acquire(mapped->group(0).clock), 40u) << log;
    std::size_t files = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir)) files += e.path().extension() == ".safetensors";
    EXPECT_GE(files, 1u) << log;
    // The launcher freezes the workers until the server has written its last checkpoint: the
    // server never sees a worker die (no slot's generation was proven dead), so no BSP step is
    // completed without one.
    for (std::uint32_t r = 0; r < h.max_workers; ++r)
      EXPECT_EQ(shm::load_acquire(mapped->slot(r).dead_generation), 0u) << "slot " << r << "\n" << log;
  }
  EXPECT_FALSE(std::filesystem::exists(shmps::shm::segment_path(job.name())));
  Process second(argv);
  ASSERT_EQ(second.wait(100s), 0) << second.output();
  const std::string out = second.output();
  std::filesystem::remove_all(dir);
  // Restored from the checkpoint (the segment was gone): only the server's log says so; the
  // trainers' resumed cursors and the weights' hash below are the effect.
  EXPECT_HAS(out, "event=restored");
  const auto resumed = out.find("continues at batch ");
  ASSERT_NE(resumed, std::string::npos) << out;
  EXPECT_GT(std::stoull(out.substr(resumed + 19)), 40u) << out;
  const auto at = out.find("[after] weights-hash ");
  ASSERT_NE(at, std::string::npos) << out;
  EXPECT_EQ(out.substr(at + 21, 18), hashes[0]);
}

// Starts `job`, lets one pusher make 40 pushes, and exports the live job; the file's path, or ""
// (with the failure reported) if something went wrong.
std::string export_after_40_pushes(Job& job, std::string* ctl_output = nullptr) {
  job.start_server();
  job.wait_ready();
  auto& pusher = job.start({"shmps-test-pusher", "exact", "--pushes", "40"}, {{"SHMPS_RANK", "0"}});
  EXPECT_EQ(pusher.wait(30s), 0) << pusher.output();
  const std::string path = "/tmp/shmps-test-export-" + job.name() + ".safetensors";
  const Ran exported = run({"shmps-ctl", "export", job.name(), path});
  EXPECT_EQ(exported.code, 0) << exported.out;
  if (ctl_output) *ctl_output = exported.out;
  return exported.code == 0 ? path : "";
}

TEST(Ctl, ExportWritesEveryParameterOfALiveJobToSafetensors) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("export", kSpec);
  std::string out;
  const std::string path = export_after_40_pushes(job, &out);
  ASSERT_FALSE(path.empty());
  const Ran exported{0, out};
  EXPECT_HAS(exported.out, "exported 3 parameters");
  // The file holds exactly what a pull sees, under the parameters' names and shapes.
  const auto file = shmps::server::safetensors::File::read(path);
  shmps::Worker reader(shmps::WorkerOptions{.segment = job.name(), .rank = 3});
  for (const auto& [name, shape] : std::vector<std::pair<std::string, std::vector<std::uint64_t>>>{
           {"w", {3, 40000}}, {"b", {7}}, {"u", {50000}}}) {
    std::vector<float> pulled(reader.param(name).size);
    reader.pull(name, pulled);
    EXPECT_EQ(file.f32(name, shape), pulled) << name;
  }
  EXPECT_EQ(file.metadata().at("shmps.segment"), job.name());
  EXPECT_EQ(file.metadata().at("shmps.version.b"), "13..13");  // every third of 40 pushes is "b"
  std::filesystem::remove(path);
  // A missing segment: a clear error, and no file.
  const Ran missing = run({"shmps-ctl", "export", "t-no-such-segment", path});
  EXPECT_EQ(missing.code, 1);
  EXPECT_HAS(missing.out, "does not exist");
  EXPECT_FALSE(std::filesystem::exists(path));
}

// ---- shmps-ctl export, read back independently -------------------------------------------------

namespace {

namespace ist = shmps::test::independent_safetensors;

// The bytes of a safetensors file as the format describes it: `header` padded with spaces so
// that the data starts at a multiple of 8, then `data`.
std::string safetensors_bytes(std::string header, const std::string& data) {
  while ((8 + header.size()) % 8 != 0) header += ' ';
  std::string out;
  for (int i = 0; i < 8; ++i) out += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

// The file-wide rules of the format, on an independently parsed file: "" if they hold.
std::string layout_problem(const ist::File& f) {
  if (f.data_start() % 8 != 0) return "the data starts at byte " + std::to_string(f.data_start()) + ", not a multiple of 8";
  std::uint64_t at = 0;
  for (const auto& t : f.by_offset()) {
    if (t.begin != at)
      return "'" + t.name + "' begins at " + std::to_string(t.begin) + ", the previous tensor ends at " + std::to_string(at);
    at = t.end;
  }
  if (at != f.data_size())
    return "the tensors end at " + std::to_string(at) + " of a " + std::to_string(f.data_size()) + "-byte buffer";
  return "";
}

std::vector<std::uint32_t> bits(const std::vector<float>& v) {
  std::vector<std::uint32_t> out(v.size());
  std::memcpy(out.data(), v.data(), v.size() * sizeof(float));
  return out;
}

}  // namespace

TEST(Ctl, TheIndependentSafetensorsReaderReadsTheFormatAsPublished) {
  // A file written by hand from the format's description (not by our writer): two F32
  // tensors, "b" stored before "a", and metadata.
  const std::string data("\x00\x00\x80\x3f" "\x00\x00\x00\xc0" "\x00\x00\x40\x40", 12);  // 1, -2, 3
  const std::string good = safetensors_bytes(
      R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[1,2],"data_offsets":[4,12]},)"
      R"("b":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})",
      data);
  const ist::File f = ist::parse(good);
  EXPECT_EQ(f.data_start() % 8, 0u);
  EXPECT_EQ(f.metadata, (std::map<std::string, std::string>{{"k", "v"}}));
  EXPECT_EQ(f.tensor("a").shape, (std::vector<std::uint64_t>{1, 2}));
  EXPECT_EQ(f.f32("a"), (std::vector<float>{-2.0f, 3.0f}));
  EXPECT_EQ(f.f32("b"), (std::vector<float>{1.0f}));
  EXPECT_EQ(layout_problem(f), "");
  // What it refuses, and what the layout check reports.
  EXPECT_THROW(ist::parse(good.substr(0, 7)), std::runtime_error);
  EXPECT_THROW(ist::parse(good.substr(0, good.size() - 1)), std::runtime_error);  // "a" runs past the end
  EXPECT_THROW(ist::parse(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data)),
               std::runtime_error);
  EXPECT_THROW(ist::parse(safetensors_bytes(R"({"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}})", data)),
               std::runtime_error);
  EXPECT_THROW(ist::parse(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                            R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                            data)),
               std::runtime_error);
  EXPECT_HAS(layout_problem(ist::parse(safetensors_bytes(
                 R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", data))),
             "'a' begins at 4");
  EXPECT_HAS(layout_problem(ist::parse(safetensors_bytes(
                 R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", data))),
             "the tensors end at 8 of a 12-byte buffer");
}

TEST(Ctl, AnExportedFileReadsBackWithAnIndependentReader) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("export-ind", kSpec);
  const std::string path = export_after_40_pushes(job);
  ASSERT_FALSE(path.empty());
  const ist::File f = ist::read(path);
  std::filesystem::remove(path);

  // The 8-byte length, a header that is a space-padded JSON object, and data that starts at a
  // multiple of 8 and is exactly covered by the tensors, back to back from offset 0.
  EXPECT_EQ(f.bytes.size(), 8 + f.header_len + f.data_size());
  EXPECT_GT(f.header_len, 0u);
  EXPECT_EQ((8 + f.header_len) % 8, 0u) << f.header_len;
  EXPECT_EQ(layout_problem(f), "") << f.header;
  // Exactly the job's parameters, F32, with their shapes, each holding what a pull sees.
  const std::vector<std::pair<std::string, std::vector<std::uint64_t>>> params{
      {"b", {7}}, {"u", {50000}}, {"w", {3, 40000}}};
  ASSERT_EQ(f.tensors.size(), params.size()) << f.header;
  shmps::Worker reader(shmps::WorkerOptions{.segment = job.name(), .rank = 3});
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& [name, shape] = params[i];
    const ist::Tensor& t = f.tensors[i];
    EXPECT_EQ(t.name, name);
    EXPECT_EQ(t.dtype, "F32") << name;
    EXPECT_EQ(t.shape, shape) << name;
    std::vector<float> pulled(reader.param(name).size);
    reader.pull(name, pulled);
    EXPECT_EQ(bits(f.f32(name)), bits(pulled)) << name;  // bit for bit
  }
  EXPECT_EQ(f.metadata.at("shmps.segment"), job.name());
  EXPECT_EQ(f.metadata.at("shmps.version.b"), "13..13");  // every third of 40 pushes is "b"
}

// The reference MLP exported from a live job loads into the equivalent torch.nn module
// (tests/python/load_into_torch.py): names, shapes, bit-exact values, a forward pass, and the
// trainer's own test-set figures recomputed in torch.
TEST(Ctl, AnExportedReferenceMlpLoadsIntoTorch) {
#if defined(SHMPS_SANITIZER_BUILD)
  GTEST_SKIP() << "the Eigen trainer runs ~100x slower under sanitizers";
#endif
  Watchdog wd(std::chrono::seconds(120));
  // models/mlp.toml as it is, but for its top-level name (the job gets a unique one).
  std::string spec;
  // A bare Debian has no Python at all: that is "torch not installed" too.
  if (!std::filesystem::exists("/usr/bin/python3"))
    GTEST_SKIP() << "SKIP: /usr/bin/python3 is not installed, so neither is python3-torch "
                    "(apt-get install python3-torch to run this test)";
  bool top_level = true;
  for (const auto& line : lines_of(file_bytes(SHMPS_SOURCE_DIR "/models/mlp.toml"))) {
    top_level = top_level && line.rfind('[', 0) != 0;
    if (!top_level || line.rfind("name =", 0) != 0) spec += line + "\n";
  }
  ASSERT_TRUE(has(spec, "[[param]]\nname = \"fc1.weight\"")) << spec;
  Job job("torch", spec);
  job.start_server();
  job.wait_ready();
  auto& trainer = job.start({"shmps-worker", "--segment", job.name(), "--samples", "32000"});
  ASSERT_EQ(trainer.wait(60s), 0) << trainer.output();
  // "test loss 2.1234 acc 0.1234 (rows ...)": the trainer's figures for the weights it leaves.
  const std::string trained = trainer.output();
  const auto at = trained.find("test loss ");
  ASSERT_NE(at, std::string::npos) << trained;
  const auto test = words(lines_of(trained.substr(at)).at(0));
  ASSERT_GE(test.size(), 5u) << trained;
  const std::string path = "/tmp/shmps-test-export-" + job.name() + ".safetensors";
  const Ran exported = run({"shmps-ctl", "export", job.name(), path});
  ASSERT_EQ(exported.code, 0) << exported.out;
  EXPECT_HAS(exported.out, "exported 4 parameters");
  const Ran py = run({"/usr/bin/python3", SHMPS_SOURCE_DIR "/tests/python/load_into_torch.py", path,
                      "--expect-test-loss", test[2], "--expect-test-acc", test[4]},
                     60s);
  std::filesystem::remove(path);
  if (py.code == 77) GTEST_SKIP() << py.out;
  ASSERT_EQ(py.code, 0) << py.out;
  EXPECT_HAS(py.out, "OK: 4 tensors");
  std::cout << py.out;
}
