// bsp-round: two worker processes, BSP: each pulls the 16M-float model, pushes a 16M-float
// gradient and ends its step; the server sums both, applies SGD once, and the next pulls see the
// new model. Milliseconds per round (the mean, so that a checkpoint's pause counts), and the
// ratio to the traffic a round must do on two cores: the two pushes at once, apply2 on two
// threads, the two pulls at once.
//
// bsp-round.checkpointing: the same, while the server writes checkpoints back to back
// (--checkpoint-every 1clocks: a new one as soon as the last is durable, into --checkpoint-dir,
// default ./shmps-bench-checkpoints-<pid>), and its ratio to bsp-round.
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "workloads.hpp"

namespace shmps::bench {
namespace {

struct RoundResult {
  double seconds_per_round = 0;
  std::uint64_t checkpoints = 0;       // written during the run
  double last_checkpoint_seconds = 0;  // snapshot to durable
};

RoundResult bsp_round(const Config& cfg, const std::string& checkpoint_dir = "") {
  const std::size_t params = cfg.params, per_param = cfg.per_param;
  const int rounds = cfg.rounds;
  Job job(JobOptions{.params = params, .per_param = per_param, .consistency = "bsp", .checkpoint_dir = checkpoint_dir});
  // Each worker reports the end time of every round through a pipe.
  int fds[2];
  if (pipe(fds) != 0) throw Error("pipe failed");
  std::vector<pid_t> workers;
  for (int r = 0; r < 2; ++r) {
    workers.push_back(spawn("bsp-round worker " + std::to_string(r), [&, r] {
      close(fds[0]);
      Worker w(WorkerOptions{.segment = job.name(), .rank = r});
      std::vector<Floats> values;
      for (std::size_t i = 0; i < params; ++i) values.emplace_back(per_param);
      Floats grad(per_param, 1.0f);
      for (int round = -1; round < rounds; ++round) {  // round -1 warms up
        for (std::size_t i = 0; i < params; ++i) w.pull(Job::param(i), {values[i].data(), per_param});
        for (std::size_t i = 0; i < params; ++i) w.push(Job::param(i), {grad.data(), per_param});
        w.clock();
        const double end = now_s();
        if (round >= 0 && write(fds[1], &end, sizeof end) != sizeof end) _exit(3);
      }
      // The last round counts once its values can be pulled.
      for (std::size_t i = 0; i < params; ++i) w.pull(Job::param(i), {values[i].data(), per_param});
      const double end = now_s();
      if (write(fds[1], &end, sizeof end) != sizeof end) _exit(3);
      w.leave();
    }));
  }
  close(fds[1]);
  std::vector<double> ends;
  double t = 0;
  while (read(fds[0], &t, sizeof t) == sizeof t) ends.push_back(t);
  close(fds[0]);
  const bool ok = wait_all(workers);
  RoundResult result;
  try {
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    result.checkpoints = shm::load_acquire(seg.header().checkpoints);
    result.last_checkpoint_seconds =
        static_cast<double>(shm::load_acquire(seg.header().last_checkpoint_duration_ns)) / 1e9;
  } catch (const Error&) {
  }
  if (!ok || ends.size() != static_cast<std::size_t>(2 * (rounds + 1))) throw Error("bsp-round: a worker failed");
  // Round i ends when the later of the two workers is done with it.
  std::sort(ends.begin(), ends.end());
  std::vector<double> per_round;
  for (std::size_t i = 3; i < ends.size(); i += 2) per_round.push_back(ends[i] - ends[i - 2]);
  double sum = 0;
  for (double d : per_round) sum += d;
  result.seconds_per_round = per_round.empty() ? 0 : sum / static_cast<double>(per_round.size());
  return result;
}

}  // namespace

void run_bsp_round(const Config& cfg, const Limits& lim, Report& r) {
  const double round_s = bsp_round(cfg).seconds_per_round;
  const double serial_bound_s = 4 * lim.memcpy_s + lim.apply2_s;
  const double parallel_bound_s = 2 * lim.memcpy2_s + lim.apply2x2_s;
  r.add("bsp-round", round_s * 1e3, "ms", "2 workers, " + std::to_string(cfg.floats()) + " floats");
  r.add("bsp-round.bound.serial", serial_bound_s * 1e3, "ms", "4 copies + apply2, one after another");
  r.add("bsp-round.bound.2cores", parallel_bound_s * 1e3, "ms", "2 x (two copies at once) + apply2 on two threads");
  r.add("bsp-round.ratio", round_s / parallel_bound_s, "x", "round / two-core bound (1 = at the memory-traffic bound)");

  std::string dir = cfg.checkpoint_dir;
  const bool own_dir = dir.empty();
  if (own_dir) dir = (std::filesystem::current_path() / ("shmps-bench-checkpoints-" + std::to_string(::getpid()))).string();
  std::filesystem::create_directories(dir);
  RoundResult ck;
  try {
    ck = bsp_round(cfg, dir);
  } catch (...) {
    if (own_dir) std::filesystem::remove_all(dir);
    throw;
  }
  if (own_dir) std::filesystem::remove_all(dir);
  r.add("bsp-round.checkpointing", ck.seconds_per_round * 1e3, "ms",
        std::to_string(ck.checkpoints) + " checkpoints written during the rounds");
  r.add("bsp-round.checkpointing.ratio", ck.seconds_per_round / round_s, "x",
        "round while checkpointing / round without (1 = free)");
  r.add("checkpoint.time", ck.last_checkpoint_seconds * 1e3, "ms", "one checkpoint of the model, snapshot to durable on disk");
}

}  // namespace shmps::bench
