// shmps-bench: workloads of ../shared/workloads/README.md §3, each next to the machine's own
// limit measured in the same run.
//
//   shmps-bench [--quick] [--rounds N] [--out FILE]
//
// Limits:
//   memcpy       one 64 MiB copy (bytes counted once), median of several
//   apply2       a plain loop p -= lr * (g1 + g2) over 16M floats, one thread: the least work a
//                BSP step of two workers must do on the server
//   *.2threads   the same two limits run by two threads at once (this machine's two cores)
// Workloads:
//   bsp-round    two worker processes, BSP: each pulls the 16M-float model, pushes a 16M-float
//                gradient and ends its step; the server sums both, applies SGD once, and the
//                next pulls see the new model. Milliseconds per round, and the ratio to the
//                traffic a round must do on two cores: the two pushes at once, apply2 on two
//                threads, the two pulls at once.
//   bsp-round.checkpointing  the same, while the server writes checkpoints back to back
//                (--checkpoint-every 1clocks: a new one as soon as the last is durable, into
//                --checkpoint-dir, default the working directory's ./shmps-bench-checkpoints-<pid>),
//                and its ratio to bsp-round: what checkpointing costs training.
//
// Prints a table, and one "name value unit" line per figure (also to --out FILE).
// --quick: small sizes, a few seconds, for CI (checks that everything runs; the figures mean
// little).
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

double now_s() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }

struct Figure {
  std::string name;
  double value;
  std::string unit;
  std::string note;
};

double time_memcpy(std::size_t bytes, int reps) {
  std::vector<char> a(bytes, 1), b(bytes, 2);
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_s();
    std::memcpy(b.data(), a.data(), bytes);
    t.push_back(now_s() - t0);
    a[static_cast<std::size_t>(i)] = b[bytes - 1 - static_cast<std::size_t>(i)];  // keep the copies observable
  }
  return median(t);
}

double time_apply2(std::size_t floats, int reps) {
  std::vector<float> p(floats, 1.0f), g1(floats, 0.5f), g2(floats, 0.25f);
  const float lr = 1e-6f;
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_s();
    float* __restrict pp = p.data();
    const float* __restrict a = g1.data();
    const float* __restrict b = g2.data();
    for (std::size_t k = 0; k < floats; ++k) pp[k] -= lr * (a[k] + b[k]);
    t.push_back(now_s() - t0);
  }
  if (p[floats / 2] > 2.0f) std::cerr << "";  // keep the loop
  return median(t);
}

// The same two limits, run by two threads at once on their own (already touched) buffers:
// this machine's two-core limits. Median wall time of both finishing.
double time_memcpy_two_threads(std::size_t bytes, int reps) {
  std::vector<char> a1(bytes, 1), b1(bytes, 2), a2(bytes, 3), b2(bytes, 4);
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_s();
    std::thread other([&] { std::memcpy(b2.data(), a2.data(), bytes); });
    std::memcpy(b1.data(), a1.data(), bytes);
    other.join();
    t.push_back(now_s() - t0);
  }
  return median(t);
}

double time_apply2_two_threads(std::size_t floats, int reps) {
  std::vector<float> p(floats, 1.0f), g1(floats, 0.5f), g2(floats, 0.25f);
  const float lr = 1e-6f;
  auto run = [&](std::size_t lo, std::size_t hi) {
    float* __restrict pp = p.data();
    const float* __restrict a = g1.data();
    const float* __restrict b = g2.data();
    for (std::size_t k = lo; k < hi; ++k) pp[k] -= lr * (a[k] + b[k]);
  };
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_s();
    std::thread other([&] { run(floats / 2, floats); });
    run(0, floats / 2);
    other.join();
    t.push_back(now_s() - t0);
  }
  if (p[floats / 2] > 2.0f) std::cerr << "";
  return median(t);
}

std::string self_dir() {
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : exe.parent_path().string();
}

struct RoundResult {
  double seconds_per_round = 0;
  std::uint64_t checkpoints = 0;          // written during the run
  double last_checkpoint_seconds = 0;     // snapshot to durable
};

// Runs a BSP job of two worker processes for `rounds` timed rounds; returns seconds per round.
// With a checkpoint directory, the server writes checkpoints there back to back meanwhile.
RoundResult bsp_round(std::size_t params, std::size_t floats_per_param, int rounds, const std::string& checkpoint_dir = "") {
  const std::string name = "bench-" + std::to_string(::getpid());
  const std::string spec_path = "/tmp/shmps-" + name + ".toml";
  {
    std::ofstream spec(spec_path);
    spec << "name = \"" << name << "\"\nmax_workers = 4\nconsistency = \"bsp\"\n[optimizer]\nkind = \"sgd\"\nlr = 1e-6\n";
    for (std::size_t i = 0; i < params; ++i)
      spec << "[[param]]\nname = \"p" << i << "\"\nshape = [" << floats_per_param << "]\n";
  }
  const pid_t server = fork();
  if (server == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    const std::string bin = self_dir() + "/shmps-server";
    if (checkpoint_dir.empty())
      execl(bin.c_str(), bin.c_str(), "--spec", spec_path.c_str(), "--remove-on-stop", "--log-level", "warn", nullptr);
    else
      execl(bin.c_str(), bin.c_str(), "--spec", spec_path.c_str(), "--remove-on-stop", "--log-level", "warn",
            "--checkpoint-dir", checkpoint_dir.c_str(), "--checkpoint-every", "1clocks", "--keep", "1", nullptr);
    _exit(127);
  }
  // Wait for the segment.
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (true) {
    try {
      auto seg = shmps::shm::Segment::open(name, shmps::shm::Access::read_only);
      if (shmps::shm::load_acquire(seg.header().state) == static_cast<std::uint32_t>(shmps::shm::SegmentState::ready))
        break;
    } catch (const shmps::Error&) {
    }
    if (Clock::now() > deadline) throw shmps::Error("bsp-round: the server did not start");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }

  // Each worker reports the end time of every round through a pipe.
  int fds[2];
  if (pipe(fds) != 0) throw shmps::Error("pipe failed");
  std::vector<pid_t> workers;
  for (int r = 0; r < 2; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      close(fds[0]);
      try {
        shmps::Worker w(shmps::WorkerOptions{.segment = name, .rank = r});
        std::vector<std::vector<float>> values(params, std::vector<float>(floats_per_param));
        std::vector<float> grad(floats_per_param, 1.0f);
        for (int round = -1; round < rounds; ++round) {  // round -1 warms up
          for (std::size_t i = 0; i < params; ++i) w.pull("p" + std::to_string(i), values[i]);
          for (std::size_t i = 0; i < params; ++i) w.push("p" + std::to_string(i), grad);
          w.clock();
          const double end = now_s();
          if (round >= 0 && write(fds[1], &end, sizeof end) != sizeof end) _exit(3);
        }
        // The last round counts once its values can be pulled.
        for (std::size_t i = 0; i < params; ++i) w.pull("p" + std::to_string(i), values[i]);
        const double end = now_s();
        if (write(fds[1], &end, sizeof end) != sizeof end) _exit(3);
        w.leave();
      } catch (const shmps::Error& e) {
        std::cerr << "bsp-round worker " << r << ": " << e.what() << "\n";
        _exit(2);
      }
      _exit(0);
    }
    workers.push_back(pid);
  }
  close(fds[1]);
  std::vector<double> ends;
  double t = 0;
  while (read(fds[0], &t, sizeof t) == sizeof t) ends.push_back(t);
  close(fds[0]);
  bool ok = true;
  for (pid_t pid : workers) {
    int status = 0;
    waitpid(pid, &status, 0);
    ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }
  RoundResult result;
  try {
    auto seg = shmps::shm::Segment::open(name, shmps::shm::Access::read_only);
    result.checkpoints = shmps::shm::load_acquire(seg.header().checkpoints);
    result.last_checkpoint_seconds = static_cast<double>(shmps::shm::load_acquire(seg.header().last_checkpoint_duration_ns)) / 1e9;
  } catch (const shmps::Error&) {
  }
  kill(server, SIGTERM);
  waitpid(server, nullptr, 0);
  std::filesystem::remove(spec_path);
  if (!ok || ends.size() != static_cast<std::size_t>(2 * (rounds + 1))) throw shmps::Error("bsp-round: a worker failed");
  // Round i ends when the later of the two workers is done with it.
  std::sort(ends.begin(), ends.end());
  std::vector<double> per_round;
  for (std::size_t i = 3; i < ends.size(); i += 2) per_round.push_back(ends[i] - ends[i - 2]);
  // The mean, not the median: a checkpoint's pause falls into a few rounds, and those count.
  double sum = 0;
  for (double d : per_round) sum += d;
  result.seconds_per_round = per_round.empty() ? 0 : sum / static_cast<double>(per_round.size());
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shmps-bench: shmps workloads next to this machine's own limits, measured in the same run"};
  bool quick = false;
  int rounds = 10;
  std::string out_path, checkpoint_dir;
  app.add_option("--checkpoint-dir", checkpoint_dir,
                 "where bsp-round.checkpointing writes (default ./shmps-bench-checkpoints-<pid>, removed afterwards)");
  app.add_flag("--quick", quick, "small sizes, a few seconds (CI: checks that every workload runs)");
  app.add_option("--rounds", rounds, "timed BSP rounds")->check(CLI::Range(1, 10000));
  app.add_option("--out", out_path, "also write the 'name value unit' lines to this file");
  CLI11_PARSE(app, argc, argv);

  const std::size_t params = 16;
  const std::size_t per_param = quick ? (std::size_t{1} << 14) : (std::size_t{1} << 20);
  const std::size_t floats = params * per_param;
  const std::size_t bytes = floats * sizeof(float);
  if (quick) rounds = std::min(rounds, 3);
  std::vector<Figure> figures;
  try {
    const double memcpy_s = time_memcpy(bytes, quick ? 3 : 9);
    const double apply2_s = time_apply2(floats, quick ? 3 : 9);
    figures.push_back({"limit.memcpy", static_cast<double>(bytes) / memcpy_s / 1e9, "GB/s",
                       "one copy of " + std::to_string(bytes >> 20) + " MiB"});
    figures.push_back({"limit.memcpy.time", memcpy_s * 1e3, "ms", ""});
    figures.push_back({"limit.apply2.time", apply2_s * 1e3, "ms", "p -= lr*(g1+g2), one thread"});
    // Two cores: two copies at once (the two workers' pushes, then their pulls), and the apply
    // split over two threads (the server's two apply threads).
    const double memcpy2_s = time_memcpy_two_threads(bytes, quick ? 3 : 9);
    const double apply2x2_s = time_apply2_two_threads(floats, quick ? 3 : 9);
    figures.push_back({"limit.memcpy.2threads.time", memcpy2_s * 1e3, "ms", "two copies at once"});
    figures.push_back({"limit.apply2.2threads.time", apply2x2_s * 1e3, "ms", "apply2 split over two threads"});
    const double round_s = bsp_round(params, per_param, rounds).seconds_per_round;
    const double serial_bound_s = 4 * memcpy_s + apply2_s;
    const double parallel_bound_s = 2 * memcpy2_s + apply2x2_s;
    figures.push_back({"bsp-round", round_s * 1e3, "ms", "2 workers, " + std::to_string(floats) + " floats"});
    figures.push_back({"bsp-round.bound.serial", serial_bound_s * 1e3, "ms", "4 copies + apply2, one after another"});
    figures.push_back({"bsp-round.bound.2cores", parallel_bound_s * 1e3, "ms",
                       "2 x (two copies at once) + apply2 on two threads"});
    figures.push_back({"bsp-round.ratio", round_s / parallel_bound_s, "x",
                       "round / two-core bound (1 = at the memory-traffic bound)"});

    // The same rounds while checkpoints are written back to back.
    const bool own_dir = checkpoint_dir.empty();
    if (own_dir) checkpoint_dir = (std::filesystem::current_path() / ("shmps-bench-checkpoints-" + std::to_string(::getpid()))).string();
    std::filesystem::create_directories(checkpoint_dir);
    const RoundResult ck = bsp_round(params, per_param, rounds, checkpoint_dir);
    if (own_dir) std::filesystem::remove_all(checkpoint_dir);
    figures.push_back({"bsp-round.checkpointing", ck.seconds_per_round * 1e3, "ms",
                       std::to_string(ck.checkpoints) + " checkpoints written during the rounds"});
    figures.push_back({"bsp-round.checkpointing.ratio", ck.seconds_per_round / round_s, "x",
                       "round while checkpointing / round without (1 = free)"});
    figures.push_back({"checkpoint.time", ck.last_checkpoint_seconds * 1e3, "ms",
                       "one checkpoint of the model, snapshot to durable on disk"});
  } catch (const shmps::Error& e) {
    std::cerr << "shmps-bench: " << e.what() << "\n";
    return 1;
  }

  std::cout << std::left << std::setw(22) << "figure" << std::right << std::setw(12) << "value" << "  " << std::left
            << std::setw(6) << "unit" << "what\n";
  for (const auto& f : figures)
    std::cout << std::left << std::setw(22) << f.name << std::right << std::setw(12) << std::fixed
              << std::setprecision(3) << f.value << "  " << std::left << std::setw(6) << f.unit << f.note << "\n";
  std::ostringstream lines;
  for (const auto& f : figures) lines << f.name << " " << f.value << " " << f.unit << "\n";
  std::cout << "\n" << lines.str();
  if (!out_path.empty()) std::ofstream(out_path) << lines.str();
  return 0;
}
