#include "harness.hpp"

#include <algorithm>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::test {

namespace {

// Everything a watchdog must clean up if a test hangs.
std::mutex g_mutex;
std::set<pid_t> g_children;
std::set<std::string> g_segments;

constexpr auto kReady = static_cast<std::uint32_t>(shm::SegmentState::ready);

// The segment's server_epoch, or 0 if there is no segment (or none that can be read yet).
std::uint64_t epoch_of(const std::string& name) {
  try {
    if (!shm::Segment::exists(name)) return 0;
    const auto seg = shm::Segment::open(name, shm::Access::read_only);
    return shm::load_acquire(seg.header().server_epoch);
  } catch (const Error&) {
    return 0;
  }
}

void cleanup_everything() {
  std::lock_guard lock(g_mutex);
  for (pid_t pid : g_children) ::kill(pid, SIGKILL);
  for (const auto& name : g_segments) remove_segment(name);
}

}  // namespace

std::string bin(const std::string& program) {
  const char* dir = std::getenv("SHMPS_BIN_DIR");
  if (dir == nullptr) {
    // Run by hand from the build tree: the test binary is in bin/ too.
    std::error_code ec;
    auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
    return (self.parent_path() / program).string();
  }
  return std::string(dir) + "/" + program;
}

std::string unique_segment(const std::string& tag) {
  static std::atomic<int> counter{0};
  return "t-" + tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
}

TempDir::TempDir(const std::string& tag) : path_(std::filesystem::temp_directory_path() / unique_segment(tag)) {
  std::filesystem::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

void remove_segment(const std::string& name) {
  std::error_code ec;
  std::filesystem::remove(shm::segment_path(name), ec);
  std::filesystem::remove(shm::server_lock_path(name), ec);
  std::filesystem::remove(shm::slots_lock_path(name), ec);
  // A job with server groups: its replicas (<name>.g<k>) and their sync segments, and a job on
  // several hosts' replicas (<name>.h<k>).
  for (std::uint32_t g = 0; g < 8; ++g) {
    for (const std::string& replica : {shm::replica_name(name, g), shm::host_replica_name(name, g)}) {
      std::filesystem::remove(shm::segment_path(replica), ec);
      std::filesystem::remove(shm::segment_path(replica + ".sync"), ec);
      std::filesystem::remove(shm::server_lock_path(replica), ec);
      std::filesystem::remove(shm::slots_lock_path(replica), ec);
    }
  }
}

Process::Process(std::vector<std::string> argv, std::vector<std::pair<std::string, std::string>> env) {
  if (argv.at(0).find('/') == std::string::npos) argv[0] = bin(argv[0]);
  char path[] = "/tmp/shmps-test-log-XXXXXX";
  const int log_fd = ::mkstemp(path);
  if (log_fd < 0) throw std::runtime_error("mkstemp failed");
  log_path_ = path;
  const pid_t parent = ::getpid();
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(1);
    ::dup2(log_fd, STDOUT_FILENO);
    ::dup2(log_fd, STDERR_FILENO);
    for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    std::fprintf(stderr, "exec %s failed\n", args[0]);
    ::_exit(127);
  }
  ::close(log_fd);
  std::lock_guard lock(g_mutex);
  g_children.insert(pid_);
}

Process::~Process() {
  if (!done_) {
    ::kill(pid_, SIGKILL);
    wait(std::chrono::seconds(10));
  }
  std::error_code ec;
  std::filesystem::remove(log_path_, ec);
}

bool Process::running() {
  if (done_) return false;
  int status = 0;
  if (::waitpid(pid_, &status, WNOHANG) == pid_) {
    status_ = status;
    done_ = true;
    std::lock_guard lock(g_mutex);
    g_children.erase(pid_);
  }
  return !done_;
}

int Process::wait(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (running()) {
    if (std::chrono::steady_clock::now() > deadline) {
      ADD_FAILURE() << "process " << pid_ << " did not exit within " << timeout.count() << " ms; killing it. Output:\n"
                    << output();
      ::kill(pid_, SIGKILL);
      while (running()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (WIFEXITED(status_)) return WEXITSTATUS(status_);
  if (WIFSIGNALED(status_)) return 128 + WTERMSIG(status_);
  return -2;
}

void Process::kill(int signal) {
  if (!done_) ::kill(pid_, signal);
}

std::string Process::output() const {
  std::ifstream in(log_path_);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

Job::Job(const std::string& tag, const std::string& spec_toml_without_name) : name_(unique_segment(tag)) {
  {
    std::lock_guard lock(g_mutex);
    g_segments.insert(name_);
  }
  spec_path_ = "/tmp/shmps-test-spec-" + name_ + ".toml";
  std::ofstream out(spec_path_);
  out << "name = \"" << name_ << "\"\n" << spec_toml_without_name;
}

Job::~Job() {
  for (auto& p : processes_) p->kill(SIGKILL);
  processes_.clear();
  remove_segment(name_);
  std::error_code ec;
  std::filesystem::remove(spec_path_, ec);
  std::lock_guard lock(g_mutex);
  g_segments.erase(name_);
}

Process& Job::start_server(std::vector<std::string> extra_args, std::vector<std::pair<std::string, std::string>> env) {
  epoch_before_server_ = epoch_of(name_);
  std::vector<std::string> argv{"shmps-server", "--spec", spec_path_};
  argv.insert(argv.end(), extra_args.begin(), extra_args.end());
  processes_.push_back(std::make_unique<Process>(argv, std::move(env)));
  server_ = processes_.back().get();
  return *server_;
}

void Job::wait_ready(std::chrono::milliseconds timeout) {
  if (server_ == nullptr) FAIL() << "wait_ready() before start_server()";
  wait_segment_ready(name_, *server_, epoch_before_server_, timeout);
}

std::uint64_t server_epoch_of(const std::string& segment) { return epoch_of(segment); }

void wait_segment_ready(const std::string& name, Process& server, std::uint64_t epoch_before,
                        std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string seen = "no segment";  // what the segment said last, for the failure message
  while (std::chrono::steady_clock::now() < deadline) {
    try {
      if (shm::Segment::exists(name)) {
        // Re-mapped on every try: the server may still be creating (or recreating) the file.
        const auto seg = shm::Segment::open(name, shm::Access::read_only);
        const auto& h = seg.header();
        const std::uint32_t state = shm::load_acquire(h.state);
        const pid_t pid = shm::load_acquire(h.server_pid);
        const std::uint64_t epoch = shm::load_acquire(h.server_epoch);
        // The server stores its pid, then the new epoch, then "ready", last.
        if (state == kReady && pid == server.pid() && epoch > epoch_before) return;
        seen = "state " + std::to_string(state) + ", server_pid " + std::to_string(pid) + ", server_epoch " +
               std::to_string(epoch) + " (before this server: " + std::to_string(epoch_before) + ")";
      }
    } catch (const Error& e) {
      seen = e.what();
    }
    if (!server.running()) {
      FAIL() << "the server exited before the segment was ready:\n" << server.output();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  FAIL() << "segment " << name << " not ready for server pid " << server.pid() << " within " << timeout.count()
         << " ms; the segment said: " << seen << "\nserver output:\n" << server.output();
}

std::optional<shm::Segment> map_when_ready(const std::string& name, Process& owner, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string seen = "no segment";
  while (std::chrono::steady_clock::now() < deadline) {
    try {
      if (shm::Segment::exists(name)) {
        auto seg = shm::Segment::open(name, shm::Access::read_only);
        if (shm::load_acquire(seg.header().state) == kReady) return seg;
        seen = "state " + std::to_string(shm::load_acquire(seg.header().state));
      }
    } catch (const Error& e) {
      seen = e.what();
    }
    if (!owner.running()) {
      ADD_FAILURE() << "process " << owner.pid() << " exited before segment " << name << " was ready ("
                    << seen << "):\n" << owner.output();
      return std::nullopt;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ADD_FAILURE() << "segment " << name << " not ready within " << timeout.count() << " ms (" << seen << "):\n"
                << owner.output();
  return std::nullopt;
}

Process& Job::start(std::vector<std::string> argv, std::vector<std::pair<std::string, std::string>> env) {
  // The job's segment, unless the caller names one (a server group's replica).
  if (std::none_of(env.begin(), env.end(), [](const auto& kv) { return kv.first == "SHMPS_SEGMENT"; }))
    env.emplace_back("SHMPS_SEGMENT", name_);
  processes_.push_back(std::make_unique<Process>(std::move(argv), std::move(env)));
  return *processes_.back();
}

Ran run(std::vector<std::string> argv, std::chrono::milliseconds timeout) {
  Process p(std::move(argv));
  const int code = p.wait(timeout);
  return {code, p.output()};
}

void expect_no_files(const std::string& name) {
  for (const auto& path : {shm::segment_path(name), shm::server_lock_path(name), shm::slots_lock_path(name)}) {
    std::error_code ec;
    EXPECT_FALSE(std::filesystem::exists(path, ec)) << path;
  }
}

struct Watchdog::State {
  std::mutex mutex;
  std::condition_variable cv;
  bool cancelled = false;
  std::thread thread;
};

Watchdog::Watchdog(std::chrono::seconds limit) : state_(std::make_shared<State>()) {
  auto state = state_;
  state_->thread = std::thread([state, limit] {
    std::unique_lock lock(state->mutex);
    if (!state->cv.wait_for(lock, limit, [&] { return state->cancelled; })) {
      std::cerr << "WATCHDOG: test still running after " << limit.count()
                << " s; killing its processes, removing its segments, failing\n";
      cleanup_everything();
      std::_Exit(3);
    }
  });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard lock(state_->mutex);
    state_->cancelled = true;
  }
  state_->cv.notify_all();
  state_->thread.join();
}

}  // namespace shmps::test
