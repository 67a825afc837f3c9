// The workloads of docs/workloads.md §3 and the machine's limits, one group per file.
// Each adds its figures to the report, each next to its limit with the ratio.
#pragma once

#include "harness.hpp"

namespace shmps::bench {

Limits measure_limits(const Config& cfg, Report& report);          // limits.cpp
void run_pull_push(const Config& cfg, const Limits& lim, Report& report);   // transfer.cpp
void run_latency(const Config& cfg, const Limits& lim, Report& report);     // latency.cpp
void run_apply(const Config& cfg, const Limits& lim, Report& report);       // apply.cpp
void run_apply_designs(const Config& cfg, Report& report);                  // apply_designs.cpp
void run_push_to_apply(const Config& cfg, const Limits& lim, Report& report);  // apply.cpp
void run_bsp_round(const Config& cfg, const Limits& lim, Report& report);   // bsp_round.cpp
void run_train(const Config& cfg, Report& report);                          // train.cpp
void run_train_mpi(const Config& cfg, Report& report);                      // train.cpp
void run_train_bf16(const Config& cfg, Report& report);                     // train.cpp
void run_mpi(const Config& cfg, Report& report);                            // mpi.cpp
void run_scale(const Config& cfg, const Limits& lim, Report& report);       // scale.cpp
void run_sparse(const Config& cfg, Report& report);                         // sparse.cpp
void run_bf16(const Config& cfg, Report& report);                           // bf16.cpp

// A training run's figures (train.cpp): all workers' samples over the longest worker's time, and
// the final model's losses and accuracy (-1 where not printed).
struct TrainResult {
  double samples_per_s = 0;
  double train_loss = -1, test_acc = -1;
};
// Runs `command` (through /bin/sh) and parses the trainers' "trained N batches, S samples in T s"
// lines and the evaluation lines that start with `eval_prefix` ("[after] " for shmps-launch
// --after, "[w0] " for its rank 0, "" for a local run). Throws if it fails or prints no figures.
TrainResult run_training(const std::string& command, const std::string& eval_prefix);

}  // namespace shmps::bench
