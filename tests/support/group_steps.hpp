// shmps-test-pusher group-steps: a BSP worker of a job with worker groups (group_steps.cpp says
// what it does and checks).
#pragma once

#include <cstdint>

#include <shmps/worker.hpp>

namespace shmps::test {

struct GroupStepsOptions {
  std::uint64_t workers = 1, steps = 10, slow_ms = 0;
  std::int64_t hang_at = -1, absent_rank = -1, absent_step = 0;
  bool check = false;
};

// The exit status: 0 if every --check held.
int run_group_steps(Worker& w, const GroupStepsOptions& options);

// The fractional gradients it pushes to "own<g>": element `element` of step `step` of `rank`.
float ugly(std::uint64_t rank, std::uint64_t step, std::uint64_t element);

}  // namespace shmps::test
