// scale: W = 1, 2, 4, 8, 16 worker processes (--quick: 1, 2) training against one server, in ASP
// and in BSP. Each worker does what the example trainers do with the 16M-float model: reads all
// of it (ASP: pulls it into its own copy; BSP: reads it in place through Worker::view, no copy),
// pushes a whole-model gradient, ends its step; `--rounds` steps. Per W and mode:
//   scale.<mode>.<W>.applied      Gfloat/s the server applied (its floats_applied over the run)
//   scale.<mode>.<W>.busy         the fraction of the run the server spent in apply rounds
//   scale.<mode>.<W>.shm          MiB of /dev/shm the segment holds (allocated pages)
//   scale.<mode>.<W>.worker_rss   MiB of private memory each worker added (RssAnon, mean)
// This machine has 2 cores: every W above 1 is oversubscribed (W workers and the server share
// them), so the figures show memory growth and the server's share, not a big box's throughput.
// tools/bench/plot_scale.py draws them.
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "workloads.hpp"

namespace shmps::bench {
namespace {

// kB of one field of /proc/self/status ("RssAnon:").
double status_kib(const std::string& field) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind(field, 0) == 0) return std::stod(line.substr(field.size()));
  return 0;
}

struct ScaleResult {
  double applied_gfloats = 0, busy = 0, shm_mib = 0, worker_rss_mib = 0;
};

ScaleResult scale_run(const Config& cfg, const std::string& mode, int workers) {
  const std::size_t params = cfg.params, per_param = cfg.per_param;
  Job job(JobOptions{.params = params, .per_param = per_param, .consistency = mode, .max_workers = workers});
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const auto& h = seg.header();
  // Each worker reports the private memory it added (kB) through a shared block.
  SharedBlock reports(sizeof(double) * static_cast<std::size_t>(workers));
  auto* rss_kib = static_cast<double*>(reports.data());
  const std::uint64_t floats0 = shm::load_acquire(h.floats_applied), busy0 = shm::load_acquire(h.apply_busy_ns);
  const double t0 = now_s();
  std::vector<pid_t> pids;
  for (int r = 0; r < workers; ++r) {
    pids.push_back(spawn("scale worker " + std::to_string(r), [&, r] {
      const double anon0 = status_kib("RssAnon:");
      Worker w(WorkerOptions{.segment = job.name(), .rank = r});
      const bool views = mode == "bsp";
      std::vector<Floats> model;
      if (!views)
        for (std::size_t i = 0; i < params; ++i) model.emplace_back(per_param);
      Floats grad(per_param, 1.0f / static_cast<float>(workers));
      std::uint64_t last = 0;
      for (int step = 0; step < cfg.rounds; ++step) {
        if (views) {
          float sum = 0;  // the reads a forward pass makes, straight from the segment
          for (std::size_t i = 0; i < params; ++i)
            for (const float v : w.view(Job::param(i))) sum += v;
          keep(sum);
        } else {
          for (std::size_t i = 0; i < params; ++i) w.pull(Job::param(i), {model[i].data(), per_param});
        }
        for (std::size_t i = 0; i < params; ++i) last = w.push(Job::param(i), {grad.data(), per_param});
        w.clock();
      }
      w.wait_applied(last);
      rss_kib[r] = status_kib("RssAnon:") - anon0;
      w.leave();
    }));
  }
  if (!wait_all(pids)) throw Error("scale: a worker failed (" + mode + ", " + std::to_string(workers) + " workers)");
  const double seconds = now_s() - t0;
  ScaleResult result;
  result.applied_gfloats = static_cast<double>(shm::load_acquire(h.floats_applied) - floats0) / seconds / 1e9;
  result.busy = static_cast<double>(shm::load_acquire(h.apply_busy_ns) - busy0) / 1e9 / seconds;
  struct stat st {};
  if (::stat(shm::segment_path(job.name()).c_str(), &st) == 0)
    result.shm_mib = static_cast<double>(st.st_blocks) * 512.0 / (1 << 20);
  double sum = 0;
  for (int r = 0; r < workers; ++r) sum += rss_kib[r];
  result.worker_rss_mib = sum / workers / 1024.0;
  return result;
}

}  // namespace

void run_scale(const Config& cfg, const Limits& lim, Report& r) {
  const std::vector<int> counts = cfg.quick ? std::vector<int>{1, 2} : std::vector<int>{1, 2, 4, 8, 16};
  const double model_mib = static_cast<double>(cfg.bytes()) / (1 << 20);
  for (const std::string mode : {"asp", "bsp"}) {
    for (const int w : counts) {
      const ScaleResult s = scale_run(cfg, mode, w);
      const std::string at = "scale." + mode + "." + std::to_string(w);
      const std::string who = std::to_string(w) + " workers on " + std::to_string(sysconf(_SC_NPROCESSORS_ONLN)) + " cores";
      r.add(at + ".applied", s.applied_gfloats, "Gfloat/s", who + ", whole-model pushes");
      r.add(at + ".applied.ratio", s.applied_gfloats * 1e9 * lim.sgd_s / static_cast<double>(cfg.floats()), "x",
            "applied / the plain SGD loop on one thread");
      r.add(at + ".busy", s.busy, "fraction", "of the run the server spent applying");
      r.add(at + ".shm", s.shm_mib, "MiB", "the segment's allocated pages (model " + std::to_string(model_mib) + " MiB)");
      r.add(at + ".worker_rss", s.worker_rss_mib, "MiB", "private memory each worker added (mean RssAnon)");
    }
  }
}

}  // namespace shmps::bench
