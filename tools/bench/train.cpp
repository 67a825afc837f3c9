// train: the reference MLP (docs/workloads.md §2) trained by the example trainer,
// shmps-worker, run as child processes:
//   local      shmps-worker --local: one process, no parameter server (the limit)
//   asp.1      one worker through shmps (shmps-launch, ASP), next to local
//   asp.2      two workers, ASP, next to asp.1
//   bsp.2      two workers, BSP, next to asp.2
//   ssp2.2     two workers, SSP with bound 2, next to asp.2
// samples/s is all workers' samples over the longest worker's training time (as the workers
// print them); the final model's train loss and test accuracy come from shmps-worker
// --evaluate run by shmps-launch --after (or, for local, from its own final evaluation).
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <shmps/error.hpp>

#include "workloads.hpp"

namespace shmps::bench {

TrainResult run_training(const std::string& command, const std::string& eval_prefix) {
  FILE* f = popen((command + " 2>&1").c_str(), "r");
  if (f == nullptr) throw Error("cannot run " + command);
  TrainResult r;
  unsigned long long total_samples = 0;
  double longest = 0;
  std::string output;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, f) != nullptr) {
    const std::string line(buf);
    output += line;
    std::string body = line;
    std::string prefix;
    if (!body.empty() && body[0] == '[') {
      const auto close = body.find("] ");
      if (close != std::string::npos) {
        prefix = body.substr(0, close + 2);
        body = body.substr(close + 2);
      }
    }
    unsigned long long batches = 0, samples = 0;
    double secs = 0, loss = 0, acc = 0;
    if (std::sscanf(body.c_str(), "trained %llu batches, %llu samples in %lf s", &batches, &samples, &secs) == 3) {
      total_samples += samples;
      longest = std::max(longest, secs);
    } else if (prefix == eval_prefix && std::sscanf(body.c_str(), "train loss %lf acc %lf", &loss, &acc) == 2) {
      r.train_loss = loss;
    } else if (prefix == eval_prefix && std::sscanf(body.c_str(), "test loss %lf acc %lf", &loss, &acc) == 2) {
      r.test_acc = acc;
    }
  }
  const int status = pclose(f);
  if (status != 0 || longest <= 0 || r.test_acc < 0)
    throw Error("train: '" + command + "' failed or printed no figures; its output:\n" + output);
  r.samples_per_s = static_cast<double>(total_samples) / longest;
  return r;
}

namespace {

TrainResult run(const std::string& command, const std::string& eval_prefix) { return run_training(command, eval_prefix); }

void add(Report& rep, const std::string& name, const TrainResult& t, const std::string& what, const TrainResult* base,
         const std::string& base_name) {
  rep.add(name, t.samples_per_s, "samples/s", what);
  if (base != nullptr) rep.add(name + ".ratio", t.samples_per_s / base->samples_per_s, "x", "/ " + base_name);
  if (t.train_loss >= 0) rep.add(name + ".train_loss", t.train_loss, "loss", "final model, training set");
  rep.add(name + ".test_acc", t.test_acc, "fraction", "final model, test set (--quick: 2000 rows of each)");
}

// The spec at `path` with dtype = "bf16" on every [[param]]: written next to it in /tmp, for
// run_train_bf16. Only the values' storage changes; names, shapes, inits and optimizer stay.
std::string bf16_copy_of(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error("train-bf16: cannot read the model spec " + path);
  std::ostringstream out;
  int params = 0;
  for (std::string line; std::getline(in, line);) {
    out << line << "\n";
    if (line.rfind("[[param]]", 0) == 0) {
      out << "dtype = \"bf16\"\n";
      ++params;
    }
  }
  if (params == 0) throw Error("train-bf16: " + path + " has no [[param]]");
  const std::string copy = "/tmp/shmps-bench-bf16-" + std::to_string(::getpid()) + ".toml";
  std::ofstream f(copy);
  f << out.str();
  if (!f.flush()) throw Error("train-bf16: cannot write " + copy);
  return copy;
}

}  // namespace

void run_train(const Config& cfg, Report& rep) {
  const std::string dir = self_dir();
  // --quick: evaluate on 2000 rows of each set, not all 220,000 (minutes under a sanitizer).
  const std::string samples = std::to_string(cfg.train_samples);
  const std::string eval = cfg.quick ? " --eval-rows 2000" : "";
  int job = 0;
  auto launch = [&](int workers, const std::string& consistency) {
    const std::string name = "bench-train-" + std::to_string(::getpid()) + "-" + std::to_string(job++);
    return run(dir + "/shmps-launch --spec '" + cfg.mlp_spec + "' --name " + name + " --workers " +
                   std::to_string(workers) + " --consistency " + consistency + " --after '" + dir +
                   "/shmps-worker --evaluate" + eval + "' --samples " + samples + eval,
               "[after] ");
  };
  const TrainResult local = run(dir + "/shmps-worker --local --samples " + samples + eval, "");
  add(rep, "train.local", local, "shmps-worker --local, " + samples + " samples, no parameter server", nullptr, "");
  const TrainResult asp1 = launch(1, "asp");
  add(rep, "train.asp.1", asp1, "1 worker through shmps, ASP", &local, "local");
  const TrainResult asp2 = launch(2, "asp");
  add(rep, "train.asp.2", asp2, "2 workers, ASP", &asp1, "asp.1");
  const TrainResult bsp2 = launch(2, "bsp");
  add(rep, "train.bsp.2", bsp2, "2 workers, BSP", &asp2, "asp.2");
  const TrainResult ssp2 = launch(2, "ssp:2");
  add(rep, "train.ssp2.2", ssp2, "2 workers, SSP bound 2", &asp2, "asp.2");
}

// The reference MLP with its values stored as bf16 (dtype = "bf16" on every parameter) against
// float32, 2 workers, ASP and BSP, the two dtypes run in turns cfg.reps times (at most 5; once
// with --quick) so that both see the same machine: the median samples/s, and the lowest and
// highest test accuracy over the runs (BSP's is the same in every run, ASP's varies).
void run_train_bf16(const Config& cfg, Report& rep) {
  const std::string dir = self_dir();
  const std::string samples = std::to_string(cfg.train_samples);
  const std::string eval = cfg.quick ? " --eval-rows 2000" : "";
  const std::string bf16_spec = bf16_copy_of(cfg.mlp_spec);
  int job = 0;
  auto launch = [&](const std::string& spec, const std::string& consistency) {
    const std::string name = "bench-train-bf16-" + std::to_string(::getpid()) + "-" + std::to_string(job++);
    return run(dir + "/shmps-launch --spec '" + spec + "' --name " + name + " --workers 2 --consistency " +
                   consistency + " --after '" + dir + "/shmps-worker --evaluate" + eval + "' --samples " + samples +
                   eval,
               "[after] ");
  };
  const int reps = cfg.quick ? 1 : std::max(1, std::min(cfg.reps, 5));
  try {
    for (const std::string consistency : {"asp", "bsp"}) {
      std::vector<double> f32_rate, bf16_rate, f32_acc, bf16_acc;
      for (int r = 0; r < reps; ++r) {
        const TrainResult a = launch(cfg.mlp_spec, consistency);
        const TrainResult b = launch(bf16_spec, consistency);
        f32_rate.push_back(a.samples_per_s);
        bf16_rate.push_back(b.samples_per_s);
        f32_acc.push_back(a.test_acc);
        bf16_acc.push_back(b.test_acc);
      }
      const std::string k = "train.bf16." + consistency + ".2";
      const std::string f = "train.f32." + consistency + ".2";
      const std::string runs = std::to_string(reps) + " runs in turns, median";
      rep.add(f, median(f32_rate), "samples/s", "2 workers, float32 values, " + runs);
      rep.add(k, median(bf16_rate), "samples/s", "2 workers, bf16 values, " + runs);
      rep.add(k + ".ratio", median(bf16_rate) / median(f32_rate), "x", "/ " + f);
      rep.add(f + ".test_acc.min", *std::min_element(f32_acc.begin(), f32_acc.end()), "fraction", "over the runs");
      rep.add(f + ".test_acc.max", *std::max_element(f32_acc.begin(), f32_acc.end()), "fraction", "over the runs");
      rep.add(k + ".test_acc.min", *std::min_element(bf16_acc.begin(), bf16_acc.end()), "fraction", "over the runs");
      rep.add(k + ".test_acc.max", *std::max_element(bf16_acc.begin(), bf16_acc.end()), "fraction", "over the runs");
    }
  } catch (...) {
    ::unlink(bf16_spec.c_str());
    throw;
  }
  ::unlink(bf16_spec.c_str());
}

// The reference MLP on 2 and 3 MPI ranks on this machine (shmps-launch --mpi --ranks K, one
// worker per rank: server groups kept in step over MPI), each next to one rank (one server, no
// MPI) with the same total workers. Both ASP.
void run_train_mpi(const Config& cfg, Report& rep) {
  const std::string dir = self_dir();
  const std::string samples = std::to_string(cfg.train_samples);
  const std::string eval = cfg.quick ? " --eval-rows 2000" : "";
  int job = 0;
  auto launch = [&](int ranks, int workers) {
    const std::string name = "bench-mpi-train-" + std::to_string(::getpid()) + "-" + std::to_string(job++);
    return run(dir + "/shmps-launch --spec '" + cfg.mlp_spec + "' --name " + name +
                   (ranks > 1 ? " --mpi --ranks " + std::to_string(ranks) : std::string()) + " --workers " +
                   std::to_string(workers) + " --consistency asp --after '" + dir + "/shmps-worker --evaluate" + eval +
                   "' --samples " + samples + eval,
               "[after] ");
  };
  for (const int ranks : {2, 3}) {
    const std::string k = std::to_string(ranks);
    const TrainResult one = launch(1, ranks);
    add(rep, "train.mpi.1rank." + k + "workers", one, k + " workers on one server (no MPI), ASP", nullptr, "");
    const TrainResult many = launch(ranks, 1);
    add(rep, "train.mpi." + k + "ranks", many, k + " MPI ranks with 1 worker each, ASP, synced every 100 ms", &one,
        "1rank." + k + "workers");
  }
}

}  // namespace shmps::bench
