// When the server writes checkpoints, and the writing itself in the background.
//
// A checkpoint is a snapshot taken between two apply rounds (one consistent state of the whole
// job, at a clock boundary in BSP), written by a background thread while the server goes on
// applying: training pauses only for the copy. At most one is being written at a time. What is
// due: one asked for by a command (its outcome kept until collected), then
// the periodic one (every N seconds or N clocks), and the last one at a graceful stop. A
// checkpoint is skipped when nothing changed since the previous one. The file format and the
// directory's rotation are checkpoint.hpp's; answering shmps-ctl is commands.hpp's.
#pragma once

#include <tbb/task_arena.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include <shmps/server/checkpoint.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::server {

class CheckpointScheduler {
 public:
  CheckpointScheduler(shm::Segment& segment, tbb::task_arena& arena, std::optional<CheckpointDir> dir,
                      CheckpointEvery every, std::size_t keep, unsigned file_mode = 0600);
  ~CheckpointScheduler();
  CheckpointScheduler(const CheckpointScheduler&) = delete;
  CheckpointScheduler& operator=(const CheckpointScheduler&) = delete;

  bool has_directory() const noexcept { return dir_.has_value(); }

  // A checkpoint asked for by a command (shmps-ctl checkpoint): into `path` (absolute), or into
  // the directory when `path` is empty. It starts as soon as the writer is free.
  void request(const std::filesystem::path& path);
  // A requested checkpoint is not done yet.
  bool request_open() const noexcept { return request_pending_ || request_running_; }
  // Once a requested checkpoint is durable (status 0) or failed, its outcome, once: what to
  // answer the command with.
  struct Outcome {
    int status;
    std::string reply;
  };
  std::optional<Outcome> take_outcome() { return std::exchange(answer_, std::nullopt); }
  bool has_outcome() const noexcept { return answer_.has_value(); }

  // Between rounds: collects a finished checkpoint, then starts what is due.
  void tick();

  // At a graceful stop, once the rings are drained: finishes the checkpoint being written,
  // answers a waiting shmps-ctl, and writes the last checkpoint of this run (unless nothing
  // changed since the previous one).
  void finish_at_stop();

  std::uint64_t written() const noexcept { return written_; }

 private:
  bool busy() const { return thread_.joinable(); }
  void start(const std::filesystem::path& path, bool in_dir, bool requested);
  void finish(bool wait);
  bool periodic_due();
  std::uint64_t job_clock() const;
  std::uint64_t work_done() const;

  shm::Segment& segment_;
  tbb::task_arena& arena_;
  std::optional<CheckpointDir> dir_;
  const CheckpointEvery every_;
  const std::size_t keep_;
  const unsigned file_mode_;  // of the checkpoint files: 0600, or 0640 with --group

  // The checkpoint being written (its snapshot's buffers are reused from one to the next).
  Snapshot snapshot_;
  std::thread thread_;
  std::atomic<bool> finished_{false};
  std::filesystem::path path_;
  bool in_dir_ = false;       // one of the directory's rotation (pruned to `keep`)
  bool requested_ = false;    // asked by a command: its outcome is kept for take_outcome()
  std::string error_;
  std::uint64_t started_ns_ = 0, pause_ns_ = 0;

  bool request_pending_ = false;  // accepted; starts once the writer is free
  bool request_running_ = false;
  std::filesystem::path request_path_;
  std::optional<Outcome> answer_;
  std::chrono::steady_clock::time_point next_time_{};
  std::uint64_t next_clock_ = 0;
  std::uint64_t checkpointed_work_ = UINT64_MAX;  // work_done() at the last snapshot
  std::uint64_t written_ = 0;
};

}  // namespace shmps::server
