// shmps-worker --model ctr: the sparse click-through model (docs/workloads.md §4) trained through a
// job's table and head, locally (--local), or evaluated (--evaluate), as main() does for the MLP.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace shmps::trainer {

// What main() parsed, for the click-through model.
struct CtrOptions {
  std::string segment;
  int rank = -1;
  std::uint64_t samples = 0, batch = 0, workers = 0;
  double lr = 0.0;
  bool evaluate = false, local = false, eval_train = false;
  std::string consistency;
  std::optional<std::uint64_t> max_unapplied;  // none: no bound
};

// Per batch (server mode): the batch's distinct ids, pull_rows of them and pulls of the head,
// forward/backward, push_rows of one gradient row per distinct id and pushes of the head's
// gradients; the server applies its optimizer to the touched rows only. Returns the exit code.
int run_ctr(const CtrOptions& o);

}  // namespace shmps::trainer
