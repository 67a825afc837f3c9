// The two views of a WorkerSlot (layout in layout.hpp), iceoryx-style like the ring's
// (ring.hpp): the data stays a plain struct in the segment, and each side gets a class with only
// the writes it may do, so who writes which line is in the types.
//
//   WorkerSlotWorkerView  the worker holding the slot: its identity line, its step clock, the
//                         hand-off to the server (published, last commit, waiting), its statistics.
//   WorkerSlotServerView  the server: progress (applied, progress, records_*, consumed_clock),
//                         membership (dead_generation, admitted_*), the resume blob.
//
// Each view also has the reads its side needs of the other side's lines (acquire loads), and of
// its own (relaxed: it is their only writer). Monitors and other workers read a slot through
// neither: they only read (membership.hpp, tools).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/futex.hpp>
#include <shmps/shm/layout.hpp>
#include <shmps/shm/seqlock.hpp>

namespace shmps::shm {

// ---------------------------------------------------------------------------------------------
// Worker side. Used only by the process holding the slot's lock byte (one writer per line).
class WorkerSlotWorkerView {
 public:
  WorkerSlotWorkerView() = default;
  explicit WorkerSlotWorkerView(WorkerSlot& slot) noexcept : slot_(&slot) {}

  // ---- At attach: what the previous holder and the server left in the slot.
  // The previous holder's last published push, and its step clock.
  std::uint64_t previous_published() const noexcept { return load_acquire(slot_->published); }
  std::uint64_t previous_clock() const noexcept { return load_acquire(slot_->clock); }
  std::uint64_t previous_generation() const noexcept { return load_own(slot_->generation); }
  // The previous holders' newest streamed push (layout.hpp, WorkerSlot::stream_*);
  // first_seq == 0: none.
  struct StreamedPush {
    std::uint64_t first_seq = 0;
    std::uint32_t param = 0;
    std::uint64_t offset = 0, count = 0;
  };
  StreamedPush previous_stream() const noexcept {
    return {load_acquire(slot_->stream_first_seq), load_acquire(slot_->stream_param), load_acquire(slot_->stream_offset),
            load_acquire(slot_->stream_count)};
  }
  // The resume blob the server kept from the newest clock record it consumed (seqlock-guarded
  // copy; retried while the server is writing it).
  std::vector<std::byte> resume_blob() const {
    std::vector<std::byte> copy(kResumeBlobBytes);
    std::uint32_t length = 0;
    std::uint64_t version = 0;
    while (seqlock_try_read(slot_->resume_version, version, [&] {
             length = std::min<std::uint32_t>(load_acquire(slot_->resume_bytes), kResumeBlobBytes);
             std::memcpy(copy.data(), slot_->resume, length);
           }) != SeqlockRead::ok) {
      std::this_thread::yield();
    }
    copy.resize(length);
    return copy;
  }

  // ---- Identity line.
  struct Attach {
    std::uint64_t generation = 0;  // the previous generation + 1
    std::int32_t pid = 0;
    std::uint64_t start_time = 0;  // /proc/<pid>/stat starttime
    std::uint64_t attached_unix_ns = 0;
    std::uint64_t published = 0;   // the push count this generation continues from
    std::uint64_t clock = 0;       // the step it enters at
    std::uint64_t heartbeat_ns = 0;
  };
  // Takes the slot over. `state` = attached is stored last: the server and the other workers
  // read state, then generation, and must find the rest of the lines already this holder's.
  void attach(const Attach& a) noexcept {
    store_release(slot_->generation, a.generation);
    store_release(slot_->pid, a.pid);
    store_release(slot_->start_time, a.start_time);
    store_release(slot_->attached_unix_ns, a.attached_unix_ns);
    store_release(slot_->published, a.published);
    store_release(slot_->clock, a.clock);
    store_own(slot_->waiting, 0U);
    heartbeat(a.heartbeat_ns);
    store_release(slot_->state, static_cast<std::uint32_t>(SlotState::attached));
  }
  // Gives the slot up (the lock byte is released after this).
  void leave() noexcept { store_release(slot_->state, static_cast<std::uint32_t>(SlotState::left)); }

  // ---- Step clock line.
  void set_clock(std::uint64_t clock) noexcept { store_release(slot_->clock, clock); }

  // ---- Hand-off line.
  // A push was committed to the ring: its sequence number, and when. The time goes first: the
  // server reads last_commit_seq, then last_commit_ns, then last_commit_seq again.
  void publish(std::uint64_t seq, std::uint64_t commit_ns) noexcept {
    store_release(slot_->published, seq);
    store_release(slot_->last_commit_ns, commit_ns);
    store_release(slot_->last_commit_seq, seq);
  }
  // A push that streams through the ring begins: stored before its first chunk is committed
  // (that commit's release store publishes them with it).
  void begin_stream(const StreamedPush& p) noexcept {
    store_release(slot_->stream_param, p.param);
    store_release(slot_->stream_offset, p.offset);
    store_release(slot_->stream_count, p.count);
    store_release(slot_->stream_first_seq, p.first_seq);
  }
  // BSP: the first push of the open step (0: none yet). Stored before that push is committed.
  void set_step_first_seq(std::uint64_t seq) noexcept { store_release(slot_->step_first_seq, seq); }
  std::uint64_t previous_step_first_seq() const noexcept { return load_acquire(slot_->step_first_seq); }
  // The clock after the newest clock record the server consumed from this ring.
  std::uint64_t consumed_clock() const noexcept { return load_acquire(slot_->consumed_clock); }
  // Forgets the streamed push (another push is about to take the next sequence number).
  void end_stream() noexcept { store_release(slot_->stream_first_seq, std::uint64_t{0}); }
  // The futex the worker sleeps on (the server bumps it), and the flag it sets while it sleeps
  // (the server wakes it only then). wait_for() in worker.cpp writes the flag.
  const std::atomic<std::uint32_t>& progress_word() const noexcept { return slot_->progress; }
  std::atomic<std::uint32_t>& waiting_flag() noexcept { return slot_->waiting; }

  // ---- Statistics lines (monitors read them).
  void heartbeat(std::uint64_t now_ns) noexcept { store_own(slot_->heartbeat_ns, now_ns); }
  void count_pull(std::uint64_t bytes) noexcept {
    bump_counter(slot_->pulls);
    bump_counter(slot_->pull_bytes, bytes);
  }
  // A view (Worker::view) counts as a pull but moves no bytes.
  void count_view() noexcept { bump_counter(slot_->pulls); }
  void count_push_bytes(std::uint64_t bytes) noexcept { bump_counter(slot_->push_bytes, bytes); }
  void count_rejected_push() noexcept { bump_counter(slot_->pushes_rejected); }
  void add_backpressure_ns(std::uint64_t ns) noexcept { bump_counter(slot_->backpressure_ns, ns); }
  void add_wait_ns(std::uint64_t ns) noexcept { bump_counter(slot_->wait_ns, ns); }
  // Clocks between this worker and the slowest one that counts, at a pull; keeps the largest too.
  void record_staleness(std::uint64_t staleness) noexcept {
    store_own(slot_->last_staleness, staleness);
    if (staleness > load_own(slot_->max_staleness)) store_own(slot_->max_staleness, staleness);
  }

  // ---- Reads of the server's lines.
  std::uint64_t applied() const noexcept { return load_acquire(slot_->applied); }
  std::uint64_t put_refused_seq() const noexcept { return load_acquire(slot_->put_refused_seq); }
  std::uint64_t admitted_generation() const noexcept { return load_acquire(slot_->admitted_generation); }
  std::uint64_t admitted_clock() const noexcept { return load_acquire(slot_->admitted_clock); }

  const WorkerSlot& slot() const noexcept { return *slot_; }

 private:
  WorkerSlot* slot_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Server side. Used only by the server holding the segment (its apply threads never touch slots).
class WorkerSlotServerView {
 public:
  WorkerSlotServerView() = default;
  explicit WorkerSlotServerView(WorkerSlot& slot) noexcept : slot_(&slot) {}

  // ---- Reads of the worker's lines.
  SlotState state() const noexcept { return static_cast<SlotState>(load_acquire(slot_->state)); }
  std::uint64_t generation() const noexcept { return load_acquire(slot_->generation); }
  std::int32_t pid() const noexcept { return load_acquire(slot_->pid); }
  std::uint64_t published() const noexcept { return load_acquire(slot_->published); }
  std::uint64_t clock() const noexcept { return load_acquire(slot_->clock); }
  // The newest committed push and its commit time, or nothing if none was committed yet or the
  // worker was overwriting the pair meanwhile (a sample is then skipped, not wrong).
  struct Commit {
    std::uint64_t seq;
    std::uint64_t ns;
  };
  std::optional<Commit> last_commit() const noexcept {
    const std::uint64_t seq = load_acquire(slot_->last_commit_seq);
    const std::uint64_t ns = load_acquire(slot_->last_commit_ns);
    if (seq == 0 || seq != load_acquire(slot_->last_commit_seq)) return std::nullopt;
    return Commit{seq, ns};
  }

  // ---- Reads of its own lines (it is their only writer).
  std::uint64_t applied() const noexcept { return load_own(slot_->applied); }
  std::uint64_t put_refused_seq() const noexcept { return load_own(slot_->put_refused_seq); }
  std::uint64_t dead_generation() const noexcept { return load_own(slot_->dead_generation); }
  std::uint64_t admitted_generation() const noexcept { return load_own(slot_->admitted_generation); }
  std::uint64_t evicted_generation() const noexcept { return load_own(slot_->evicted_generation); }
  std::uint64_t consumed_clock() const noexcept { return load_own(slot_->consumed_clock); }
  std::uint64_t streamed_step() const noexcept { return load_own(slot_->streamed_step); }

  // ---- Membership line.
  // The holder of `generation` is proven dead (its lock byte is free and the generation unchanged).
  void mark_dead(std::uint64_t generation) noexcept { store_release(slot_->dead_generation, generation); }
  // Admits `generation`, entering at `clock`, and wakes the worker waiting for it. The clock is
  // stored first: a worker that sees its generation admitted reads the clock it entered at.
  void admit(std::uint64_t generation, std::uint64_t clock) noexcept {
    store_release(slot_->admitted_clock, clock);
    store_release(slot_->admitted_generation, generation);
    wake_worker();
  }

  // The live holder of `generation` held its group's BSP barrier (or SSP bound) alone for
  // `behind_ms`: it is evicted (a straggler; membership.hpp stops counting it), and woken in case
  // it waits.
  void evict(std::uint64_t generation, std::uint64_t behind_ms) noexcept {
    store_release(slot_->evicted_behind_ms, behind_ms);
    store_release(slot_->evicted_generation, generation);
    wake_worker();
  }

  // ---- Progress line.
  // The clock after the newest clock record consumed from the ring; it only moves forward.
  // Streamed BSP: the round summed pushes of step `step_plus_one - 1` from this ring. Stored
  // before the head moves past them.
  void mark_streamed_step(std::uint64_t step_plus_one) noexcept {
    if (step_plus_one != load_own(slot_->streamed_step)) store_release(slot_->streamed_step, step_plus_one);
  }
  void raise_consumed_clock(std::uint64_t clock) noexcept {
    if (clock > load_own(slot_->consumed_clock)) store_release(slot_->consumed_clock, clock);
  }
  // A round took `records` pushes from the ring and discarded `discarded`, up to push `last_seq`.
  // Counters first: a worker whose wait_applied() returns, or a monitor that sees `applied`, reads
  // counters that include the round. `applied` never moves back.
  void count_round(std::uint64_t records, std::uint64_t discarded, std::uint64_t last_seq) noexcept {
    bump_counter(slot_->records_applied, records);
    bump_counter(slot_->records_discarded, discarded);
    store_release(slot_->applied, std::max(load_own(slot_->applied), last_seq));
  }
  // A put record of this slot refused (Worker::put), before the round releases `applied`.
  void refuse_put(std::uint64_t seq) noexcept {
    if (seq > load_own(slot_->put_refused_seq)) store_release(slot_->put_refused_seq, seq);
  }
  // Whether the slot's worker sleeps on its progress word now.
  bool worker_waiting() const noexcept { return load_acquire(slot_->waiting) != 0; }
  // Bumps the progress futex and wakes the worker if it sleeps on it. The fence pairs with the
  // worker's between setting `waiting` and its last look at its condition (no lost wake-up).
  void wake_worker() noexcept {
    store_release(slot_->progress, load_own(slot_->progress) + 1);
    fence_store_load();
    if (load_acquire(slot_->waiting)) futex_wake_all(slot_->progress);
  }

  // ---- Resume line.
  // Keeps the resume blob of a clock record (its step `clock`) for a restarted worker, under the
  // slot's seqlock. Call before releasing the record's bytes (the worker looks in the ring first).
  void keep_resume(std::span<const std::byte> blob, std::uint64_t clock) noexcept {
    const std::size_t n = std::min(blob.size(), kResumeBlobBytes);
    const std::uint64_t before = seqlock_write_begin(slot_->resume_version);
    if (n != 0) std::memcpy(slot_->resume, blob.data(), n);
    store_release(slot_->resume_bytes, static_cast<std::uint32_t>(n));
    store_release(slot_->resume_clock, clock);
    seqlock_write_end(slot_->resume_version, before, 1);
  }

  // ---- A slot restored from a checkpoint (server/src/checkpoint.cpp).
  // The one time the server writes the worker's lines too: while it creates the segment, before
  // "ready", when no worker can have mapped it. The holder is recorded as gone (dead_generation =
  // generation), so it only counts again once a worker takes the slot.
  struct Restored {
    std::uint32_t state = 0;  // SlotState
    std::uint64_t generation = 0;
    std::uint64_t applied = 0;         // also the push count the next holder continues from
    std::uint64_t consumed_clock = 0;  // also its step clock and admitted clock
    std::uint64_t records_applied = 0;
    std::uint64_t records_discarded = 0;
    std::span<const std::byte> resume;
    std::uint64_t resume_clock = 0;
  };
  void restore(const Restored& r) noexcept {
    store_release(slot_->generation, r.generation);
    store_release(slot_->dead_generation, r.generation);
    store_release(slot_->admitted_generation, r.generation);
    store_release(slot_->admitted_clock, r.consumed_clock);
    store_release(slot_->published, r.applied);
    store_release(slot_->applied, r.applied);
    store_release(slot_->clock, r.consumed_clock);
    store_release(slot_->consumed_clock, r.consumed_clock);
    store_release(slot_->records_applied, r.records_applied);
    store_release(slot_->records_discarded, r.records_discarded);
    const std::size_t n = std::min(r.resume.size(), kResumeBlobBytes);
    if (n != 0) std::memcpy(slot_->resume, r.resume.data(), n);  // data() may be null when empty
    store_release(slot_->resume_bytes, static_cast<std::uint32_t>(n));
    store_release(slot_->resume_clock, r.resume_clock);
    store_release(slot_->resume_version, std::uint64_t{2});
    store_release(slot_->state, r.state);
  }

  const WorkerSlot& slot() const noexcept { return *slot_; }

 private:
  WorkerSlot* slot_ = nullptr;
};

}  // namespace shmps::shm
