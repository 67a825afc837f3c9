// The security points of SECURITY.md, each through the real programs:
// - another user (nobody) can neither attach to, read, change nor destroy a job, with any tool;
// - a symbolic link or a file planted by another user at a segment, lock or checkpoint path is
//   refused, never followed or used;
// - shmps-top --listen binds to 127.0.0.1 unless told an address;
// - checkpoint and export files are 0600, 0640 with --group;
// - a checkpoint directory on a full disk (a small tmpfs) keeps the previous checkpoint valid,
//   reports ENOSPC, and training goes on.
// The tests that need another user, a chown or a mount run as root and are skipped otherwise.
#include <grp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/checkpoint.hpp>
#include <shmps/server/safetensors.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/exact.hpp"
#include "../support/expect.hpp"
#include "../support/harness.hpp"

using namespace std::chrono_literals;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Ran;
using shmps::test::run;
using shmps::test::Watchdog;
namespace shm = shmps::shm;
namespace fs = std::filesystem;

namespace {

constexpr uid_t kNobody = 65534;
constexpr gid_t kNogroup = 65534;

const std::string kSpec = shmps::test::pattern_spec(8);  // expect_exact_sum reads as rank 7

#define SKIP_UNLESS_ROOT()                                                                                  \
  if (::geteuid() != 0) GTEST_SKIP() << "needs root (to become another user, chown files or mount a tmpfs)"

// Whether nobody can reach (search) `dir`: every directory above it must be searchable by others.
// Not so in a chroot made in a 0700 directory (its "/" is then 0700, as in the fresh-machine
// check's minimal Debian root): no program can then be run as nobody, and the other-user test
// says so and skips, rather than fail on an exec that cannot work there.
bool nobody_can_reach(const fs::path& dir) {
  const pid_t child = ::fork();
  if (child == 0) {
    if (::setgroups(0, nullptr) != 0 || ::setgid(kNogroup) != 0 || ::setuid(kNobody) != 0) ::_exit(2);
    ::_exit(::access(dir.c_str(), X_OK) == 0 ? 0 : 1);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// Runs a program as nobody (no supplementary groups): its exit code and output. The program is
// copied first to a directory nobody can read (the build tree may not be).
Ran run_as_nobody(std::vector<std::string> argv) {
  if (argv[0].find('/') == std::string::npos) {
    const fs::path dir = fs::temp_directory_path() / "shmps-test-nobody-bin";
    fs::create_directories(dir);
    fs::permissions(dir, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec | fs::perms::others_read |
                             fs::perms::others_exec);
    const fs::path copy = dir / (argv[0] + "." + std::to_string(::getpid()));
    fs::copy_file(shmps::test::bin(argv[0]), copy, fs::copy_options::overwrite_existing);
    fs::permissions(copy, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec | fs::perms::others_read |
                              fs::perms::others_exec);
    argv[0] = copy.string();
  }
  int fds[2];
  if (::pipe(fds) != 0) return {-1, "pipe failed"};
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(fds[0]);
    ::dup2(fds[1], STDOUT_FILENO);
    ::dup2(fds[1], STDERR_FILENO);
    if (::setgroups(0, nullptr) != 0 || ::setgid(kNogroup) != 0 || ::setuid(kNobody) != 0) {
      std::fprintf(stderr, "could not become nobody\n");
      ::_exit(126);
    }
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    std::fprintf(stderr, "exec %s failed\n", args[0]);
    ::_exit(127);
  }
  ::close(fds[1]);
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) out.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  if (argv[0].rfind((fs::temp_directory_path() / "shmps-test-nobody-bin").string(), 0) == 0) {
    std::error_code ec;
    fs::remove(argv[0], ec);  // the copy: nothing of the test is left in /tmp
  }
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out};
}

std::string file_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

unsigned mode_of(const fs::path& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return 07777;
  return st.st_mode & 07777;
}

// A directory of its own, removed at the end.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag) {
    path = fs::temp_directory_path() / shmps::test::unique_segment("sec-" + tag);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// The umask must not decide a file's mode: every test here runs with a wide one.
struct WideUmask {
  mode_t old = ::umask(0);
  ~WideUmask() { ::umask(old); }
};

std::string consistency_of(const std::string& name) {
  auto seg = shm::Segment::open(name, shm::Access::read_only);
  return std::to_string(shm::load_acquire(seg.header().consistency));
}

}  // namespace

// Another user can neither attach, read, change nor destroy a job, with any tool: every attempt
// fails with an error that says the segment belongs to another user, and the job is untouched.
TEST(Security, AnotherUserCanNeitherAttachReadChangeNorDestroyAJobWithAnyTool) {
  SKIP_UNLESS_ROOT();
  if (!nobody_can_reach(fs::temp_directory_path()))
    GTEST_SKIP() << "user nobody cannot reach " << fs::temp_directory_path()
                 << " (a directory above it is not searchable by others: a chroot whose / is 0700?), so it can run "
                    "no program here";
  Watchdog wd(120s);
  Job job("other-user", kSpec);
  auto& server = job.start_server();
  job.wait_ready();
  auto& pusher = job.start({"shmps-test-pusher", "exact", "--pushes", "50"}, {{"SHMPS_RANK", "0"}});
  ASSERT_EQ(pusher.wait(60s), 0) << pusher.output();
  const std::string before = consistency_of(job.name());
  TempDir dir("other-user");
  fs::permissions(dir.path, fs::perms::all);  // nobody could write an export here, were it allowed
  const fs::path exported = dir.path / "stolen.safetensors";
  const std::vector<std::vector<std::string>> attempts{
      {"shmps-ctl", "inspect", job.name()},
      {"shmps-ctl", "workers", job.name()},
      {"shmps-ctl", "export", job.name(), exported.string()},
      {"shmps-ctl", "checkpoint", job.name(), (dir.path / "ckpt.safetensors").string()},
      {"shmps-ctl", "set", job.name(), "consistency=bsp"},
      {"shmps-ctl", "destroy", job.name()},
      {"shmps-ctl", "destroy", job.name(), "--force"},
      {"shmps-top", job.name(), "--json"},
      {"shmps-top", job.name(), "--once"},
      {"shmps-top", job.name(), "--prometheus"},
      {"shmps-test-pusher", "exact", "--pushes", "10"},  // a worker (SHMPS_SEGMENT below)
  };
  ::setenv("SHMPS_SEGMENT", job.name().c_str(), 1);
  ::setenv("SHMPS_RANK", "1", 1);
  for (const auto& argv : attempts) {
    const Ran ran = run_as_nobody(argv);
    std::string what;
    for (const auto& a : argv) what += a + " ";
    EXPECT_NE(ran.code, 0) << what << "\n" << ran.out;
    EXPECT_NE(ran.code, 126) << what << ": " << ran.out;
    EXPECT_NE(ran.code, 127) << what << ": " << ran.out;
    const bool refused = shmps::test::has(ran.out, "another user") || shmps::test::has(ran.out, "ermission denied") ||
                         shmps::test::has(ran.out, "not permitted");
    EXPECT_TRUE(refused) << what << "\n" << ran.out;
    std::cout << what << "-> " << ran.out.substr(0, ran.out.find('\n')) << "\n";
  }
  ::unsetenv("SHMPS_SEGMENT");
  ::unsetenv("SHMPS_RANK");
  // The job is untouched: its files, its server, its values, its setting; nothing was exported.
  for (const auto& path : {shm::segment_path(job.name()), shm::server_lock_path(job.name()), shm::slots_lock_path(job.name())})
    EXPECT_TRUE(fs::exists(path)) << path;
  EXPECT_TRUE(server.running());
  EXPECT_FALSE(fs::exists(exported));
  EXPECT_FALSE(fs::exists(dir.path / "ckpt.safetensors"));
  EXPECT_EQ(consistency_of(job.name()), before);
  shmps::test::expect_exact_sum(job.name(), {50});
}

// A symbolic link or a file another user put at the segment's path or at a lock file's path,
// before the job's server starts: the server refuses it and names it; a link's target is neither
// written, truncated nor chmodded, and the planted thing is left as it was.
TEST(Security, ASymlinkOrFilePlantedAtASegmentOrLockPathIsRefusedNotFollowed) {
  SKIP_UNLESS_ROOT();
  Watchdog wd(120s);
  WideUmask umask;
  TempDir dir("planted");
  const fs::path precious = dir.path / "precious";
  for (const std::string which : {"segment", "server lock", "slots lock"}) {
    for (const bool link : {true, false}) {
      SCOPED_TRACE(which + (link ? ": symlink" : ": file"));
      { std::ofstream(precious) << "precious"; }
      ::chmod(precious.c_str(), 0644);
      Job job("planted", kSpec);
      const std::string path = which == "segment"       ? shm::segment_path(job.name())
                               : which == "server lock" ? shm::server_lock_path(job.name())
                                                        : shm::slots_lock_path(job.name());
      if (link) {
        ASSERT_EQ(::symlink(precious.c_str(), path.c_str()), 0);
        ASSERT_EQ(::lchown(path.c_str(), kNobody, kNogroup), 0);
      } else {
        { std::ofstream(path) << "planted"; }
        ASSERT_EQ(::chown(path.c_str(), kNobody, kNogroup), 0);
        ::chmod(path.c_str(), 0666);
      }
      auto& server = job.start_server();
      EXPECT_NE(server.wait(30s), 0) << server.output();
      const std::string out = server.output();
      EXPECT_HAS(out, path);
      EXPECT_TRUE(shmps::test::has(out, link ? "symbolic link" : "another user")) << out;
      EXPECT_EQ(file_text(precious), "precious");
      EXPECT_EQ(mode_of(precious), 0644u);
      struct stat st {};
      ASSERT_EQ(::lstat(path.c_str(), &st), 0) << path;
      EXPECT_EQ(S_ISLNK(st.st_mode), link);
      EXPECT_EQ(st.st_uid, kNobody);
      if (!link) {
        EXPECT_EQ(file_text(path), "planted");
      }
      // A worker does not take a planted segment for a job either.
      if (which == "segment" && !link) {
        const std::string err = shmps::test::error_of([&] { shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 0}); });
        EXPECT_TRUE(shmps::test::has(err, "another user") || shmps::test::has(err, "every user")) << err;
      }
    }
  }
}

// The checkpoint directory: a file another user put there with a newer serial is not restored
// (the server restores its own newest one, and says which it skipped), a symbolic link is not
// followed, and a link planted at a temporary file's path is refused, not written through.
TEST(Security, CheckpointFilesOfAnotherUserOrSymlinksAreNeitherRestoredNorWrittenThrough) {
  SKIP_UNLESS_ROOT();
  Watchdog wd(120s);
  WideUmask umask;
  TempDir dir("ckpt-planted");
  Job job("ckpt-planted", kSpec);
  {
    auto& server = job.start_server({"--checkpoint-dir", dir.path.string()});
    job.wait_ready();
    auto& pusher = job.start({"shmps-test-pusher", "exact", "--pushes", "40"}, {{"SHMPS_RANK", "0"}});
    ASSERT_EQ(pusher.wait(60s), 0) << pusher.output();
    const Ran made = run({"shmps-ctl", "checkpoint", job.name()});
    ASSERT_EQ(made.code, 0) << made.out;
    server.kill(SIGKILL);
    server.wait(10s);
  }
  const auto own = shmps::server::CheckpointDir(dir.path, job.name()).list();
  ASSERT_EQ(own.size(), 1u);
  // Another user's copy with a newer serial (a valid checkpoint, but not ours), and a newer
  // symbolic link to our own file.
  const fs::path foreign = dir.path / (job.name() + ".00000007.safetensors");
  const fs::path link = dir.path / (job.name() + ".00000009.safetensors");
  fs::copy_file(own[0], foreign);
  ASSERT_EQ(::chown(foreign.c_str(), kNobody, kNogroup), 0);
  ASSERT_EQ(::symlink(own[0].c_str(), link.c_str()), 0);
  ASSERT_EQ(::lchown(link.c_str(), kNobody, kNogroup), 0);
  shmps::test::remove_segment(job.name());  // the shared memory is lost: the server restores
  auto& second = job.start_server({"--checkpoint-dir", dir.path.string()});
  job.wait_ready();
  const std::string log = second.output();
  EXPECT_HAS(log, "event=restore");
  EXPECT_HAS(log, own[0].filename().string());
  EXPECT_HAS(log, "event=checkpoint_skipped");
  EXPECT_HAS(log, foreign.filename().string());
  EXPECT_HAS(log, link.filename().string());
  shmps::test::expect_exact_sum(job.name(), {40});

  // A symbolic link at the temporary path of a file being written: refused, its target intact.
  const fs::path precious = dir.path / "precious";
  { std::ofstream(precious) << "precious"; }
  const fs::path target = dir.path / "out.safetensors";
  const fs::path tmp = target.string() + ".tmp-" + std::to_string(::getpid());
  ASSERT_EQ(::symlink(precious.c_str(), tmp.c_str()), 0);
  std::vector<float> v(4, 1.0f);
  const std::string err = shmps::test::error_of([&] {
    shmps::server::safetensors::write_file(target, {{"v", "F32", {4}, std::as_bytes(std::span<const float>(v))}}, {});
  });
  EXPECT_HAS(err, tmp.string());
  EXPECT_EQ(file_text(precious), "precious");
  EXPECT_FALSE(fs::exists(target));
}

// shmps-top --listen without an address (":PORT" or "PORT") serves on 127.0.0.1 only; an
// address given (0.0.0.0) is used as given.
TEST(Security, ThePrometheusListenerBindsToLocalhostUnlessToldOtherwise) {
  Watchdog wd(60s);
  Job job("listen", kSpec);
  job.start_server();
  job.wait_ready();
  // The local address of a listening TCP socket on `port`, from /proc/net/tcp (hex, e.g. 0100007F).
  auto listening_address = [](int port) {
    std::ifstream in("/proc/net/tcp");
    std::string line;
    char want[8];
    std::snprintf(want, sizeof want, ":%04X", port);
    while (std::getline(in, line)) {
      std::istringstream s(line);
      std::string slot, local, remote, state;
      s >> slot >> local >> remote >> state;
      if (state == "0A" && local.size() > 5 && local.substr(local.size() - 5) == want) return local.substr(0, local.size() - 5);
    }
    return std::string("(not listening)");
  };
  for (const auto& [arg, want] : std::vector<std::pair<std::string, std::string>>{
           {":0", "0100007F"}, {"0", "0100007F"}, {"127.0.0.1:0", "0100007F"}, {"0.0.0.0:0", "00000000"}}) {
    SCOPED_TRACE(arg);
    auto& top = job.start({"shmps-top", job.name(), "--listen", arg});
    int port = 0;
    const auto until = std::chrono::steady_clock::now() + 20s;
    while (port == 0 && std::chrono::steady_clock::now() < until && top.running()) {
      const std::string out = top.output();
      const auto at = out.find("/metrics");
      if (at != std::string::npos) port = std::stoi(out.substr(out.rfind(':', at) + 1));
      std::this_thread::sleep_for(10ms);
    }
    ASSERT_GT(port, 0) << top.output();
    if (want == "0100007F") {
      EXPECT_HAS(top.output(), "http://127.0.0.1:");
    }
    EXPECT_EQ(listening_address(port), want) << top.output();
    top.kill(SIGTERM);
    EXPECT_EQ(top.wait(20s), 0) << top.output();
  }
}

// Checkpoint and export files are created 0600 (whatever the umask), or 0640 with --group (the
// server's, for its checkpoints; shmps-ctl export's, for an export).
TEST(Security, CheckpointAndExportFilesAre0600Or0640WithGroup) {
  Watchdog wd(120s);
  WideUmask umask;
  for (const bool group : {false, true}) {
    SCOPED_TRACE(group ? "--group" : "private");
    TempDir dir(group ? "mode-group" : "mode-private");
    Job job("modes", kSpec);
    std::vector<std::string> args{"--checkpoint-dir", dir.path.string(), "--checkpoint-every", "100ms"};
    if (group) args.push_back("--group");
    auto& server = job.start_server(args);
    job.wait_ready();
    auto& pusher = job.start({"shmps-test-pusher", "exact", "--pushes", "20"}, {{"SHMPS_RANK", "0"}});
    ASSERT_EQ(pusher.wait(60s), 0) << pusher.output();
    const unsigned want = group ? 0640 : 0600;
    const fs::path asked = dir.path / "asked.safetensors";
    const Ran in_dir = run({"shmps-ctl", "checkpoint", job.name()});
    ASSERT_EQ(in_dir.code, 0) << in_dir.out;
    const Ran to_file = run({"shmps-ctl", "checkpoint", job.name(), asked.string()});
    ASSERT_EQ(to_file.code, 0) << to_file.out;
    std::vector<std::string> exp{"shmps-ctl", "export", job.name(), (dir.path / "export.safetensors").string()};
    if (group) exp.push_back("--group");
    const Ran exported = run(exp);
    ASSERT_EQ(exported.code, 0) << exported.out;
    server.kill(SIGTERM);  // and the checkpoint at a graceful stop
    EXPECT_EQ(server.wait(30s), 0) << server.output();
    std::size_t files = 0;
    for (const auto& entry : fs::directory_iterator(dir.path)) {
      ++files;
      EXPECT_EQ(mode_of(entry.path()), want) << entry.path();
    }
    // At least the one asked in the directory, the one asked to a file and the export (a periodic
    // one and the one at the stop are skipped when nothing changed since the one before).
    EXPECT_GE(files, 3u);
  }
}

// A checkpoint directory on a full disk (a 4 MiB tmpfs, filled up after the first checkpoint):
// the next checkpoint fails with ENOSPC said plainly, to shmps-ctl and in the server's log; the
// previous checkpoint is still there and valid, no temporary file is left, and training goes on
// (the pushers finish, the sum is exact). Once there is room again, checkpoints succeed.
TEST(Security, AFullCheckpointDiskKeepsThePreviousCheckpointReportsEnospcAndTrainingGoesOn) {
  SKIP_UNLESS_ROOT();
  Watchdog wd(120s);
  TempDir dir("full");
  if (::mount("tmpfs", dir.path.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0700") != 0)
    GTEST_SKIP() << "cannot mount a tmpfs at " << dir.path << " (" << std::strerror(errno)
                 << "): the full-disk test needs root and mount permission";
  struct Unmount {
    fs::path path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{dir.path};
  Job job("full", kSpec);
  auto& server = job.start_server({"--checkpoint-dir", dir.path.string(), "--keep", "0"});
  job.wait_ready();
  auto& first = job.start({"shmps-test-pusher", "exact", "--pushes", "30"}, {{"SHMPS_RANK", "0"}});
  ASSERT_EQ(first.wait(60s), 0) << first.output();
  const Ran made = run({"shmps-ctl", "checkpoint", job.name()});
  ASSERT_EQ(made.code, 0) << made.out;
  const auto before = shmps::server::CheckpointDir(dir.path, job.name()).list();
  ASSERT_EQ(before.size(), 1u);
  // Fill the disk.
  {
    std::ofstream fill(dir.path / "filler", std::ios::binary);
    const std::string mib(1 << 20, 'x');
    for (int i = 0; i < 8 && fill; ++i) fill.write(mib.data(), static_cast<std::streamsize>(mib.size()));
  }
  auto& pusher = job.start({"shmps-test-pusher", "exact", "--pushes", "400", "--pause-us", "2000"}, {{"SHMPS_RANK", "1"}});
  const Ran full = run({"shmps-ctl", "checkpoint", job.name()});
  EXPECT_EQ(full.code, 1) << full.out;
  EXPECT_HAS(full.out, "No space left on device");
  EXPECT_HAS(full.out, dir.path.string());
  // Training goes on while the disk is full.
  EXPECT_EQ(pusher.wait(60s), 0) << pusher.output();
  EXPECT_TRUE(server.running());
  {
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    EXPECT_EQ(shm::load_acquire(seg.header().checkpoint_failures), 1u);
    EXPECT_EQ(shm::load_acquire(seg.header().checkpoints), 1u);
  }
  EXPECT_HAS(server.output(), "event=checkpoint_failed");
  // The previous checkpoint is intact, and nothing else is in the directory.
  const auto after = shmps::server::CheckpointDir(dir.path, job.name()).list();
  ASSERT_EQ(after, before);
  EXPECT_NO_THROW(shmps::server::read_checkpoint(after[0]));
  for (const auto& entry : fs::directory_iterator(dir.path))
    EXPECT_TRUE(entry.path() == before[0] || entry.path().filename() == "filler") << "left: " << entry.path();
  shmps::test::expect_exact_sum(job.name(), {30, 400});
  // Room again: the next checkpoint is written.
  fs::remove(dir.path / "filler");
  const Ran again = run({"shmps-ctl", "checkpoint", job.name()});
  EXPECT_EQ(again.code, 0) << again.out;
  EXPECT_EQ(shmps::server::CheckpointDir(dir.path, job.name()).list().size(), 2u);
  server.kill(SIGKILL);
  server.wait(10s);
}
