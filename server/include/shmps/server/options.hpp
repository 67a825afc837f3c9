// How a server is started: the model spec and everything shmps-server's command line adds to it.
#pragma once

#include <chrono>
#include <cstddef>
#include <filesystem>

#include <shmps/server/checkpoint.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::server {

class MpiComm;

struct ServerOptions {
  ModelSpec spec;
  unsigned threads = 0;          // apply threads; 0: spec.server_threads, else all cores
  bool remove_on_stop = false;   // remove the segment and its lock files when run() returns
  unsigned mode = 0600;          // of the segment and lock files (0660 to share with a group)
  // Apply the spec's consistency, bsp_aggregate and on_worker_death also to a recovered segment
  // (by default a recovered segment keeps the policy it had, perhaps set live by shmps-ctl).
  bool override_policy = false;
  // How often worker slots are probed for dead holders (the death-detection time).
  std::chrono::milliseconds liveness_interval{100};
  // How long the server keeps polling the rings after its last work before it sleeps on the
  // futex. A push found while polling is applied at once; one that wakes a sleeping server
  // waits for the futex wake and the scheduler: tens of microseconds, and up to a scheduler
  // tick on a busy machine. Polling yields the core at every turn, so runnable workers are not
  // held back. 0: sleep as soon as a round finds nothing.
  std::chrono::microseconds idle_poll{200};
  // A live worker whose heartbeat is older than this is shown as "suspect" (display only).
  std::chrono::milliseconds suspect_after{5000};

  // Checkpoints (checkpoint.hpp). With a directory, the server writes "<name>.<serial>.safetensors"
  // there every `checkpoint_every` (a period or a number of clocks; neither: only on demand), on
  // demand (shmps-ctl checkpoint NAME) and at a graceful stop, keeping the newest `keep` (0: all);
  // and a server that finds no segment restores the newest valid checkpoint there.
  std::filesystem::path checkpoint_dir;
  CheckpointEvery checkpoint_every;
  std::size_t keep = 3;
  // Restore the job from this checkpoint file instead of initialising it from the spec. Refused
  // when the segment exists (its state is newer than any file).
  std::filesystem::path restore;
  // `restore` is this replica's own part of a multi-host checkpoint (checkpoint_manifest.hpp):
  // its sync tables are restored too. Otherwise (one file for every group) the replica syncs
  // afresh from the restored values.
  bool restore_sync_tables = false;

  // Server groups (SINGA's; server/src/sync_engine.hpp): this server serves group server_group
  // of server_groups of job `job`; its segment (spec.name) is the group's replica,
  // shm::replica_name(job, server_group). server_groups = 1: no server groups.
  std::string job;
  std::uint32_t server_group = 0;
  std::uint32_t server_groups = 1;
  // Server groups on several hosts (docs/several-hosts.md): the MPI communication thread
  // (server/src/mpi_comm.hpp) of this server, one MPI rank per group; server_group is its rank and
  // server_groups its size. Null: the groups sync through shared memory on this host.
  MpiComm* mpi = nullptr;
};

// The layout a server started with these options gives a new segment (Server::start() creates
// exactly this): for shmps-server --plan, which shows what a spec costs without creating
// anything. Throws shmps::Error for an impossible spec.
shm::LayoutRequest layout_request(const ServerOptions& options);
shm::LayoutPlan plan_for(const ServerOptions& options);

}  // namespace shmps::server
