// Multi-process test support: real server and worker processes, unique segment names, cleanup
// that also happens when a test fails, and a watchdog so that a hang fails fast.
//
//   shmps::test::Job job("exact", spec_text);     // unique segment name, spec file written
//   auto& server = job.start_server();            // shmps-server --spec ... --name ...
//   job.wait_ready();
//   auto& w = job.start({"shmps-test-pusher", ...});
//   EXPECT_EQ(w.wait(), 0);
//   // ~Job: SIGKILLs whatever still runs, removes the segment, its lock files and the spec file.
//
// Children get PR_SET_PDEATHSIG(SIGKILL): if the test binary dies (ctest's timeout), they die too.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <sys/types.h>

#include <shmps/shm/segment.hpp>

namespace shmps::test {

// Path of a program built into the build tree's bin/ (SHMPS_BIN_DIR, set by ctest).
std::string bin(const std::string& program);

// A segment name no other test (or test run) uses: "t-<tag>-<pid>-<n>".
std::string unique_segment(const std::string& tag);

// A directory of its own under the system's temporary directory (named like unique_segment),
// removed with everything in it when the object goes, also when the test fails.
class TempDir {
 public:
  explicit TempDir(const std::string& tag);
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
};

class Process {
 public:
  // Starts argv[0] (resolved with bin() when it has no '/'), output to a temp file.
  Process(std::vector<std::string> argv, std::vector<std::pair<std::string, std::string>> env = {});
  ~Process();
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  bool running();
  // Waits for exit; returns the exit code, 128+signal if killed, or -1 on timeout (the process
  // is then SIGKILLed).
  int wait(std::chrono::milliseconds timeout = std::chrono::seconds(60));
  void kill(int signal);
  std::string output() const;  // stdout and stderr so far
  const std::string& log_path() const { return log_path_; }  // removed by the destructor

 private:
  pid_t pid_ = -1;
  int status_ = 0;
  bool done_ = false;
  std::string log_path_;
};

class Job {
 public:
  Job(const std::string& tag, const std::string& spec_toml_without_name);
  ~Job();
  const std::string& name() const { return name_; }
  const std::string& spec_path() const { return spec_path_; }

  Process& start_server(std::vector<std::string> extra_args = {},
                        std::vector<std::pair<std::string, std::string>> env = {});
  // Waits until the segment says the server started last is serving it: read from the segment
  // (mapped read-only, as a tool does), not from the server's log: state "ready", server_pid
  // that server's pid, and server_epoch past what the segment held before it started (a
  // restarted server over a segment a killed one left "ready" must bump it first). Fails the
  // test if the server exits first or the timeout passes.
  void wait_ready(std::chrono::milliseconds timeout = std::chrono::seconds(20));
  Process& start(std::vector<std::string> argv, std::vector<std::pair<std::string, std::string>> env = {});
  Process& server() { return *server_; }

 private:
  std::string name_;
  std::string spec_path_;
  Process* server_ = nullptr;
  std::uint64_t epoch_before_server_ = 0;  // the segment's server_epoch when start_server() ran
  std::vector<std::unique_ptr<Process>> processes_;
};

// Maps segment `name` read-only (a tool's view) once it exists and is "ready", for a test that
// reads what a server leaves in it: the mapping stays valid after the segment is removed
// (shmps-launch removes it when the job ends), so the header's final state and counters can be
// read once the job is over. Fails the test and returns nothing if `owner` (the process that
// makes the segment, e.g. shmps-launch) exits first or the timeout passes.
std::optional<shm::Segment> map_when_ready(const std::string& name, Process& owner,
                                           std::chrono::milliseconds timeout = std::chrono::seconds(20));

// Kills every child of this process and aborts the test binary if not destroyed in time.
class Watchdog {
 public:
  explicit Watchdog(std::chrono::seconds limit);
  ~Watchdog();

 private:
  struct State;
  std::shared_ptr<State> state_;
};

// Waits until segment `name` is ready and served by `server` with an epoch past
// `epoch_before` (Job::wait_ready for a segment the Job does not name: a server group's replica).
void wait_segment_ready(const std::string& name, Process& server, std::uint64_t epoch_before,
                        std::chrono::milliseconds timeout = std::chrono::seconds(20));
// The segment's server_epoch now (0 if it does not exist): what a restarted server must pass.
std::uint64_t server_epoch_of(const std::string& segment);

// Removes a segment and its lock files if they exist (and a job's server-group replicas and
// their sync segments).
void remove_segment(const std::string& name);

// Runs a program to its end (as Process does, bounded by `timeout`): its exit code and output.
struct Ran {
  int code;
  std::string out;
};
Ran run(std::vector<std::string> argv, std::chrono::milliseconds timeout = std::chrono::seconds(30));

// Expects that neither the segment nor any of its lock files exists.
void expect_no_files(const std::string& name);

}  // namespace shmps::test
