#include "checkpoint_scheduler.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/membership.hpp>
#include <shmps/shm/proc.hpp>

namespace shmps::server {

using namespace shmps::shm;

CheckpointScheduler::CheckpointScheduler(Segment& segment, tbb::task_arena& arena, std::optional<CheckpointDir> dir,
                                         CheckpointEvery every, std::size_t keep, unsigned file_mode)
    : segment_(segment), arena_(arena), dir_(std::move(dir)), every_(every), keep_(keep), file_mode_(file_mode) {}

CheckpointScheduler::~CheckpointScheduler() {
  if (busy()) thread_.join();
}

void CheckpointScheduler::request(const std::filesystem::path& path) {
  request_path_ = path;
  request_pending_ = true;
}

// The clock a periodic "every N clocks" counts: in BSP the slowest worker group's clock; in ASP and
// SSP the clock of the slowest worker that counts (what the staleness bound is about).
std::uint64_t CheckpointScheduler::job_clock() const {
  const SegmentHeader& h = segment_.header();
  if (load_own(h.consistency) == static_cast<std::uint32_t>(Consistency::bsp)) return slowest_group_clock(segment_);
  std::uint64_t slowest = UINT64_MAX;
  for (std::uint32_t r = 0; r < h.max_workers; ++r)
    if (counts_for_group(h, segment_.slot(r))) slowest = std::min(slowest, load_own(segment_.slot(r).consumed_clock));
  return slowest == UINT64_MAX ? 0 : slowest;
}

// Changes whenever the state a checkpoint holds may have changed.
std::uint64_t CheckpointScheduler::work_done() const {
  const SegmentHeader& h = segment_.header();
  std::uint64_t clocks = 0;
  for (std::uint32_t g = 0; g < h.group_count; ++g) clocks += load_own(segment_.group(g).clock);
  return load_own(h.records_applied) + load_own(h.records_discarded) + load_own(h.steps) + clocks + load_own(h.consistency);
}

void CheckpointScheduler::start(const std::filesystem::path& path, bool in_dir, bool requested) {
  path_ = path;
  in_dir_ = in_dir;
  requested_ = requested;
  error_.clear();
  started_ns_ = monotonic_ns();
  try {
    take_snapshot(segment_, arena_, snapshot_);
  } catch (const std::exception& e) {  // std::bad_alloc: no room for the copy
    error_ = std::string("cannot copy the job's state for the checkpoint: ") + e.what();
    finished_.store(true, std::memory_order_release);
    thread_ = std::thread([] {});
    return;
  }
  pause_ns_ = monotonic_ns() - started_ns_;
  checkpointed_work_ = work_done();
  finished_.store(false, std::memory_order_release);
  thread_ = std::thread([this] {
    try {
      write_checkpoint(snapshot_, path_, file_mode_);
    } catch (const std::exception& e) {
      error_ = e.what();
    }
    finished_.store(true, std::memory_order_release);
  });
}

// Collects a finished checkpoint (or waits for it): records it, prunes the directory, keeps a
// requested one's outcome.
void CheckpointScheduler::finish(bool wait) {
  if (!busy() || (!wait && !finished_.load(std::memory_order_acquire))) return;
  thread_.join();
  SegmentHeader& h = segment_.header();
  const std::uint64_t took_ns = monotonic_ns() - started_ns_;
  const double seconds = static_cast<double>(took_ns) / 1e9;
  const std::uint64_t bytes = snapshot_.data_bytes();
  std::string reply;
  if (error_.empty()) {
    ++written_;
    bump_counter(h.checkpoints, std::uint64_t{1});
    store_release(h.last_checkpoint_unix_ns, snapshot_.taken_unix_ns);
    store_release(h.last_checkpoint_duration_ns, took_ns);
    store_release(h.last_checkpoint_clock, snapshot_.model_clock);
    const std::size_t pruned = in_dir_ ? dir_->prune(keep_) : 0;
    char rate[64];
    std::snprintf(rate, sizeof rate, "%.2f s, %.0f MB/s", seconds, seconds > 0 ? static_cast<double>(bytes) / 1e6 / seconds : 0.0);
    spdlog::info("event=checkpoint segment={} path={} bytes={} model_clock={} pause_ms={:.1f} seconds={:.3f} pruned={}",
                 h.name, path_.string(), bytes, snapshot_.model_clock, static_cast<double>(pause_ns_) / 1e6, seconds,
                 pruned);
    reply = "checkpoint of '" + std::string(h.name) + "' at model clock " + std::to_string(snapshot_.model_clock) +
            " written to " + path_.string() + " (" + std::to_string(bytes) + " bytes, " + rate + ")";
  } else {
    bump_counter(h.checkpoint_failures, std::uint64_t{1});
    spdlog::error("event=checkpoint_failed segment={} path={} error=\"{}\" note=\"training goes on; the previous "
                  "checkpoints are intact\"", h.name, path_.string(), error_);
    reply = error_;
  }
  if (requested_) {
    request_running_ = false;
    answer_ = Outcome{error_.empty() ? 0 : 1, reply};
  }
}

bool CheckpointScheduler::periodic_due() {
  bool due = false;
  const auto now = std::chrono::steady_clock::now();
  if (every_.period.count() > 0) {
    if (next_time_ == std::chrono::steady_clock::time_point{}) next_time_ = now + every_.period;
    due = now >= next_time_;
  }
  std::uint64_t clock = 0;
  if (every_.clocks > 0) {
    clock = job_clock();
    if (next_clock_ == 0) next_clock_ = (clock / every_.clocks + 1) * every_.clocks;
    due = due || clock >= next_clock_;
  }
  if (!due) return false;
  if (every_.period.count() > 0) next_time_ = now + every_.period;
  if (every_.clocks > 0) next_clock_ = (clock / every_.clocks + 1) * every_.clocks;
  return work_done() != checkpointed_work_;  // nothing changed since the last one: not due
}

void CheckpointScheduler::tick() {
  finish(false);
  if (busy()) return;
  if (request_pending_) {
    request_pending_ = false;
    request_running_ = true;
    const bool in_dir = request_path_.empty();
    start(in_dir ? dir_->next_path() : request_path_, in_dir, true);
    return;
  }
  if (dir_ && periodic_due()) start(dir_->next_path(), true, false);
}

void CheckpointScheduler::finish_at_stop() {
  finish(true);
  if (request_pending_) {
    tick();
    finish(true);
  }
  if (dir_ && work_done() != checkpointed_work_) {
    start(dir_->next_path(), true, false);
    finish(true);
  }
}

}  // namespace shmps::server
