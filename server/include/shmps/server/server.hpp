// The shmps server: creates or recovers a job's segment and applies the workers' pushes.
//
// Elephas's shape: construct from a model spec, start(), run(), stop().
//
//   shmps::server::Server server(shmps::server::ServerOptions{.spec = load_model_spec("mlp.toml")});
//   server.start();   // takes <name>.server.lock, creates or recovers the segment, writes "ready"
//   server.run();     // applies pushes until stop() is called, then drains the rings
//
// The server is the only process that waits on anything, and it never waits on something a
// worker or a tool can hold (ARCHITECTURE.md rule 1): it polls the rings, sleeps on its own futex word
// with a short bound, and learns of deaths from the kernel (lock probes).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>

#include <shmps/server/checkpoint.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::server {

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
};

struct ServerStats {
  std::uint64_t records_applied = 0;
  std::uint64_t floats_applied = 0;
  std::uint64_t rounds = 0;
  std::uint64_t workers_died = 0;
  std::uint64_t checkpoints = 0;  // written durably by this server
  bool restored = false;          // start() recreated the job from a checkpoint
};

// The layout a server started with these options gives a new segment (Server::start() creates
// exactly this): for shmps-server --plan, which shows what a spec costs without creating
// anything. Throws shmps::Error for an impossible spec.
shm::LayoutRequest layout_request(const ServerOptions& options);
shm::LayoutPlan plan_for(const ServerOptions& options);

class Server {
 public:
  explicit Server(ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Takes the server lock (a second server for the same segment fails here with a clear
  // message), then creates the segment, or recovers the existing one if it was made from the
  // same model, and marks it "ready". Throws shmps::Error; on error nothing is changed.
  void start();

  // Applies pushes until stop() is called; then applies everything committed so far and returns.
  void run();

  // Asks run() to return. Async-signal-safe: may be called from a signal handler.
  void stop() noexcept;

  // Applies what is in the rings now, once (for tests that drive the server by hand).
  std::uint64_t apply_round();

  const shm::Segment& segment() const noexcept;
  ServerStats stats() const noexcept;
  bool recovered() const noexcept;  // start() found an existing segment and resumed it

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace shmps::server
