// pull: one process copies the whole 64 MiB model out of the segment (consistent per slice);
// push: one worker publishes 64 MiB of gradient into its ring (the ring holds a whole model, so
// no back-pressure is timed; the server applies what was pushed between repetitions).
// push.zero-copy: the same 64 MiB through Worker::borrow_push: the worker writes each gradient
// value (1.0f, the values push copies) straight into the borrowed ring buffer, then commits
// (which checks the values in place); no gradient array of its own. push.fill-then-push is the
// same work done the copying way, as a trainer without zero-copy does it: write 1.0f into its own
// gradient array (one parameter's worth, reused), then push it.
// All in GB/s, bytes counted once, next to one memcpy of the same size.
#include <algorithm>
#include <vector>

#include <shmps/worker.hpp>

#include "workloads.hpp"

namespace shmps::bench {

void run_pull_push(const Config& cfg, const Limits& lim, Report& r) {
  const double gb = static_cast<double>(cfg.bytes()) / 1e9;
  const double memcpy_gbs = gb / lim.memcpy_s;
  {
    Job job(JobOptions{.params = cfg.params, .per_param = cfg.per_param});
    Worker w(WorkerOptions{.segment = job.name(), .rank = 0});
    std::vector<Floats> values;
    for (std::size_t i = 0; i < cfg.params; ++i) values.emplace_back(cfg.per_param);
    std::vector<double> t;
    for (int rep = -1; rep < cfg.reps; ++rep) {  // rep -1 warms up
      const double t0 = now_s();
      for (std::size_t i = 0; i < cfg.params; ++i) w.pull(Job::param(i), {values[i].data(), cfg.per_param});
      if (rep >= 0) t.push_back(now_s() - t0);
    }
    w.leave();
    const double gbs = gb / median(t);
    r.add("pull", gbs, "GB/s", "the whole model out of the segment, one process");
    r.add("pull.ratio", gbs / memcpy_gbs, "x", "pull / memcpy (target >= 0.85)");
  }
  {
    // A ring with room for a whole model's records (and their headers).
    const std::uint64_t ring = (2 * cfg.bytes() + (std::uint64_t{1} << 20)) / 64 * 64;
    Job job(JobOptions{.params = cfg.params, .per_param = cfg.per_param, .max_workers = 2, .ring_bytes = ring});
    Worker w(WorkerOptions{.segment = job.name(), .rank = 0});
    Floats grad(cfg.per_param, 1.0f);
    std::vector<double> t, t_zero_copy, t_commit, t_fill_push;
    for (int rep = -1; rep < cfg.reps; ++rep) {
      std::uint64_t seq = 0;
      const double t0 = now_s();
      for (std::size_t i = 0; i < cfg.params; ++i) seq = w.push(Job::param(i), {grad.data(), cfg.per_param});
      if (rep >= 0) t.push_back(now_s() - t0);
      w.wait_applied(seq);  // not timed: the next repetition starts with an empty ring
    }
    for (int rep = -1; rep < cfg.reps; ++rep) {
      std::uint64_t seq = 0;
      double committing = 0;
      const double t0 = now_s();
      for (std::size_t i = 0; i < cfg.params; ++i) {
        PushBuffer buf = w.borrow_push(Job::param(i));
        std::fill(buf.data(), buf.data() + buf.size(), 1.0f);
        const double c0 = now_s();
        seq = buf.commit();
        committing += now_s() - c0;
      }
      if (rep >= 0) {
        t_zero_copy.push_back(now_s() - t0);
        t_commit.push_back(committing);
      }
      w.wait_applied(seq);
    }
    for (int rep = -1; rep < cfg.reps; ++rep) {
      std::uint64_t seq = 0;
      const double t0 = now_s();
      for (std::size_t i = 0; i < cfg.params; ++i) {
        std::fill(grad.data(), grad.data() + grad.size(), 1.0f);
        seq = w.push(Job::param(i), {grad.data(), cfg.per_param});
      }
      if (rep >= 0) t_fill_push.push_back(now_s() - t0);
      w.wait_applied(seq);
    }
    w.leave();
    const double gbs = gb / median(t);
    r.add("push", gbs, "GB/s", "a whole-model gradient into the worker's ring");
    r.add("push.ratio", gbs / memcpy_gbs, "x", "push / memcpy (target >= 0.85)");
    const double zc_gbs = gb / median(t_zero_copy);
    r.add("push.zero-copy", zc_gbs, "GB/s", "borrow_push, write 1.0f into the ring buffer, commit (checks in place)");
    r.add("push.zero-copy.ratio", zc_gbs / memcpy_gbs, "x", "push.zero-copy / memcpy");
    r.add("push.zero-copy.vs_push", zc_gbs / gbs, "x", "push.zero-copy / push (the fill included)");
    r.add("push.zero-copy.commit", gb / median(t_commit), "GB/s", "commit() alone: the in-place check and publish");
    const double fill_push_gbs = gb / median(t_fill_push);
    r.add("push.fill-then-push", fill_push_gbs, "GB/s", "write 1.0f into the worker's own array, then push it");
    r.add("push.zero-copy.vs_fill-then-push", zc_gbs / fill_push_gbs, "x", "push.zero-copy / push.fill-then-push");
  }
}

}  // namespace shmps::bench
