// What the example trainer's two models (the MLP, and the click-through model of run_ctr.hpp)
// share when they train against a job: the progress lines and final figures, the resume cursor a
// worker commits with each step, and joining the job (its share of the data, the BSP start).
#pragma once

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <shmps/worker.hpp>

#include "synthetic_data.hpp"

namespace shmps::trainer {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0);

struct TrainStats {
  std::uint64_t batches = 0;
  std::uint64_t samples = 0;
  double seconds = 0.0;
  // Running figures over the last epoch this worker trained in (mean over its samples).
  double last_epoch_loss = 0.0;
  double last_epoch_acc = 0.0;
  std::uint64_t last_epoch_samples = 0;
  std::uint64_t batches_done = 0;  // of this worker's schedule, including those skipped on resume
};

// What both models' training loops report, the same way: each trained batch's loss and hits into
// the epoch's running figures and `st`, a progress line at every tenth of the run and at least
// every 2 s, and at the end of an epoch its means as the last epoch's.
class Progress {
 public:
  Progress(TrainStats& st, std::uint64_t epochs, std::uint64_t total)
      : st_(st), epochs_(epochs), total_(total), t0_(Clock::now()), last_print_(t0_) {}

  // A batch of n samples trained (its mean loss and how many it got right).
  void add(double loss, std::uint64_t correct, std::uint64_t n) {
    loss_sum_ += loss * static_cast<double>(n);
    correct_ += correct;
    seen_ += n;
    ++st_.batches;
    st_.samples += n;
  }
  // After batch k (1-based) of epoch e's `batches`: prints a line when one is due.
  void batch(std::uint64_t e, std::uint64_t k, std::size_t batches) {
    const auto now = Clock::now();
    const bool decile = st_.batches_done * 10 >= next_decile_ * total_;
    if (!decile && now - last_print_ < std::chrono::seconds(2)) return;
    while (next_decile_ <= 10 && st_.batches_done * 10 >= next_decile_ * total_) ++next_decile_;
    last_print_ = now;
    const double secs = seconds();
    std::printf("epoch %" PRIu64 "/%" PRIu64 " batch %" PRIu64 "/%zu %3" PRIu64 "%% loss %.3f acc %.3f %.0f samples/s\n",
                e + 1, epochs_, k, batches, st_.batches_done * 100 / total_, loss_sum_ / static_cast<double>(seen_),
                static_cast<double>(correct_) / static_cast<double>(seen_),
                secs > 0 ? static_cast<double>(st_.samples) / secs : 0.0);
    std::fflush(stdout);
  }
  // The epoch's running figures become the last epoch's (unless it was all done before a restart).
  void end_epoch() {
    if (seen_ != 0) {
      st_.last_epoch_loss = loss_sum_ / static_cast<double>(seen_);
      st_.last_epoch_acc = static_cast<double>(correct_) / static_cast<double>(seen_);
      st_.last_epoch_samples = seen_;
    }
    loss_sum_ = 0.0;
    correct_ = seen_ = 0;
  }
  double seconds() const { return seconds_since(t0_); }

 private:
  TrainStats& st_;
  const std::uint64_t epochs_, total_;
  const Clock::time_point t0_;
  Clock::time_point last_print_;
  std::uint64_t next_decile_ = 1;
  double loss_sum_ = 0.0;
  std::uint64_t correct_ = 0, seen_ = 0;
};

// --eval-rows: evaluate on at most this many rows of each set (a quick check; 0: all of them).
inline std::uint64_t g_eval_rows = 0;
inline std::uint64_t eval_rows(std::uint64_t all) { return g_eval_rows == 0 ? all : std::min(all, g_eval_rows); }

// One evaluation's line, for either model's EvalResult (loss, accuracy, rows from `first`).
template <class EvalResult>
void print_eval(const char* what, const EvalResult& r, std::uint64_t first) {
  std::printf("%s loss %.4f acc %.4f (rows %" PRIu64 "..%" PRIu64 ")\n", what, r.loss, r.accuracy, first,
              first + r.rows - 1);
}

// The figures of a finished run both models print first: batches, samples and samples/s, and the
// running loss and accuracy of this worker's last epoch.
void print_training_figures(const TrainStats& st);

// $SHMPS_WORLD_SIZE (set by shmps-launch), or 1.
std::uint64_t world_size_from_env();

// The resume state a worker commits with each step (Worker::save_state): which schedule, and how
// many of its batches are done.
std::vector<std::byte> cursor_bytes(const shmps::data::Schedule& sched, std::uint64_t batches_done);

// Batches already done by this slot's previous processes (0 for a fresh slot). A cursor from
// another schedule is an error: continuing it would train on the wrong data.
std::uint64_t resume_cursor(const shmps::Worker& w, const shmps::data::Schedule& sched);

// Joins the job with the worker's slot, for either model: this worker's share of the schedule
// (--workers, else $SHMPS_WORLD_SIZE; the rank is the slot's, or $SHMPS_GLOBAL_RANK under server
// groups), the consistency check, the resume cursor, and in BSP the start barrier. Returns how
// many of this worker's batches the slot's previous processes already did.
std::uint64_t join_job(shmps::Worker& w, shmps::data::Schedule& sched, int rank, std::uint64_t workers,
                       const std::string& consistency);

}  // namespace shmps::trainer
