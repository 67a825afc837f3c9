// shmps-bench's shared harness: timing, figures and their report, and a server job to run a
// workload against (a spec written to /tmp, shmps-server started as a child, stopped at the end).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace shmps::bench {

using Clock = std::chrono::steady_clock;

// CLOCK_MONOTONIC seconds: comparable between processes of the machine.
double now_s();
double median(std::vector<double> v);
double percentile(std::vector<double> v, double q);  // q in [0, 1], nearest rank

struct Figure {
  std::string name;
  double value = 0;
  std::string unit;
  std::string note;
};

class Report {
 public:
  void add(std::string name, double value, std::string unit, std::string note = "");
  // The table (figure, value, unit, what), then one "name value unit" line per figure; the lines
  // also go to out_path if it is not empty.
  void print(const std::string& out_path) const;

 private:
  std::vector<Figure> figures_;
};

// The run's settings, from the command line.
struct Config {
  bool quick = false;
  std::size_t params = 16;
  std::size_t per_param = std::size_t{1} << 20;
  int reps = 9;     // repetitions of a timed piece (the median is reported)
  int rounds = 10;  // BSP rounds, and full-model pushes per worker in push-to-apply
  std::string checkpoint_dir;
  std::string mlp_spec;        // the reference MLP's model spec (train)
  std::uint64_t train_samples = 400000;
  std::size_t floats() const { return params * per_param; }
  std::size_t bytes() const { return floats() * sizeof(float); }
};

// The machine's own limits, measured first; the workloads' ratios use them.
struct Limits {
  double memcpy_s = 0;          // one copy of the model
  double memcpy2_s = 0;         // two copies at once, one per thread
  double sgd_s = 0;             // p -= lr * g over the model, one thread
  double sgd2_s = 0;            // the same split over two threads
  double apply2_s = 0;          // p -= lr * (g1 + g2), one thread
  double apply2x2_s = 0;        // the same split over two threads
  double pingpong_rtt_s = 0;    // a round trip over a shared atomic between two processes
};

// The plain p -= lr * g loop over `floats`, split over `threads` (1 or 2) threads: the peer the
// apply group times in the same loop as the server's apply (limits.cpp).
void plain_sgd_pass(float* p, const float* g, std::size_t floats, int threads);

// The directory of this executable (where shmps-server, shmps-worker, shmps-launch are).
std::string self_dir();

// A job for a workload: a spec of `params` parameters p0..p<n-1> of `per_param` floats each.
struct JobOptions {
  std::size_t params = 16;
  std::size_t per_param = std::size_t{1} << 20;
  std::string consistency = "asp";
  std::string optimizer = "sgd";
  std::string state_dtype{};     // non-empty: the optimizer's state_dtype ("f32", "bf16")
  int max_workers = 4;
  std::uint64_t ring_bytes = 0;  // 0: sized by the server
  int threads = 0;               // apply threads; 0: all cores
  std::string checkpoint_dir{};  // non-empty: checkpoints back to back into it
  std::uint64_t slice_bytes = 0;  // 0: the spec's default
  std::string extra_spec{};       // appended to the spec (a [[table]], say)
};

// The model spec of such a job, named `name`.
std::string job_spec(const JobOptions& options, const std::string& name);

// A fresh segment name for a job of this run.
std::string job_name();

class Job {
 public:
  // Starts the server and waits until its segment is ready (throws shmps::Error if not in 30 s).
  explicit Job(const JobOptions& options);
  ~Job();  // stops the server (SIGTERM), removes the spec
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;
  const std::string& name() const { return name_; }
  static std::string param(std::size_t i);  // "p<i>"

 private:
  std::string name_, spec_path_;
  pid_t server_ = -1;
};

// Runs fn in a child process (killed if this process dies); the child exits 0 if fn returns,
// 2 if it throws (the message goes to stderr).
pid_t spawn(const std::string& what, const std::function<void()>& fn);
// Waits for the children; true if all exited with 0.
bool wait_all(const std::vector<pid_t>& pids);

// A block of memory shared with the children forked after it (MAP_SHARED | MAP_ANONYMOUS).
class SharedBlock {
 public:
  explicit SharedBlock(std::size_t bytes);
  ~SharedBlock();
  SharedBlock(const SharedBlock&) = delete;
  SharedBlock& operator=(const SharedBlock&) = delete;
  void* data() const { return p_; }

 private:
  void* p_;
  std::size_t bytes_;
};

// 64-byte aligned float buffer, touched (so page faults are not timed).
class Floats {
 public:
  explicit Floats(std::size_t n, float value = 0.0f);
  ~Floats();
  Floats(Floats&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
  Floats& operator=(Floats&&) = delete;
  Floats(const Floats&) = delete;
  Floats& operator=(const Floats&) = delete;
  float* data() const { return p_; }
  std::size_t size() const { return n_; }

 private:
  float* p_;
  std::size_t n_;
};

// Keeps a computed value observable so the compiler cannot drop the loop producing it.
void keep(float v);

}  // namespace shmps::bench
