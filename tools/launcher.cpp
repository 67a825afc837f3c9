#include "launcher.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <iostream>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/liveness.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::tools {

std::string self_dir() {
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : exe.parent_path().string();
}

std::string resolve(const std::string& program) {
  if (program.find('/') != std::string::npos) return program;
  const std::string local = self_dir() + "/" + program;
  if (::access(local.c_str(), X_OK) == 0) return local;
  return program;
}

bool succeeded(int status) { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }

std::string describe(int status) {
  if (WIFEXITED(status)) return "exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("was killed by signal ") + std::to_string(WTERMSIG(status)) + " (" +
                                  strsignal(WTERMSIG(status)) + ")";
  return "ended with status " + std::to_string(status);
}

Launcher::Launcher() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  sigprocmask(SIG_BLOCK, &set, nullptr);
  signal_fd_ = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  if (signal_fd_ < 0) throw Error(std::string("signalfd: ") + std::strerror(errno));
}

Child& Launcher::spawn(const std::string& label, const std::vector<std::string>& argv,
             const std::vector<std::pair<std::string, std::string>>& env, const NumaNode* node) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) throw Error(std::string("pipe: ") + std::strerror(errno));
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) throw Error(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    // Own process group: the terminal's Ctrl-C reaches only the launcher, which stops the job
    // in order (see the stopping branch of main). Die with the launcher.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    dup2(fds[1], STDOUT_FILENO);
    dup2(fds[1], STDERR_FILENO);
    for (const auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
    if (node != nullptr && !bind_to_node(*node))
      std::fprintf(stderr, "shmps-launch: could not bind %s to NUMA %s: %s; it runs unbound\n", label.c_str(),
                   describe(*node).c_str(), std::strerror(errno));
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    // A Python script without its execute bit (as a file someone else wrote often is): run it
    // with Debian's python3, which has numpy and torch.
    if (errno == EACCES && argv[0].ends_with(".py")) {
      args.insert(args.begin(), const_cast<char*>("/usr/bin/python3"));
      execv(args[0], args.data());
      errno = EACCES;
    }
    std::fprintf(stderr, "shmps-launch: cannot run %s: %s\n", argv[0].c_str(), std::strerror(errno));
    _exit(127);
  }
  // Also here, not only in the child: a signal sent to the group right after fork must reach it.
  setpgid(pid, pid);
  close(fds[1]);
  fcntl(fds[0], F_SETFL, O_NONBLOCK);
  children_.push_back(std::make_unique<Child>(Child{label, pid, fds[0], {}, std::nullopt, false, nullptr}));
  return *children_.back();
}

void Launcher::pump(std::chrono::milliseconds timeout) {
  std::vector<pollfd> fds;
  fds.push_back({signal_fd_, POLLIN, 0});
  std::vector<Child*> owners{nullptr};
  for (auto& c : children_)
    if (c->out_fd >= 0) {
      fds.push_back({c->out_fd, POLLIN, 0});
      owners.push_back(c.get());
    }
  if (poll(fds.data(), fds.size(), static_cast<int>(timeout.count())) <= 0) return;
  for (std::size_t i = 1; i < fds.size(); ++i)
    if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) read_output(*owners[i]);
  if (fds[0].revents & POLLIN) {
    signalfd_siginfo info{};
    while (read(signal_fd_, &info, sizeof info) == sizeof info) {
      if (info.ssi_signo == SIGCHLD) continue;
      if (!interrupted_) {
        std::cerr << "shmps-launch: " << strsignal(static_cast<int>(info.ssi_signo)) << ": stopping the job\n";
        interrupted_ = static_cast<int>(info.ssi_signo);
      }
    }
  }
  reap();
}

void Launcher::reap() {
  int status = 0;
  pid_t pid;
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
    for (auto& c : children_)
      if (c->pid == pid) {
        c->status = status;
        if (c->out_fd >= 0) {
          read_output(*c);
          flush(*c);
          close(c->out_fd);
          c->out_fd = -1;
        }
      }
  }
}

void Launcher::signal(Child& c, int sig) {
  if (!running(c)) return;
  if (kill(-c.pid, sig) != 0) kill(c.pid, sig);
}

int Launcher::wait(Child& c, std::chrono::milliseconds grace) {
  const auto deadline = std::chrono::steady_clock::now() + grace;
  while (running(c)) {
    pump(std::chrono::milliseconds(50));
    if (running(c) && std::chrono::steady_clock::now() > deadline) {
      std::cerr << "shmps-launch: " << c.label << " did not stop within " << grace.count() / 1000
                << " s; killing it\n";
      signal(c, SIGKILL);
      while (running(c)) pump(std::chrono::milliseconds(50));
    }
  }
  return *c.status;
}

std::string Launcher::prefix(const Child& c) { return c.label.empty() ? std::string() : "[" + c.label + "] "; }

void Launcher::read_output(Child& c) {
  char buf[8192];
  ssize_t n;
  while (c.out_fd >= 0 && (n = read(c.out_fd, buf, sizeof buf)) > 0) {
    c.pending.append(buf, static_cast<std::size_t>(n));
    std::size_t nl;
    while ((nl = c.pending.find('\n')) != std::string::npos) {
      std::cout << prefix(c) << c.pending.substr(0, nl) << "\n";
      if (c.on_line) c.on_line(c.pending.substr(0, nl));
      c.pending.erase(0, nl + 1);
    }
    std::cout.flush();
  }
}

void Launcher::flush(Child& c) {
  if (!c.pending.empty()) std::cout << prefix(c) << c.pending << "\n";
  c.pending.clear();
}

bool server_alive(const std::string& name) {
  if (!std::filesystem::exists(shm::server_lock_path(name))) return false;
  return shm::LockFile::open_for_probe(shm::server_lock_path(name)).probe(0) == shm::Holder::alive;
}

bool segment_ready(const std::string& name) {
  try {
    if (!shm::Segment::exists(name)) return false;
    auto seg = shm::Segment::open(name, shm::Access::read_only);
    return shm::load_acquire(seg.header().state) == static_cast<std::uint32_t>(shm::SegmentState::ready);
  } catch (const Error&) {
    return false;
  }
}

}  // namespace shmps::tools
