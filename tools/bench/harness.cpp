#include "harness.hpp"

#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <new>
#include <sstream>
#include <thread>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::bench {

double now_s() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const auto i = static_cast<std::size_t>(q * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

void Report::add(std::string name, double value, std::string unit, std::string note) {
  figures_.push_back({std::move(name), value, std::move(unit), std::move(note)});
}

void Report::print(const std::string& out_path) const {
  std::size_t width = 22;
  for (const auto& f : figures_) width = std::max(width, f.name.size() + 2);
  std::cout << std::left << std::setw(static_cast<int>(width)) << "figure" << std::right << std::setw(12) << "value"
            << "  " << std::left << std::setw(10) << "unit" << "what\n";
  for (const auto& f : figures_)
    std::cout << std::left << std::setw(static_cast<int>(width)) << f.name << std::right << std::setw(12) << std::fixed
              << std::setprecision(3) << f.value << "  " << std::left << std::setw(10) << f.unit << f.note << "\n";
  std::ostringstream lines;
  for (const auto& f : figures_) lines << f.name << " " << f.value << " " << f.unit << "\n";
  std::cout << "\n" << lines.str() << std::flush;
  if (!out_path.empty()) std::ofstream(out_path) << lines.str();
}

std::string self_dir() {
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : exe.parent_path().string();
}

namespace {
int job_counter = 0;
}

std::string job_name() { return "bench-" + std::to_string(::getpid()) + "-" + std::to_string(job_counter++); }

std::string job_spec(const JobOptions& o, const std::string& name) {
  std::ostringstream spec;
  spec << "name = \"" << name << "\"\nmax_workers = " << o.max_workers << "\nconsistency = \"" << o.consistency
       << "\"\n";
  if (o.ring_bytes != 0) spec << "ring_bytes = " << o.ring_bytes << "\n";
  if (o.threads != 0) spec << "server_threads = " << o.threads << "\n";
  if (o.slice_bytes != 0) spec << "slice_bytes = " << o.slice_bytes << "\n";
  spec << "[optimizer]\nkind = \"" << o.optimizer << "\"\nlr = 1e-6\n";
  if (!o.state_dtype.empty()) spec << "state_dtype = \"" << o.state_dtype << "\"\n";
  for (std::size_t i = 0; i < o.params; ++i)
    spec << "[[param]]\nname = \"" << Job::param(i) << "\"\nshape = [" << o.per_param << "]\n";
  spec << o.extra_spec;
  return spec.str();
}

Job::Job(const JobOptions& o) {
  name_ = job_name();
  spec_path_ = "/tmp/shmps-" + name_ + ".toml";
  std::ofstream(spec_path_) << job_spec(o, name_);
  server_ = fork();
  if (server_ == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    const std::string bin = self_dir() + "/shmps-server";
    if (o.checkpoint_dir.empty())
      execl(bin.c_str(), bin.c_str(), "--spec", spec_path_.c_str(), "--remove-on-stop", "--log-level", "warn", nullptr);
    else
      execl(bin.c_str(), bin.c_str(), "--spec", spec_path_.c_str(), "--remove-on-stop", "--log-level", "warn",
            "--checkpoint-dir", o.checkpoint_dir.c_str(), "--checkpoint-every", "1clocks", "--keep", "1", nullptr);
    _exit(127);
  }
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (true) {
    try {
      auto seg = shm::Segment::open(name_, shm::Access::read_only);
      if (shm::load_acquire(seg.header().state) == static_cast<std::uint32_t>(shm::SegmentState::ready)) break;
    } catch (const Error&) {
    }
    int status = 0;
    if (Clock::now() > deadline || waitpid(server_, &status, WNOHANG) == server_) {
      kill(server_, SIGKILL);
      waitpid(server_, nullptr, 0);
      std::filesystem::remove(spec_path_);
      throw Error("job " + name_ + ": the server did not start");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

std::string Job::param(std::size_t i) {
  char buf[24] = {'p'};
  const auto res = std::to_chars(buf + 1, buf + sizeof buf, i);
  return std::string(buf, res.ptr);
}

Job::~Job() {
  kill(server_, SIGTERM);
  waitpid(server_, nullptr, 0);
  std::error_code ec;
  std::filesystem::remove(spec_path_, ec);
}

pid_t spawn(const std::string& what, const std::function<void()>& fn) {
  std::cout.flush();
  const pid_t pid = fork();
  if (pid < 0) throw Error("fork failed");
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    try {
      fn();
    } catch (const std::exception& e) {
      std::cerr << what << ": " << e.what() << "\n";
      _exit(2);
    }
    _exit(0);
  }
  return pid;
}

bool wait_all(const std::vector<pid_t>& pids) {
  bool ok = true;
  for (pid_t pid : pids) {
    int status = 0;
    waitpid(pid, &status, 0);
    ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }
  return ok;
}

SharedBlock::SharedBlock(std::size_t bytes) : bytes_(bytes) {
  p_ = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p_ == MAP_FAILED) throw Error("mmap of a shared block failed");
}

SharedBlock::~SharedBlock() { munmap(p_, bytes_); }

Floats::Floats(std::size_t n, float value) : n_(n) {
  p_ = static_cast<float*>(::operator new[](std::max<std::size_t>(n, 1) * sizeof(float), std::align_val_t{64}));
  std::fill(p_, p_ + n, value);
}

Floats::~Floats() {
  if (p_ != nullptr) ::operator delete[](p_, std::align_val_t{64});
}

volatile float kept = 0;  // external linkage: the stores cannot be dropped

void keep(float v) { kept = v; }

}  // namespace shmps::bench
