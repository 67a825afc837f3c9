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
void run_mpi(const Config& cfg, Report& report);                            // mpi.cpp
void run_scale(const Config& cfg, const Limits& lim, Report& report);       // scale.cpp
void run_sparse(const Config& cfg, Report& report);                         // sparse.cpp

}  // namespace shmps::bench
