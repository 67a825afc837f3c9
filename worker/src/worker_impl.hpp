// Internal to the worker library: the state of a Worker (Worker::Impl) and the waits that
// pull(), view() and push() share. Included by the worker library's source files (attach.cpp,
// push.cpp, worker.cpp, view.cpp); not installed.
#pragma once

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/futex.hpp>
#include <shmps/shm/liveness.hpp>
#include <shmps/shm/membership.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/proc.hpp>
#include <shmps/shm/ring.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/shm/worker_slot.hpp>

#include "shmps/worker.hpp"

namespace shmps {

// The worker library's source files use the segment's types unqualified; so does this header.
using namespace shmps::shm;

namespace worker_detail {

using Clock = std::chrono::steady_clock;

// The check set_interrupt_check() installs (worker.cpp), or nullptr.
extern std::atomic<bool (*)()> interrupt_check;
// How often a wait calls it: often enough that Ctrl-C feels immediate, rarely enough to cost
// nothing next to a wait.
inline constexpr std::chrono::milliseconds kInterruptEvery{50};

// Waits with back-off: spin a little (the common wait is microseconds), then sleep on `word`
// (a futex the server bumps) when given, else in short naps. Returns false on timeout; throws
// Interrupted when the interrupt check says so (before it marks this worker as waiting, so
// nothing is left to undo).
template <class Done>
inline bool wait_for(Done&& done, Clock::time_point deadline, const std::atomic<std::uint32_t>* word,
                     std::atomic<std::uint32_t>* waiting_flag) {
  for (int spin = 0; spin < 200; ++spin) {
    if (done()) return true;
    if (spin > 20) std::this_thread::yield();
  }
  auto next_check = Clock::now() + kInterruptEvery;
  while (true) {
    if (done()) return true;
    const auto now = Clock::now();
    if (now >= deadline) return false;
    if (now >= next_check) {
      next_check = now + kInterruptEvery;
      if (auto* check = interrupt_check.load(std::memory_order_acquire); check != nullptr && check())
        throw Interrupted("interrupted while waiting for the server (the process's interrupt check, e.g. Ctrl-C)");
    }
    if (word != nullptr) {
      const std::uint32_t seen = load_acquire(*word);
      store_own(*waiting_flag, 1U);
      fence_store_load();  // pairs with the server's fence between its progress bump and its look at `waiting`
      if (!done()) futex_wait(*word, seen, std::min<Clock::duration>(deadline - now, std::chrono::milliseconds(50)));
      store_own(*waiting_flag, 0U);
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
}

}  // namespace worker_detail

using worker_detail::Clock;
using worker_detail::wait_for;

// Everything a Worker holds. Only the owning process's one thread uses it (worker.hpp).
struct Worker::Impl {
  WorkerOptions options;
  Segment segment;
  LockFile slots_lock;
  int rank = -1;
  WorkerSlotWorkerView slot;  // our slot: only the writes a worker may do (worker_slot.hpp)
  RingProducer ring;
  std::uint64_t generation = 0;
  std::uint64_t published = 0;
  std::uint64_t clock = 0;
  bool pushed_in_step = false;  // pushes since the last clock()
  std::uint64_t step_start = 0;  // ring position where this worker's open step begins
  std::vector<std::byte> staged_state;     // committed with the next clock record
  bool state_staged = false;
  std::vector<std::byte> committed_state;  // the slot's latest committed resume state
  bool admitted = false;                   // the server has admitted this generation (see layout.hpp)
  bool attached = false;
  // Set in a child process after fork(): the slot is the parent's (see "fork()" below).
  bool forked_away = false;
  pid_t owner_pid = 0;
  std::vector<ParamInfo> params;
  std::unordered_map<std::string, std::uint32_t> index;
  // The streamed push an earlier process of this slot died in the middle of (see push()):
  // finished by this worker's first push of the same parameter and range.
  std::optional<UnfinishedPush> unfinished;
  // The slot's stream words describe an unfinished streamed push: any other push clears them
  // first, since they count on the chunks' sequence numbers being the slot's next ones.
  bool stream_words_open = false;
  // Streamed BSP steps: this process continues a step its slot's previous process died in, part
  // of whose pushes are already in the server's step sums. Its first `step_skip` pushes (records:
  // a streamed push counts one per chunk) are the ones the predecessor committed: they are not
  // sent again, and take the sequence numbers from `skipped_seq` on.
  std::uint64_t step_skip = 0;
  std::uint64_t skipped_seq = 0;
  bool step_first_written = false;  // the slot's step_first_seq already names this step's first push

  // The push record claimed in the ring and not committed yet (so invisible to the server):
  // by push() while it copies, or lent to a PushBuffer by borrow_push() until it commits or
  // drops it. record == nullptr: none.
  struct Claim {
    PushRecord* record = nullptr;
    std::uint32_t param = 0;
    std::uint64_t offset = 0;
    std::uint64_t count = 0;
    std::uint64_t rows = 0;  // a rows record (push_rows): its rows; offset is then rows too
  };
  Claim claim;
  PushBuffer* borrower = nullptr;  // the PushBuffer that holds `claim`, if it is lent out

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  // A PushBuffer that outlives its Worker is left empty, not pointing into an unmapped ring.
  ~Impl();
  // Throws the error for a Worker that cannot act any more: it left, or it is a forked copy.
  void refuse_if_detached(const char* to) const;
  // Throws the error for a worker the server evicted from its BSP barrier or SSP bound as a straggler
  // (WorkerSlot::evicted_generation): it may do nothing more; a restart of its rank rejoins.
  void refuse_if_evicted(const char* to) const;
  // fork() safety (see below): the Impls of this process that hold a slot.
  static std::vector<Impl*>& holding_slots();
  static void register_for_fork(Impl* impl);
  static void forget_all_in_forked_child();

  // The three steps of every push, shared by push() (claim, copy, commit) and borrow_push() /
  // PushBuffer::commit() (claim, lend, check in place, commit). `what` starts error messages.
  // `rows` != 0: a rows record of that many rows (push_rows; count = rows x dim) instead of a range.
  float* claim_push(const char* what, std::string_view name, std::size_t offset, std::size_t count, bool put = false,
                    std::size_t rows = 0);
  std::uint64_t commit_push(double sum_sq, RecordKind kind = RecordKind::push);
  // Tables (rows.cpp): throws unless parameter i is a table (for_rows) or is not (a dense call).
  void refuse_kind(const char* what, std::uint32_t i, bool for_rows) const;
  // The checks and the wait of a view of parameter i's [offset, offset + count) (view.cpp).
  void view_range(std::string_view name, std::uint32_t i, std::size_t offset, std::size_t count);
  // Throws (and counts nothing) unless every id is below the table's rows.
  void check_ids(const char* what, std::uint32_t i, std::span<const std::uint64_t> ids) const;
  // push(name, grad) of the whole parameter: a dense one, and grad of its size (push.cpp).
  void check_whole_push(std::string_view name, std::size_t size) const;
  // Worker::pull_rows, into floats or (a bf16 / fp16 table) its stored 2-byte values (rows.cpp).
  template <class T>
  std::uint64_t pull_rows(std::string_view name, std::span<const std::uint64_t> ids, std::span<T> out);
  // The two halves of committing the claimed record (push.cpp): its header, then the release.
  std::uint64_t fill_claimed(RecordKind kind, double sum_sq);
  void publish_claimed(std::uint64_t seq, const char* point);  // point: its kill point
  // Publishes the claimed record as a put (Worker::put; put.cpp).
  std::uint64_t commit_put();
  // Init "put": waits (bounded) until every slice of the range has been put (version >= 1).
  void wait_for_put(const char* what, std::uint32_t param, std::uint64_t offset, std::uint64_t count);
  // Init "put": a push to a slice not yet put would be applied to zeros; refuses it.
  void refuse_push_before_put(const char* what, std::uint32_t param, std::uint64_t offset, std::uint64_t count) const;
  // A push bigger than one ring record, streamed through the ring in chunks (push()).
  std::uint64_t push_streamed(std::uint32_t param, std::size_t offset, std::span<const float> grad);
  // The elements per chunk of a streamed push: whole slices, as many as one record holds.
  std::uint64_t chunk_floats() const noexcept {
    const std::uint64_t record = ring.max_record_floats(), slice = segment.header().slice_floats;
    return record >= slice ? record / slice * slice : record;
  }
  // Where the chunk that starts at element `begin` of a push ending at `end` ends: chunks end
  // on multiples of chunk_floats() within the parameter, so that they cover whole slices.
  std::uint64_t chunk_end(std::uint64_t begin, std::uint64_t end) const noexcept {
    const std::uint64_t c = chunk_floats();
    return std::min(end, (begin / c + 1) * c);
  }
  [[noreturn]] void reject_push(const char* what, std::size_t bad, float value);
  // Counts a push refused for the non-finite `value` of parameter `param` at `element`, and throws.
  [[noreturn]] void refuse_non_finite(const char* what, std::uint32_t param, std::uint64_t element, float value);
  // Forgets the claim: its bytes past the ring's tail stay invisible and are reused.
  void give_back() noexcept {
    claim = {};
    borrower = nullptr;
    ring.abandon();
  }
  void forget_borrower() noexcept {
    if (borrower == nullptr) return;
    borrower->detach();
    give_back();
  }
  // Throws if a PushBuffer is outstanding: `doing` starts the message, `consequence` ends it.
  void refuse_if_borrowed(std::string_view doing, std::string_view consequence) const {
    if (borrower == nullptr) return;
    throw Error(std::string(doing) + ": a borrowed push buffer (for '" + params[claim.param].name + "' elements [" +
                std::to_string(claim.offset) + ", " + std::to_string(claim.offset + claim.count) +
                ")) is outstanding on this worker, which lends one at a time: commit() it or drop it first; " +
                std::string(consequence));
  }

  // In BSP, waits (bounded) until the server admits this generation, and enters at its clock.
  void await_admission() {
    if (admitted) return;
    const SegmentHeader& h = segment.header();
    auto done = [&] { return slot.admitted_generation() == generation; };
    if (!done() && load_acquire(h.consistency) != static_cast<std::uint32_t>(Consistency::bsp)) return;
    if (!wait_for(done, deadline(), &slot.progress_word(), &slot.waiting_flag()))
      throw Error("worker " + std::to_string(rank) + " was not admitted to the BSP group within " +
                  std::to_string(options.timeout.count()) + " ms; " + server_state());
    admitted = true;
    if (pushed_in_step) return;  // admitted after it had started a step: keep its clock
    clock = std::max(clock, slot.admitted_clock());
    slot.set_clock(clock);
  }
  std::uint32_t find(std::string_view name) const {
    auto it = index.find(std::string(name));
    if (it == index.end()) {
      std::string known;
      for (const auto& p : params) known += (known.empty() ? "" : ", ") + p.name;
      throw Error("unknown parameter '" + std::string(name) + "' in segment '" + segment.name() + "': it has " + known);
    }
    return it->second;
  }

  // A range of a dense parameter; with tables_too (put), of a table's row-major elements too.
  void check_range(const char* what, std::uint32_t i, std::size_t offset, std::size_t count,
                   bool tables_too = false) const {
    const ParamEntry& p = segment.param(i);
    if (!tables_too) refuse_kind(what, i, false);
    if (count == 0)
      throw Error(std::string(what) + " '" + params[i].name + "': the range is empty (0 elements); nothing to do");
    if (offset > p.size || count > p.size - offset)
      throw Error(std::string(what) + " '" + params[i].name + "': elements [" + std::to_string(offset) + ", " +
                  std::to_string(offset + count) + ") are outside the parameter, which has " + std::to_string(p.size) +
                  " elements " + shape_string(p));
  }

  void heartbeat() { slot.heartbeat(monotonic_ns()); }

  Clock::time_point deadline() const { return Clock::now() + options.timeout; }

  bool counts(std::uint32_t r) const { return counts_for_group(segment.header(), segment.slot(r)); }
  // This worker's group (SegmentHeader::workers_per_group): BSP and SSP hold inside it.
  std::uint32_t group() const { return segment.group_of(static_cast<std::uint32_t>(rank)); }
  // BSP: the step this worker's group is collecting.
  std::uint64_t group_clock() const { return shm::group_clock(segment, group()); }
  // The smallest clock among the workers of this worker's group that count (ourselves included),
  // or our own clock.
  std::uint64_t slowest_clock() const {
    std::uint64_t slowest = clock;
    const std::uint32_t g = group();
    for (std::uint32_t r = segment.group_first_rank(g); r < segment.group_end_rank(g); ++r)
      if (static_cast<int>(r) != rank && counts(r)) slowest = std::min(slowest, load_acquire(segment.slot(r).clock));
    return slowest;
  }
  // Maps the values and the optimizer state read-only in this process (view.cpp).
  void protect_values();
  // Waits until this worker may read the values its clock needs (see Worker::pull), and records
  // the staleness it saw. `what` ("pull of", "view of") starts the timeout's message.
  void wait_for_consistency(const char* what, std::string_view name);
  // Get by version: waits (bounded) until every slice of elements [offset, offset + count) of
  // parameter `param` has had at least `min_version` updates. The server wakes waiting workers
  // after every round that applied anything (publish.cpp).
  void wait_for_version(const char* what, std::uint32_t param, std::uint64_t offset, std::uint64_t count,
                        std::uint64_t min_version,
                        const char* hint = "ask for a version the job reaches (pull() returns the version it copied)");
  // Writes a clock record (end of step `clock`) and moves to clock + 1.
  void end_step();
  void wake_server() const {
    fence_store_load();  // our commit must be visible before we look at server_sleeping
    const SegmentHeader& h = segment.header();
    if (load_acquire(h.server_sleeping)) futex_wake_all(h.server_wake);
  }

  // Why this worker's BSP barrier waits for worker r (of its group, counting, not past step
  // `step`): "worker 2 (pid 1234), alive but 12.0 s behind in step 7; the server evicts
  // stragglers after 10 s (straggler_timeout)", or dead and waited for (on_worker_death = wait).
  std::string describe_behind(std::uint32_t r, std::uint64_t step) const {
    const WorkerSlot& s = segment.slot(r);
    const SegmentHeader& h = segment.header();
    std::string text = "worker " + std::to_string(r) + " (pid " + std::to_string(load_acquire(s.pid)) + ")";
    if (load_acquire(s.dead_generation) == load_acquire(s.generation))
      return text + ", dead in step " + std::to_string(step) +
             "; on_worker_death = wait keeps the barrier until a process takes rank " + std::to_string(r) + " again";
    const std::uint64_t now = monotonic_ns();
    const std::uint64_t since = load_acquire(segment.group(segment.group_of(r)).straggler_since_ns);
    const std::uint64_t heard = load_acquire(s.heartbeat_ns);
    const auto secs = [](std::uint64_t ns) {
      const std::uint64_t tenths = ns / 100'000'000ULL;
      return std::to_string(tenths / 10) + "." + std::to_string(tenths % 10) + " s";
    };
    text += since != 0 && now > since ? ", alive but " + secs(now - since) + " behind in step " + std::to_string(step)
                                      : ", alive, in step " + std::to_string(step);
    if (heard != 0 && now > heard) text += " (last heard from " + secs(now - heard) + " ago)";
    const std::uint32_t timeout_ms = load_acquire(h.straggler_timeout_ms);
    text += timeout_ms == 0 ? "; straggler_timeout is off: the server waits for it"
                            : "; the server evicts stragglers after " + secs(std::uint64_t{timeout_ms} * 1'000'000ULL) +
                                  " (straggler_timeout)";
    return text;
  }

  // The end of a timeout's message when the barrier waits for named workers.
  std::string waiting_server_state() const {
    LockFile probe = LockFile::open_for_probe(server_lock_path(segment.name()));
    return probe.probe(0) == Holder::alive ? "the server is alive and waits for them"
                                           : "no server is running for it (start shmps-server again)";
  }

  std::string server_state() const {
    LockFile probe = LockFile::open_for_probe(server_lock_path(segment.name()));
    return probe.probe(0) == Holder::alive ? "the server is alive but busy"
                                           : "no server is running for it (start shmps-server again)";
  }
};

}  // namespace shmps
