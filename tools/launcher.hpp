// How shmps-launch runs its children: each in its own process group, dying with the launcher,
// its output read through a pipe and printed line by line behind its label ("[w0] ..."), and
// SIGINT/SIGTERM/SIGHUP taken through a signalfd, so that the job can be stopped in order.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "numa_binding.hpp"

namespace shmps::tools {

struct Child {
  std::string label;  // "w0", "server", "after"; empty: its lines are printed as they are (they carry their own)
  pid_t pid = -1;
  int out_fd = -1;    // read end of its stdout+stderr
  std::string pending;
  std::optional<int> status;  // waitpid status once it exited
  bool reported = false;      // its failure was handled (restarted or reported)
  std::function<void(const std::string&)> on_line;  // called with each line of its output, if set
};

// The directory of the running program (shmps-launch's own, to find the other programs).
std::string self_dir();
// A program name without '/' is looked up next to shmps-launch first, then on PATH.
std::string resolve(const std::string& program);
// "exited with code 1", "was killed by signal 9 (Killed)".
std::string describe(int status);
bool succeeded(int status);  // exited with code 0

class Launcher {
 public:
  Launcher();

  // Starts `argv` with extra environment `env`, output piped and prefixed with `label`.
  // `node`: bind the child to that NUMA node's CPUs and memory (server groups), or nothing.
  Child& spawn(const std::string& label, const std::vector<std::string>& argv,
               const std::vector<std::pair<std::string, std::string>>& env, const NumaNode* node = nullptr);

  // Pumps output and signals for up to `timeout`; returns early when something exited.
  void pump(std::chrono::milliseconds timeout);

  void reap();

  bool running(const Child& c) const { return !c.status.has_value(); }
  int interrupted() const { return interrupted_; }

  // Signals the child's whole process group, so that what it started (a shell's commands, a
  // trainer's data loaders) stops with it instead of being left behind.
  void signal(Child& c, int sig);

  // Waits for `c` to exit, pumping output; escalates to SIGKILL after `grace`.
  int wait(Child& c, std::chrono::milliseconds grace);

 private:
  void read_output(Child& c);
  void flush(Child& c);
  static std::string prefix(const Child& c);

  int signal_fd_ = -1;
  int interrupted_ = 0;
  std::vector<std::unique_ptr<Child>> children_;
};

// Whether the segment's server holds its lock (alive), and whether the segment is ready.
bool server_alive(const std::string& name);
bool segment_ready(const std::string& name);

}  // namespace shmps::tools
