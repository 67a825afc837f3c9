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

#include <shmps/server/options.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::server {

struct ServerStats {
  std::uint64_t records_applied = 0;
  std::uint64_t floats_applied = 0;
  std::uint64_t rounds = 0;
  std::uint64_t workers_died = 0;
  std::uint64_t checkpoints = 0;  // written durably by this server
  bool restored = false;          // start() recreated the job from a checkpoint
};

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
