// shmps-bench: every workload of docs/workloads.md §3, each next to the machine's
// own limit measured in the same run, with the ratio.
//
//   shmps-bench [--quick] [--rounds N] [--reps N] [--out FILE] [--only GROUPS]
//
// Limits (limits.cpp): memcpy of the 64 MiB model (1 and 2 threads), the plain p -= lr * g
// loop over 16M floats (1 and 2 threads), apply2 (two gradients, as a BSP step of two workers),
// a two-process ping-pong over a shared atomic.
// Workloads: pull, push, push.zero-copy (transfer.cpp); latency (latency.cpp); apply,
// push-to-apply, push-to-apply.zero-copy (apply.cpp); bsp-round, bsp-round.checkpointing
// (bsp_round.cpp); train (train.cpp); scale (scale.cpp); mpi: MPI's ping-pong against the sync
// transport between two ranks, and the reference MLP on 2 and 3 ranks (mpi.cpp); sparse: rows of
// the click-through table pulled and pushed against a plain gather and scatter-add, and the
// click-through model trained (sparse.cpp).
//
// Prints a table, and one "name value unit" line per figure (also to --out FILE).
// --quick: small sizes, a few seconds, for CI (checks that everything runs; the figures mean
// little).
#include <iostream>
#include <set>
#include <sstream>

#include <CLI/CLI.hpp>

#include <shmps/error.hpp>

#include "workloads.hpp"

#ifndef SHMPS_MLP_SPEC
#define SHMPS_MLP_SPEC "models/mlp.toml"
#endif

int main(int argc, char** argv) {
  using namespace shmps::bench;
  CLI::App app{"shmps-bench: shmps workloads next to this machine's own limits, measured in the same run"};
  Config cfg;
  cfg.mlp_spec = SHMPS_MLP_SPEC;
  std::string out_path, only;
  int reps = 0;
  app.add_flag("--quick", cfg.quick, "small sizes, a few seconds (CI: checks that every workload runs)");
  app.add_option("--rounds", cfg.rounds, "timed BSP rounds, and whole-model pushes per worker in push-to-apply")
      ->check(CLI::Range(1, 10000));
  app.add_option("--reps", reps, "repetitions of each timed piece (median reported; default 9, --quick 3)")
      ->check(CLI::Range(1, 1000));
  app.add_option("--out", out_path, "also write the 'name value unit' lines to this file");
  app.add_option("--checkpoint-dir", cfg.checkpoint_dir,
                 "where bsp-round.checkpointing writes (default ./shmps-bench-checkpoints-<pid>, removed afterwards)");
  app.add_option("--mlp-spec", cfg.mlp_spec, "the reference MLP's model spec, for train")->capture_default_str();
  app.add_option("--train-samples", cfg.train_samples, "samples per train run (default 400000, --quick 6400)");
  app.add_option("--only", only,
                 "comma-separated groups to run: transfer, latency, apply, push-to-apply, bsp-round, train, scale, mpi, sparse, "
                 "bf16, train-bf16 (the limits always run)");
  CLI11_PARSE(app, argc, argv);

  if (cfg.quick) {
    cfg.per_param = std::size_t{1} << 14;
    cfg.rounds = std::min(cfg.rounds, 3);
    cfg.reps = 3;
    if (app.count("--train-samples") == 0) cfg.train_samples = 6400;
  }
  if (reps > 0) cfg.reps = reps;
  std::set<std::string> groups;
  std::stringstream ss(only);
  for (std::string g; std::getline(ss, g, ',');) groups.insert(g);
  auto wanted = [&](const std::string& g) { return groups.empty() || groups.count(g) != 0; };

  Report report;
  try {
    const Limits lim = measure_limits(cfg, report);
    if (wanted("transfer")) run_pull_push(cfg, lim, report);
    if (wanted("latency")) run_latency(cfg, lim, report);
    if (wanted("apply")) {
      run_apply(cfg, lim, report);
      run_apply_designs(cfg, report);
    }
    if (wanted("push-to-apply")) run_push_to_apply(cfg, lim, report);
    if (wanted("bsp-round")) run_bsp_round(cfg, lim, report);
    if (wanted("train")) run_train(cfg, report);
    if (wanted("scale")) run_scale(cfg, lim, report);
    if (wanted("mpi")) run_mpi(cfg, report);
    if (wanted("sparse")) run_sparse(cfg, report);
    if (wanted("bf16")) run_bf16(cfg, report);
    if (wanted("train-bf16")) run_train_bf16(cfg, report);
  } catch (const std::exception& e) {
    report.print(out_path);
    std::cerr << "shmps-bench: " << e.what() << "\n";
    return 1;
  }
  report.print(out_path);
  return 0;
}
