// apply: the server's apply path, in this process (the shmps_server library, driven one round
// at a time as its tests do): a worker queues one whole-model gradient in its ring (not timed),
// then one apply round applies it, SGD, Adam and Adam with bf16 state (state_dtype = "bf16"),
// with 1 and 2 apply threads; Gfloat/s next to
// the plain p -= lr * g loop with as many threads. The round is everything the server does for
// it: taking the records, the per-slice redo copy that makes a crash mid-apply recoverable
// (layout.hpp, RedoEntry), the optimizer, the seqlock and the metrics. On one thread the plain
// loop is also timed over the segment's own values and the queued gradients (same_memory), so
// that the segment's memory is not mistaken for the apply's cost. The apply.design figures
// (apply_designs.cpp) run in this group too.
//
// push-to-apply: 1 and 2 worker processes push whole-model gradients continuously (--rounds each)
// to a real server (ASP, SGD, all cores, default ring); applied Gfloat/s from the earliest
// worker's first push to the latest worker's wait_applied() of its last, next to the plain loop
// on one thread. push-to-apply.zero-copy: the same, each push a borrow_push whose buffer the
// worker fills with 1.0f (the values push copies) before it commits.
#include <algorithm>
#include <atomic>
#include <new>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/server/server.hpp>
#include <shmps/shm/ring.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "workloads.hpp"

namespace shmps::bench {
namespace {

// One apply round over a queued whole-model gradient with `threads` apply threads, and the plain
// loop over as many floats with as many threads, timed in turns (each rep: the loop, then the
// round) so that both see the same machine: this VM's memory speed drifts by a third between
// runs, so a ratio to a loop timed minutes earlier says little. Medians of each.
struct ApplyTimes {
  double apply_s = 0;
  double plain_s = 0;
  double plain_same_memory_s = 0;  // the plain loop over the segment's values and the queued gradients
};

// The plain loop over what the round is about to apply: each queued record's gradient, from the
// ring, into its parameter's values in the segment (a mapping of the bench's own). The round then
// applies the same records: the values differ from what the round alone would give, which does
// not matter here.
void plain_sgd_over_segment(shm::Segment& segment, int threads) {
  const shm::RingConsumer ring(&segment.ring(0), segment.ring_data(0));
  ring.read([&](std::uint64_t, const shm::PushRecord& record) {
    if (record.kind == shm::RecordKind::push)
      plain_sgd_pass(segment.values(segment.param(record.param)) + record.offset, shm::record_payload(&record),
                     record.count, threads);
    return true;
  });
}

ApplyTimes time_apply(const Config& cfg, const std::string& optimizer, int threads, const std::string& state_dtype = "") {
  const std::string name = job_name();
  JobOptions job{.params = cfg.params,
                 .per_param = cfg.per_param,
                 .optimizer = optimizer,
                 .state_dtype = state_dtype,
                 .max_workers = 1,
                 .ring_bytes = (cfg.bytes() + (std::uint64_t{4} << 20)) / 64 * 64,
                 .threads = threads};
  server::ServerOptions options;
  options.spec = server::parse_model_spec(job_spec(job, name), "<shmps-bench apply>");
  options.remove_on_stop = true;
  std::vector<double> t, plain, plain_same_memory;
  {
    server::Server srv(std::move(options));
    srv.start();
    Worker w(WorkerOptions{.segment = name, .rank = 0});
    Floats grad(cfg.per_param, 0.5f);
    Floats p(cfg.floats(), 1.0f), g(cfg.floats(), 0.5f);
    shm::Segment segment = shm::Segment::open(name, shm::Access::read_write);
    for (int rep = -1; rep < cfg.reps; ++rep) {  // rep -1 warms up
      for (std::size_t i = 0; i < cfg.params; ++i) w.push(Job::param(i), {grad.data(), cfg.per_param});
      const double t0 = now_s();
      plain_sgd_pass(p.data(), g.data(), cfg.floats(), threads);
      const double t1 = now_s();
      if (threads == 1) plain_sgd_over_segment(segment, threads);
      const double t2 = now_s();
      const std::uint64_t records = srv.apply_round();
      const double t3 = now_s();
      if (rep >= 0) {
        plain.push_back(t1 - t0);
        plain_same_memory.push_back(t2 - t1);
        t.push_back(t3 - t2);
      }
      if (records != cfg.params)
        throw Error("apply: a round applied " + std::to_string(records) + " records, not " + std::to_string(cfg.params));
    }
    keep(p.data()[cfg.floats() / 2]);
    w.leave();
  }
  shm::Segment::remove(name);
  return {median(t), median(plain), median(plain_same_memory)};
}

struct PushShared {
  std::atomic<int> ready{0};
  std::atomic<int> go{0};
  double start[2] = {0, 0};
  double end[2] = {0, 0};
};

// Applied floats per second with `workers` pushing `rounds` whole models each, with push() or
// (zero_copy) with borrow_push(), fill, commit().
double push_to_apply(const Config& cfg, int workers, int rounds, bool zero_copy) {
  Job job(JobOptions{.params = cfg.params, .per_param = cfg.per_param});
  SharedBlock block(sizeof(PushShared));
  auto* sh = new (block.data()) PushShared;
  std::vector<pid_t> pids;
  for (int rank = 0; rank < workers; ++rank) {
    pids.push_back(spawn("push-to-apply worker " + std::to_string(rank), [&, rank] {
      Worker w(WorkerOptions{.segment = job.name(), .rank = rank});
      Floats grad(cfg.per_param, 1.0f);
      sh->ready.fetch_add(1);
      while (sh->go.load(std::memory_order_acquire) == 0) std::this_thread::yield();
      sh->start[rank] = now_s();
      std::uint64_t seq = 0;
      for (int round = 0; round < rounds; ++round)
        for (std::size_t i = 0; i < cfg.params; ++i) {
          if (!zero_copy) {
            seq = w.push(Job::param(i), {grad.data(), cfg.per_param});
            continue;
          }
          PushBuffer buf = w.borrow_push(Job::param(i));
          std::fill(buf.data(), buf.data() + buf.size(), 1.0f);
          seq = buf.commit();
        }
      w.wait_applied(seq);
      sh->end[rank] = now_s();
      w.leave();
    }));
  }
  const double give_up = now_s() + 30;
  while (sh->ready.load() < workers) {
    if (now_s() > give_up) break;  // a worker failed; wait_all reports it
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  sh->go.store(1, std::memory_order_release);
  if (!wait_all(pids)) throw Error("push-to-apply: a worker failed");
  double first = sh->start[0], last = sh->end[0];
  for (int rank = 1; rank < workers; ++rank) {
    first = std::min(first, sh->start[rank]);
    last = std::max(last, sh->end[rank]);
  }
  return static_cast<double>(workers) * rounds * static_cast<double>(cfg.floats()) / (last - first);
}

}  // namespace

void run_apply(const Config& cfg, const Limits&, Report& r) {
  const double gf = static_cast<double>(cfg.floats()) / 1e9;
  const ApplyTimes sgd1 = time_apply(cfg, "sgd", 1);
  const ApplyTimes sgd2 = time_apply(cfg, "sgd", 2);
  const ApplyTimes adam1 = time_apply(cfg, "adam", 1);
  const ApplyTimes adam2 = time_apply(cfg, "adam", 2);
  r.add("apply.sgd", gf / sgd1.apply_s, "Gfloat/s", "one server apply round of a queued whole-model gradient, SGD, one thread");
  r.add("apply.sgd.ratio", sgd1.plain_s / sgd1.apply_s, "x",
        "apply.sgd / the plain loop timed in turns with it, one thread (target >= 0.9)");
  r.add("apply.sgd.same_memory.ratio", sgd1.plain_same_memory_s / sgd1.apply_s, "x",
        "apply.sgd / the plain loop over the segment's values and the queued gradients, in turns, one thread");
  r.add("apply.sgd.2threads", gf / sgd2.apply_s, "Gfloat/s", "the same on two threads");
  r.add("apply.sgd.2threads.ratio", sgd2.plain_s / sgd2.apply_s, "x",
        "/ the plain loop timed in turns with it, two threads (target >= 0.9)");
  r.add("apply.adam", gf / adam1.apply_s, "Gfloat/s", "Adam, one thread");
  r.add("apply.adam.vs_sgd", adam1.apply_s / sgd1.apply_s, "x", "Adam time / SGD time, one thread (target <= 2)");
  r.add("apply.adam.2threads", gf / adam2.apply_s, "Gfloat/s", "Adam, two threads");
  r.add("apply.adam.2threads.vs_sgd", adam2.apply_s / sgd2.apply_s, "x", "Adam time / SGD time, two threads (target <= 2)");
  const ApplyTimes adam_bf16_1 = time_apply(cfg, "adam", 1, "bf16");
  const ApplyTimes adam_bf16_2 = time_apply(cfg, "adam", 2, "bf16");
  r.add("apply.adam_bf16", gf / adam_bf16_1.apply_s, "Gfloat/s", "Adam with bf16 state (state_dtype = \"bf16\"), one thread");
  r.add("apply.adam_bf16.vs_sgd", adam_bf16_1.apply_s / sgd1.apply_s, "x", "Adam bf16-state time / SGD time, one thread (target <= 2)");
  r.add("apply.adam_bf16.2threads", gf / adam_bf16_2.apply_s, "Gfloat/s", "Adam with bf16 state, two threads");
  r.add("apply.adam_bf16.2threads.vs_sgd", adam_bf16_2.apply_s / sgd2.apply_s, "x",
        "Adam bf16-state time / SGD time, two threads (target <= 2)");
}

void run_push_to_apply(const Config& cfg, const Limits& lim, Report& r) {
  const int rounds = cfg.quick ? 2 : cfg.rounds;
  const double sgd_gfs = static_cast<double>(cfg.floats()) / lim.sgd_s / 1e9;
  for (const bool zero_copy : {false, true})
    for (int workers = 1; workers <= 2; ++workers) {
      const double gfs = push_to_apply(cfg, workers, rounds, zero_copy) / 1e9;
      const std::string name = std::string(zero_copy ? "push-to-apply.zero-copy." : "push-to-apply.") +
                               std::to_string(workers);
      r.add(name, gfs, "Gfloat/s",
            std::to_string(workers) + " worker(s) x " + std::to_string(rounds) +
                (zero_copy ? " whole-model borrow_push, fill 1.0f, commit" : " whole-model pushes") +
                ", applied end to end");
      r.add(name + ".ratio", gfs / sgd_gfs, "x", "/ plain loop, one thread (target >= 0.5)");
    }
}

}  // namespace shmps::bench
