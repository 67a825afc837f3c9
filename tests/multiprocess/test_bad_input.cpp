// Bad input gets a clear error and changes nothing (ARCHITECTURE.md invariant 5), through the real
// programs (shmps-server, shmps-ctl) and the worker API: a malformed spec, unknown names, wrong
// sizes, NaN/Inf gradients, a name with '/', a segment that is served, holds another model or
// another layout, a model too large for /dev/shm, bad ranks.
#include <grp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <iostream>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/expect.hpp"
#include "../support/exact.hpp"
#include "../support/harness.hpp"

using namespace std::chrono_literals;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Watchdog;
namespace shm = shmps::shm;

using shmps::test::error_of;
using shmps::test::file_exists;
using shmps::test::has;
using shmps::test::expect_no_files;
using shmps::test::Ran;
using shmps::test::run;

namespace {

const std::string kSpec = shmps::test::pattern_spec(4);
constexpr std::size_t kW = 120000, kB = 7;






std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}


// 1-based line of the first line of `path` that contains `needle`.
int line_of(const std::string& path, const std::string& needle) {
  std::ifstream in(path);
  std::string line;
  for (int n = 1; std::getline(in, line); ++n)
    if (has(line, needle)) return n;
  return -1;
}

std::vector<float> pull_all(shmps::Worker& w, const char* name, std::size_t n) {
  std::vector<float> v(n);
  w.pull(name, v);
  return v;
}

const shm::WorkerSlot& slot_of(const shm::Segment& seg, unsigned rank) { return seg.slot(rank); }

}  // namespace

// ---- Malformed model spec: exit 2, file:line: field: problem, nothing created ------------------

TEST(BadInput, MalformedSpecNamesFileLineAndFieldAndCreatesNothing) {
  Watchdog wd(std::chrono::seconds(60));
  struct Case {
    const char* tag;
    std::string from, to;  // replaced in kSpec
    const char* needle;    // text on the offending line
    std::vector<std::string> expected;
  };
  const std::vector<Case> cases = {
      {"neglr", "lr = 1.0", "lr = -1", "lr = -1", {"optimizer.lr", "must be a positive number", "-1"}},
      {"unknown", "lr = 1.0", "lr = 1.0\nlearning_rate = 0.1", "learning_rate", {"optimizer.learning_rate", "unknown key", "valid keys"}},
      {"syntax", "lr = 1.0", "lr = = 1.0", "lr = =", {"syntax error"}},
      {"shape", "shape = [7]", "shape = [7, 0]", "shape = [7, 0]", {"param[1].shape"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.tag);
    std::string text = kSpec;
    const auto at = text.find(c.from);
    ASSERT_NE(at, std::string::npos);
    text.replace(at, c.from.size(), c.to);
    Job job(c.tag, text);
    Process& server = job.start_server();
    EXPECT_EQ(server.wait(20s), 2);
    const std::string out = server.output();
    const int line = line_of(job.spec_path(), c.needle);
    ASSERT_GT(line, 1);
    EXPECT_HAS(out, "shmps-server: error: " + job.spec_path() + ":" + std::to_string(line) + ":");
    for (const auto& e : c.expected) EXPECT_HAS(out, e);
    // Never ready: no segment was made (a server only ever removes its segment when asked to,
    // --remove-on-stop), nor any lock file.
    expect_no_files(job.name());
  }
}

// ---- Unknown parameter name ---------------------------------------------------------------------

TEST(BadInput, UnknownParameterNameThrowsListingKnownOnesAndPublishesNothing) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("unknown", kSpec);
  job.start_server();
  job.wait_ready();
  shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 0});
  std::vector<float> ones(kB, 1.0f);
  w.wait_applied(w.push("b", ones));
  const auto before_b = pull_all(w, "b", kB);
  ASSERT_EQ(w.published(), 1u);

  std::vector<float> buf(kB, 1.0f);
  for (const std::string& msg :
       {error_of([&] { w.push("bias", buf); }), error_of([&] { w.push("bias", 2, std::span<const float>(buf.data(), 3)); }),
        error_of([&] { w.pull("bias", buf); }), error_of([&] { w.pull("bias", 1, std::span<float>(buf.data(), 2)); }),
        error_of([&] { (void)w.param("bias"); })}) {
    EXPECT_HAS(msg, "unknown parameter 'bias'");
    EXPECT_HAS(msg, job.name());
    EXPECT_HAS(msg, "w, b");  // the known ones, in segment order
  }
  EXPECT_EQ(w.published(), 1u);
  EXPECT_EQ(pull_all(w, "b", kB), before_b);
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  EXPECT_EQ(shm::load_acquire(slot_of(seg, 0).published), 1u);
  EXPECT_EQ(shm::load_counter(seg.header().records_applied), 1u);
}

// ---- Size mismatch ------------------------------------------------------------------------------

TEST(BadInput, SizeMismatchAndOutOfRangeThrowWithBothSizesAndPublishNothing) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("size", kSpec);
  job.start_server();
  job.wait_ready();
  shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 1});
  const auto before_w = pull_all(w, "w", kW);
  const auto before_b = pull_all(w, "b", kB);

  std::vector<float> g(kW + 10, 1.0f);
  // Whole-parameter push and pull of the wrong size.
  std::string msg = error_of([&] { w.push("b", std::span<const float>(g.data(), 6)); });
  EXPECT_HAS(msg, "6 elements");
  EXPECT_HAS(msg, "the parameter has 7 [7]");
  EXPECT_HAS(msg, "nothing was pushed");
  msg = error_of([&] { w.push("w", std::span<const float>(g.data(), kW + 1)); });
  EXPECT_HAS(msg, "120001 elements");
  EXPECT_HAS(msg, "120000 [3, 40000]");
  msg = error_of([&] { w.pull("b", std::span<float>(g.data(), 8)); });
  EXPECT_HAS(msg, "8 elements");
  EXPECT_HAS(msg, "has 7 [7]");
  // Ranges that run past the end, or start past it.
  msg = error_of([&] { w.push("w", 119990, std::span<const float>(g.data(), 20)); });
  EXPECT_HAS(msg, "[119990, 120010)");
  EXPECT_HAS(msg, "120000 elements");
  msg = error_of([&] { w.push("b", 8, std::span<const float>(g.data(), 1)); });
  EXPECT_HAS(msg, "[8, 9)");
  EXPECT_HAS(msg, "7 elements");
  msg = error_of([&] { w.pull("w", kW, std::span<float>(g.data(), 1)); });
  EXPECT_HAS(msg, "[120000, 120001)");
  EXPECT_HAS(msg, "120000 elements");
  // An offset so large that offset + length wraps around must not slip through.
  msg = error_of([&] { w.push("b", std::numeric_limits<std::size_t>::max(), std::span<const float>(g.data(), 2)); });
  EXPECT_HAS(msg, "outside the parameter");
  msg = error_of([&] { w.push("b", 0, std::span<const float>(g.data(), 0)); });
  EXPECT_HAS(msg, "empty");

  EXPECT_EQ(w.published(), 0u);
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  EXPECT_EQ(shm::load_acquire(slot_of(seg, 1).published), 0u);
  EXPECT_EQ(shm::load_acquire(seg.ring(1).tail), 0u);  // no record was committed
  EXPECT_EQ(shm::load_counter(seg.header().records_applied), 0u);
  EXPECT_EQ(pull_all(w, "w", kW), before_w);
  EXPECT_EQ(pull_all(w, "b", kB), before_b);
}

// ---- NaN and Inf gradients ----------------------------------------------------------------------

TEST(BadInput, NonFiniteGradientIsRejectedCountedAndNeverApplied) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("nan", kSpec);
  job.start_server();
  job.wait_ready();
  shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 2});
  // Non-trivial values first.
  std::vector<float> g(kW);
  for (std::size_t i = 0; i < kW; ++i) g[i] = static_cast<float>(static_cast<int>(i % 5) - 2);
  w.wait_applied(w.push("w", g));
  const auto before = pull_all(w, "w", kW);
  ASSERT_EQ(before[1], 1.0f);

  std::vector<float> bad = g;
  bad[5] = std::numeric_limits<float>::quiet_NaN();
  std::string msg = error_of([&] { w.push("w", bad); });
  EXPECT_HAS(msg, "push to 'w' rejected: element 5 is NaN");
  EXPECT_HAS(msg, "nothing was pushed");
  // In a range: the index is the parameter's element, not the position in the span.
  std::vector<float> part(3000, 1.0f);
  part[2003] = -std::numeric_limits<float>::infinity();
  msg = error_of([&] { w.push("w", 1000, part); });
  EXPECT_HAS(msg, "element 3003 is infinite");

  EXPECT_EQ(w.published(), 1u);
  EXPECT_EQ(pull_all(w, "w", kW), before);
  {
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    EXPECT_EQ(shm::load_counter(slot_of(seg, 2).pushes_rejected), 2u);
    EXPECT_EQ(shm::load_acquire(slot_of(seg, 2).published), 1u);
  }
  // shmps-ctl inspect shows the count in the slot's row:
  // RANK STATUS PID GEN PUBLISHED APPLIED RING(2 words) REJECTED HEARTBEAT
  const Ran inspect = run({"shmps-ctl", "inspect", job.name()});
  ASSERT_EQ(inspect.code, 0) << inspect.out;
  EXPECT_HAS(inspect.out, "REJECTED");
  std::istringstream lines(inspect.out);
  bool found = false;
  for (std::string line; std::getline(lines, line);) {
    std::istringstream words(line);
    std::vector<std::string> t;
    for (std::string x; words >> x;) t.push_back(x);
    if (t.size() >= 9 && t[0] == "2" && t[1] == "alive") {
      found = true;
      EXPECT_EQ(t[2], std::to_string(::getpid())) << line;
      EXPECT_EQ(t[4], "1") << line;  // published
      EXPECT_EQ(t[8], "2") << line;  // rejected
    }
  }
  EXPECT_TRUE(found) << inspect.out;

  // The rejected records left nothing in the ring: the next good push is applied alone, exactly.
  std::vector<float> ones(kW, 1.0f);
  w.wait_applied(w.push("w", ones));
  EXPECT_EQ(w.published(), 2u);
  const auto after = pull_all(w, "w", kW);
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < kW; ++i) wrong += after[i] != before[i] - 1.0f;
  EXPECT_EQ(wrong, 0u);
}

// ---- A segment name with '/' --------------------------------------------------------------------

TEST(BadInput, SegmentNameWithSlashIsRefusedEverywhere) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("slash", kSpec);
  const Ran server = run({"shmps-server", "--spec", job.spec_path(), "--name", "a/b"});
  EXPECT_EQ(server.code, 1) << server.out;
  EXPECT_HAS(server.out, "'/'");
  EXPECT_HAS(server.out, "a/b");
  EXPECT_FALSE(file_exists("/dev/shm/shmps.a"));
  expect_no_files(job.name());

  // In the spec itself: a spec error (exit 2) at the name's line.
  const std::string path = "/tmp/shmps-test-slash-" + std::to_string(::getpid()) + ".toml";
  {
    std::ofstream out(path);
    out << "name = \"a/b\"\n" << kSpec;
  }
  const Ran from_spec = run({"shmps-server", "--spec", path});
  std::filesystem::remove(path);
  EXPECT_EQ(from_spec.code, 2) << from_spec.out;
  EXPECT_HAS(from_spec.out, path + ":1:");
  EXPECT_HAS(from_spec.out, "name: ");
  EXPECT_HAS(from_spec.out, "'/'");
  EXPECT_FALSE(file_exists("/dev/shm/shmps.a"));

  const std::string msg = error_of([] { shmps::Worker w(shmps::WorkerOptions{.segment = "a/b"}); });
  EXPECT_HAS(msg, "'/'");
  EXPECT_HAS(msg, "a/b");

  const Ran ctl = run({"shmps-ctl", "inspect", "a/b"});
  EXPECT_EQ(ctl.code, 1);
  EXPECT_HAS(ctl.out, "'/'");
}

// ---- A segment that already exists ---------------------------------------------------------------

TEST(BadInput, SecondServerOnALiveSegmentFailsFastAndTheFirstKeepsWorking) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("twice", kSpec);
  Process& first = job.start_server();
  job.wait_ready();

  const auto t0 = std::chrono::steady_clock::now();
  const Ran second = run({"shmps-server", "--spec", job.spec_path(), "--log-level", "warn"});
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  EXPECT_EQ(second.code, 1) << second.out;
  EXPECT_HAS(second.out, "segment '" + job.name() + "' is already served by a live server (pid " +
                             std::to_string(first.pid()) + ")");
  EXPECT_HAS(second.out, "--name");

  ASSERT_TRUE(first.running());
  shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 0});
  std::vector<float> ones(kB, 1.0f);
  w.wait_applied(w.push("b", ones));
  EXPECT_EQ(pull_all(w, "b", kB), std::vector<float>(kB, -1.0f));
  EXPECT_TRUE(first.running());
}

TEST(BadInput, ExistingSegmentOfAnotherModelIsRefusedAndLeftUntouched) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("model", kSpec);
  Process& first = job.start_server();
  job.wait_ready();
  {
    shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 0});
    std::vector<float> ones(kB, 1.0f);
    w.wait_applied(w.push("b", ones));
  }
  first.kill(SIGTERM);
  ASSERT_EQ(first.wait(20s), 0) << first.output();
  ASSERT_TRUE(file_exists(shm::segment_path(job.name())));  // kept for a restart
  const std::string bytes = file_bytes(shm::segment_path(job.name()));
  ASSERT_FALSE(bytes.empty());

  std::string other_spec = kSpec;
  other_spec.replace(other_spec.find("[3, 40000]"), 10, "[3, 40001]");
  Job other("other", other_spec);
  Process& second = other.start_server({"--name", job.name()});
  EXPECT_EQ(second.wait(20s), 1) << second.output();
  const std::string out = second.output();
  EXPECT_HAS(out, "segment '" + job.name() + "' already exists and holds another model than " + other.spec_path());
  EXPECT_HAS(out, "shmps-ctl destroy " + job.name());
  EXPECT_TRUE(file_bytes(shm::segment_path(job.name())) == bytes) << "the old segment was modified";
  EXPECT_FALSE(file_exists(shm::segment_path(other.name())));

  // The old model is still whole: its own server resumes it with the values it had.
  Process& again = job.start_server();
  job.wait_ready();
  shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 0});
  EXPECT_EQ(pull_all(w, "b", kB), std::vector<float>(kB, -1.0f));
  EXPECT_TRUE(again.running());
}

// ---- A segment of another layout version or fingerprint -------------------------------------------

TEST(BadInput, SegmentOfAnotherLayoutIsRefusedByServerWorkerAndCtl) {
  Watchdog wd(std::chrono::seconds(60));
  struct Case {
    const char* tag;
    std::uint32_t version;
    std::uint64_t fingerprint;
    std::vector<std::string> expected;
  };
  const std::uint64_t wrong_fp = shm::kLayoutFingerprint ^ 0x5a5a;
  std::ostringstream fp_hex;
  fp_hex << "fingerprint 0x" << std::hex << wrong_fp << " but this build has 0x" << shm::kLayoutFingerprint;
  const std::vector<Case> cases = {
      {"version", shm::kLayoutVersion + 6, shm::kLayoutFingerprint,
       {"has layout version " + std::to_string(shm::kLayoutVersion + 6) + " but this build uses version " +
        std::to_string(shm::kLayoutVersion)}},
      {"fingerprint", shm::kLayoutVersion, wrong_fp, {fp_hex.str()}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.tag);
    Job job(c.tag, kSpec);
    const std::uint64_t size = 1 << 20;
    {
      auto seg = shm::Segment::create(job.name(), size);
      auto& h = seg.header();
      h.magic = shm::kMagic;
      h.layout_version = c.version;
      h.header_bytes = sizeof(shm::SegmentHeader);
      h.fingerprint = c.fingerprint;
      h.total_bytes = size;
      shm::store_release(h.state, static_cast<std::uint32_t>(shm::SegmentState::ready));
    }
    const std::string path = shm::segment_path(job.name());
    const std::string bytes = file_bytes(path);
    struct stat before {};
    ASSERT_EQ(::stat(path.c_str(), &before), 0);

    Process& server = job.start_server();
    EXPECT_EQ(server.wait(20s), 1) << server.output();
    const std::string worker = error_of([&] { shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 0}); });
    const Ran inspect = run({"shmps-ctl", "inspect", job.name()});
    EXPECT_EQ(inspect.code, 1) << inspect.out;
    for (const std::string& msg : {server.output(), worker, inspect.out}) {
      EXPECT_HAS(msg, "segment '" + job.name() + "' (" + path + ")");
      for (const auto& e : c.expected) EXPECT_HAS(msg, e);
      EXPECT_HAS(msg, "shmps-ctl destroy " + job.name());  // how to fix it
    }
    struct stat after {};
    ASSERT_EQ(::stat(path.c_str(), &after), 0);
    EXPECT_TRUE(file_bytes(path) == bytes) << "the segment was modified";
    EXPECT_EQ(after.st_size, before.st_size);
    EXPECT_EQ(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
    EXPECT_EQ(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec);

    // The advice works: destroy it, and a server makes a fresh segment.
    const Ran destroy = run({"shmps-ctl", "destroy", job.name()});
    EXPECT_EQ(destroy.code, 0) << destroy.out;
    expect_no_files(job.name());
    job.start_server();
    job.wait_ready();
  }
}

// ---- A model larger than /dev/shm -----------------------------------------------------------------

TEST(BadInput, ModelLargerThanDevShmFailsAtStartAndCreatesNoSegment) {
  Watchdog wd(std::chrono::seconds(60));
  std::string spec = kSpec;
  spec.replace(spec.find("[3, 40000]"), 10, "[1000000000, 1000]");
  Job job("huge", spec);
  Process& server = job.start_server();
  const int code = server.wait(20s);
  const std::string out = server.output();
  EXPECT_NE(code, 0) << out;
  EXPECT_EQ(code, 1) << out;
  EXPECT_HAS(out, "segment '" + job.name() + "' needs ");
  EXPECT_HAS(out, "/dev/shm has only");
  EXPECT_HAS(out, "enlarge /dev/shm");
  // Never ready: no segment was made.
  EXPECT_FALSE(file_exists(shm::segment_path(job.name())));
  EXPECT_FALSE(file_exists(shm::slots_lock_path(job.name())));
}

// ---- Bad ranks ------------------------------------------------------------------------------------

TEST(BadInput, RankOutOfRangeOrHeldByALiveWorkerIsRefused) {
  Watchdog wd(std::chrono::seconds(60));
  Job job("rank", kSpec);
  job.start_server();
  job.wait_ready();

  std::string msg = error_of([&] { shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 4}); });
  EXPECT_HAS(msg, "rank 4 is out of range");
  EXPECT_HAS(msg, "4 worker slots (ranks 0 to 3)");
  EXPECT_HAS(msg, "max_workers");

  // A live holder of slot 1: another Worker in this process, and a worker process.
  shmps::Worker holder(shmps::WorkerOptions{.segment = job.name(), .rank = 1});
  std::vector<float> ones(kB, 1.0f);
  holder.wait_applied(holder.push("b", ones));
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const std::uint64_t generation = shm::load_acquire(slot_of(seg, 1).generation);

  msg = error_of([&] { shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 1}); });
  EXPECT_HAS(msg, "worker slot 1 of segment '" + job.name() + "' is held by a live process (pid " +
                      std::to_string(::getpid()) + ")");
  Process& other = job.start({"shmps-test-pusher", "exact", "--pushes", "1"}, {{"SHMPS_RANK", "1"}});
  EXPECT_EQ(other.wait(20s), 1);
  EXPECT_HAS(other.output(), "is held by a live process (pid " + std::to_string(::getpid()) + ")");
  // An environment rank that is not a number.
  Process& garbage = job.start({"shmps-test-pusher", "exact", "--pushes", "1"}, {{"SHMPS_RANK", "one"}});
  EXPECT_EQ(garbage.wait(20s), 1);
  EXPECT_HAS(garbage.output(), "SHMPS_RANK='one' is not a rank");

  // The holder's slot is untouched and it keeps working.
  EXPECT_EQ(shm::load_acquire(slot_of(seg, 1).generation), generation);
  EXPECT_EQ(shm::load_acquire(slot_of(seg, 1).pid), ::getpid());
  EXPECT_EQ(shm::load_acquire(slot_of(seg, 1).published), 1u);
  holder.wait_applied(holder.push("b", ones));
  EXPECT_EQ(pull_all(holder, "b", kB), std::vector<float>(kB, -2.0f));
}

// Segment and lock files are the job owner's alone (0600), or its group's with --group (0660);
// a process of another user cannot attach and is told why.
TEST(Security, SegmentAndLockFilesArePrivateAndAnotherUserGetsAClearError) {
  Watchdog wd(std::chrono::seconds(60));
  for (const bool group : {false, true}) {
    Job job(group ? "group" : "private", kSpec);
    job.start_server(group ? std::vector<std::string>{"--group"} : std::vector<std::string>{});
    job.wait_ready();
    shmps::Worker first(shmps::WorkerOptions{.segment = job.name(), .rank = 0});  // creates nothing, but holds a slot
    const unsigned want = group ? 0660 : 0600;
    for (const auto& path : {shm::segment_path(job.name()), shm::server_lock_path(job.name()), shm::slots_lock_path(job.name())}) {
      struct stat st {};
      ASSERT_EQ(::stat(path.c_str(), &st), 0) << path;
      EXPECT_EQ(st.st_mode & 0777, want) << path;
    }
    if (::geteuid() != 0) {
      std::cout << "[  SKIPPED ] the other-user half needs root (to become another user)\n";
      continue;
    }
    // A child that becomes "nobody" (no group in common) tries to attach.
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    const pid_t child = ::fork();
    if (child == 0) {
      ::close(fds[0]);
      std::string msg = "(attached)";
      if (::setgroups(0, nullptr) != 0 || ::setgid(65534) != 0 || ::setuid(65534) != 0) msg = "(could not drop privileges)";
      else msg = error_of([&] { shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 1}); });
      if (::write(fds[1], msg.data(), msg.size()) < 0) ::_exit(2);
      ::_exit(0);
    }
    ::close(fds[1]);
    std::string msg;
    char buf[512];
    for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) msg.append(buf, static_cast<std::size_t>(n));
    ::close(fds[0]);
    int status = 0;
    ::waitpid(child, &status, 0);
    EXPECT_NE(msg.find("belongs to another user"), std::string::npos) << msg;
    EXPECT_NE(msg.find("--group"), std::string::npos) << msg;
    EXPECT_EQ(first.published(), 0u);  // the job is untouched
  }
}
