// Bootstrap: from a model spec to a segment this server may apply to. In order:
//   1. lay the model out and check everything before anything is touched: a checkpoint to
//      restore (read and checked whole), pretrained values, room in /dev/shm;
//   2. take <name>.server.lock: exactly one server per segment, for its whole life;
//   3. create the segment (from the spec, or from a checkpoint: --restore, or the newest valid
//      one in --checkpoint-dir when there is no segment), or recover the existing one
//      (recovery.hpp), or recreate one its creator left half made;
//   4. pre-fault values and optimizer state from the apply threads (first touch: NUMA).
// Then, once the rest of the server is wired, announce_ready() writes the server's identity, a
// new epoch, and "ready" last. On any error nothing is changed and shmps::Error says what to do.
#pragma once

#include <tbb/task_arena.h>

#include <memory>
#include <optional>

#include <shmps/server/checkpoint.hpp>
#include <shmps/server/options.hpp>
#include <shmps/shm/liveness.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::server {

struct Bootstrapped {
  shm::LockFile server_lock;
  shm::Segment segment;
  std::optional<CheckpointDir> checkpoint_dir;
  std::unique_ptr<tbb::task_arena> arena;  // the apply threads: no more than the segment's redo entries
  unsigned threads = 0;
  bool recovered = false;  // an existing segment was resumed
  bool restored = false;   // the segment was made from a checkpoint
};

Bootstrapped bootstrap(const ServerOptions& options);

// Writes a new segment's identity, geometry, parameter and slice tables and ring capacities
// from its plan (not its values, not "ready"). The first part of making a segment; on its own,
// it lays a model out in a Segment::anonymous() for the components' unit tests.
void lay_out_segment(shm::Segment& segment, const ModelSpec& spec, const shm::LayoutRequest& request,
                     const shm::LayoutPlan& plan, std::uint64_t spec_hash);

// The server's pid, start time and heartbeat, a new epoch, then state "ready".
void announce_ready(shm::Segment& segment);

}  // namespace shmps::server
