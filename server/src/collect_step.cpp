// The whole-step collector (BSP): step t of one worker group from each of its rings, or nothing
// (collect.hpp says how a ring's records form runs of pushes, and when a run counts).
#include <algorithm>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/killpoint.hpp>
#include <shmps/shm/membership.hpp>

#include "collect.hpp"

namespace shmps::server {

using namespace shmps::shm;

namespace {

// Reads one ring for step `step`: takes the runs of pushes that end in that step (or an earlier one),
// discards runs whose writer died, and says whether the ring shows the worker finished it.
class StepScan {
 public:
  StepScan(Segment& segment, const RingConsumer& ring, std::uint32_t rank, std::uint64_t step, RoundPlan& plan)
      : segment_(segment), ring_(ring), rank_(rank), step_(step), round_(plan.ranks[rank]),
        contributions_(plan.contributions), row_refs_(plan.row_refs), plan_puts_(plan.puts) {}

  bool run() {
    const WorkerSlot& slot = segment_.slot(rank_);
    // The worker stores its clock after committing the clock record that ends the step, so a
    // clock read before the tail guarantees that record is inside [head, tail) or was consumed
    // earlier (in ASP or SSP, before a switch to BSP).
    const std::uint64_t worker_clock = load_acquire(slot.clock);
    const std::uint64_t tail = ring_.committed();
    evicted_ = load_acquire(slot.evicted_generation);
    consumed_ = free_to_ = ring_.head();
    run_begin_ = contributions_.size();
    const auto read = ring_.read(consumed_, tail, [this](std::uint64_t pos, const PushRecord& rec) { return take(pos, rec); });
    std::uint64_t pos = read.stopped_at;
    if (read.malformed) {
      log_bad_record(segment_, rank_, pos);
      drop_run(tail);
      pos = tail;
    }
    if (run_records_ != 0) {
      // An open run: its clock record may still come, unless its generation is dead.
      const bool writer_dead = load_acquire(slot.dead_generation) == run_generation_ ||
                               load_acquire(slot.generation) != run_generation_ || evicted(run_generation_);
      if (writer_dead && pos == tail)
        drop_run(tail);
      else
        contributions_.resize(run_begin_);
    }
    round_.end = std::max(consumed_, free_to_);
    round_.free_to = free_to_;
    // The worker's clock says its step's records are all in [head, tail) only if the walk read
    // them: not if it stopped at or after a put.
    return finished_ || (worker_clock > step_ && !stopped_by_put_);
  }

 private:
  // One record; false stops the walk (a record of a later step: this one is finished).
  bool take(std::uint64_t pos, const PushRecord& rec) {
    const std::uint64_t next = pos + rec.record_bytes;
    // Padding in front of everything else carries nothing: give it back even if the step is not
    // complete (a ring that starts over puts one in front of a step, RingProducer).
    if (rec.kind == RecordKind::padding && pos == free_to_) free_to_ = next;
    // A put in front of everything else is taken at once, as padding is given back: its worker
    // put before its step's first push (Worker::put), and other workers may wait for it. It is
    // alone in the round (nothing after it is read: apply_put.hpp relies on that after a
    // restart). One behind records of the step waits until they are taken.
    if (rec.kind == RecordKind::put) {
      // An open run of another generation: its writer died mid-step (as for a push, below).
      // In front, it is garbage given back with the put: the restarted worker puts before it
      // repeats the step.
      if (run_records_ != 0 && rec.generation != run_generation_ && run_pos_ == free_to_) drop_front_run(pos);
      stopped_by_put_ = true;
      if (pos != free_to_ || run_records_ != 0) return false;
      plan_puts_.push_back({rank_, &rec});
      round_.take_put(rec);
      free_to_ = next;
      consumed_ = std::max(consumed_, next);
      return false;
    }
    if (is_gradient(rec.kind)) {
      if (run_records_ != 0 && rec.generation != run_generation_) drop_run(pos);  // its writer died mid-step
      if (run_records_ == 0) {
        run_begin_ = contributions_.size();
        run_pos_ = pos;
      }
      if (add_contributions(segment_, rank_, rec, contributions_, row_refs_)) {
        ++run_records_;
        run_generation_ = rec.generation;
        run_last_seq_ = rec.seq;
      }
    } else if (rec.kind == RecordKind::clock) {
      // A clock record closes only its own generation's pushes.
      if (run_records_ != 0 && rec.generation != run_generation_) drop_run(pos);
      // A straggler evicted from the barrier: its step (open when it was evicted, or ended
      // after) counts for nothing, and its state is not kept. Its worker fails at its next call.
      if (evicted(rec.generation)) {
        if (run_records_ != 0) drop_run(pos);
        consumed_ = next;
        return true;
      }
      if (rec.clock > step_) {  // a later step: the worker has finished this one
        contributions_.resize(run_begin_);  // the open run belongs to that later step
        run_records_ = 0;
        finished_ = true;
        return false;
      }
      round_.records += run_records_;
      round_.last_seq = std::max(round_.last_seq, run_last_seq_);
      run_records_ = 0;
      run_begin_ = contributions_.size();
      consumed_ = next;
      round_.clock = std::max(round_.clock, rec.clock + 1);
      if (rec.offset != 0) round_.step_state = &rec;
      if (rec.clock == step_) finished_ = true;
    }
    return true;
  }

  // Discards the open run, which starts in front of everything else, as padding: kept given
  // back even when the step is not complete (RankRound::take_nothing).
  void drop_front_run(std::uint64_t end) {
    contributions_.resize(run_begin_);
    round_.front_discarded += run_records_;
    round_.front_last_seq = std::max(round_.front_last_seq, run_last_seq_);
    consumed_ = free_to_ = end;
    run_records_ = 0;
  }

  // Discards the open run (its writer died before closing it): the head may pass it.
  void drop_run(std::uint64_t end) {
    contributions_.resize(run_begin_);
    round_.discarded += run_records_;
    round_.last_seq = std::max(round_.last_seq, run_last_seq_);
    consumed_ = end;
    run_records_ = 0;
  }

  Segment& segment_;
  const RingConsumer& ring_;
  const std::uint32_t rank_;
  const std::uint64_t step_;
  RankRound& round_;
  std::vector<Contribution>& contributions_;
  std::vector<RowRef>& row_refs_;  // the rows of rows records (orphans of a dropped run are never read)
  std::vector<PutTake>& plan_puts_;
  std::uint64_t consumed_ = 0;  // the end of the runs taken (counted or discarded)
  std::uint64_t free_to_ = 0;   // the end of the padding in front of the first run
  // The open run: pushes not yet closed by a clock record.
  std::size_t run_begin_ = 0;
  std::uint64_t run_generation_ = 0, run_records_ = 0, run_last_seq_ = 0;
  std::uint64_t run_pos_ = 0;  // where the open run's first push is
  bool finished_ = false;
  bool stopped_by_put_ = false;  // the walk stopped at or just after a put
  std::uint64_t evicted_ = 0;    // the slot's evicted generation (a straggler's), 0: none
  bool evicted(std::uint64_t generation) const noexcept { return evicted_ != 0 && generation == evicted_; }
};

}  // namespace

bool collect_step(Segment& segment, const std::vector<RingConsumer>& rings, std::uint32_t group, std::uint64_t step,
                  RoundPlan& plan) {
  const SegmentHeader& h = segment.header();
  const std::uint32_t first = segment.group_first_rank(group), end = segment.group_end_rank(group);
  const std::size_t contributions_before = plan.contributions.size();
  bool everyone_finished = true, anyone = false;
  for (std::uint32_t r = first; r < end; ++r) {
    // Who counts is read before the ring: a worker that ends its step and leaves between the two
    // looks (it stores its tail, then its clock, then state = left) would otherwise be missed by
    // the scan and then not count, and the step would complete without it. Read first, `left`
    // means the scan sees its clock record; `attached` means it is waited for.
    const bool counts = counts_for_group(h, segment.slot(r));
    const bool finished = StepScan(segment, rings[r], r, step, plan).run();
    if (r + 1 == end) pause_point("collect.after_scan");  // tests: a worker acts between ring and decision
    if (!finished && counts) everyone_finished = false;
    // (or ended the step in this round: a step with no push whose workers left at once)
    anyone = anyone || counts || plan.ranks[r].records != 0 || plan.ranks[r].discarded != 0 || plan.ranks[r].clock > step;
  }
  // A group with nobody in it and nothing of its step in the rings has no step to complete.
  if (!everyone_finished || !anyone) {
    plan.contributions.resize(contributions_before);
    for (std::uint32_t r = first; r < end; ++r) plan.ranks[r].take_nothing();
    return false;
  }
  for (std::uint32_t r = first; r < end; ++r)
    if (plan.ranks[r].step_state != nullptr) keep_resume_state(segment, r, *plan.ranks[r].step_state);
  return true;
}

}  // namespace shmps::server
