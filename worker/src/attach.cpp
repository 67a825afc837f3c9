// Worker life (ARCHITECTURE.md "Worker life"): attaching to a job's segment (the constructor
// claims a slot and proves it is alive with a byte lock), leaving it, and what fork() does to an
// attached Worker.
#include "shmps/worker.hpp"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>

#include "worker_impl.hpp"

namespace shmps {

using namespace shmps::shm;

namespace {

std::string env_or(const char* name, std::string fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : std::move(fallback);
}

}  // namespace

// fork(): a worker slot belongs to the process that attached it. A child forked after that (a
// PyTorch DataLoader's workers, multiprocessing) inherits the Worker object, the mapping and the
// descriptor of the slot's liveness lock. Left alone, the child's copy would do harm twice: its
// destructor's leave() would mark the parent's slot as left and release the parent's lock (an
// OFD lock belongs to the shared open file description), and the child's descriptor would keep
// the lock held after the parent died, so the server would never see that death. So in the child
// every Worker forgets its lock descriptor and refuses to act; its destructor touches nothing.
namespace {
std::mutex& fork_mutex() {
  static auto* mutex = new std::mutex;  // never destroyed: a process may fork while exiting
  return *mutex;
}
}  // namespace

std::vector<Worker::Impl*>& Worker::Impl::holding_slots() {
  static auto* impls = new std::vector<Impl*>;  // guarded by fork_mutex()
  return *impls;
}

void Worker::Impl::forget_all_in_forked_child() {
  for (Impl* impl : holding_slots()) {
    impl->forked_away = true;
    impl->attached = false;
    impl->slots_lock.forget_after_fork();
  }
  holding_slots().clear();
  fork_mutex().unlock();  // locked by the prepare handler, in the thread that forked: this one
}

void Worker::Impl::register_for_fork(Impl* impl) {
  static std::once_flag installed;
  std::call_once(installed, [] {
    pthread_atfork([] { fork_mutex().lock(); }, [] { fork_mutex().unlock(); }, &Impl::forget_all_in_forked_child);
  });
  std::lock_guard lock(fork_mutex());
  holding_slots().push_back(impl);
}

Worker::Impl::~Impl() {
  forget_borrower();
  std::lock_guard lock(fork_mutex());
  std::erase(holding_slots(), this);
}

void Worker::Impl::refuse_if_detached(const char* to) const {
  if (forked_away)
    throw Error("this Worker was attached by process " + std::to_string(owner_pid) + ", and this is process " +
                std::to_string(::getpid()) + ", forked from it: a worker slot belongs to one process. Create a "
                "new Worker in the child (with another rank) if it must " + to + "; nothing was changed");
  if (!attached) throw Error(std::string("this worker has left the job; create a new Worker to ") + to);
  refuse_if_evicted(to);
}

void Worker::Impl::refuse_if_evicted(const char* to) const {
  const WorkerSlot& s = segment.slot(static_cast<std::uint32_t>(rank));
  if (load_acquire(s.evicted_generation) != generation) return;
  const std::uint64_t behind_ms = load_acquire(s.evicted_behind_ms);
  const std::string after = std::to_string(behind_ms / 1000) + "." + std::to_string(behind_ms % 1000 / 100) +
                            " s (straggler_timeout " +
                            std::to_string(load_acquire(segment.header().straggler_timeout_ms)) + " ms)";
  if (static_cast<Consistency>(load_acquire(segment.header().consistency)) == Consistency::ssp)
    throw Error("worker " + std::to_string(rank) + " (pid " + std::to_string(::getpid()) +
                ") was evicted as a straggler holding the SSP bound at clock " + std::to_string(clock) + " after " +
                after + ": the other workers went on without it; the pushes it committed before were applied, "
                "anything it commits now is discarded, so it cannot " + to + "; restart it (it rejoins with its rank)");
  throw Error("worker " + std::to_string(rank) + " (pid " + std::to_string(::getpid()) +
              ") was evicted from the BSP barrier as a straggler after " + after +
              ": the other workers went on without it and its open step (clock " + std::to_string(clock) +
              ") was discarded, so it cannot " + to + "; restart it (it rejoins with its rank)");
}

Worker::Worker(WorkerOptions options) : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.options = std::move(options);
  if (s.options.segment.empty()) s.options.segment = env_or("SHMPS_SEGMENT", "");
  if (s.options.segment.empty())
    throw Error("no segment given: set WorkerOptions::segment, or SHMPS_SEGMENT in the environment (shmps-launch does)");
  if (s.options.rank < 0) {
    const std::string r = env_or("SHMPS_RANK", "");
    if (!r.empty()) {
      char* end = nullptr;
      const long v = std::strtol(r.c_str(), &end, 10);
      if (*end != '\0' || v < 0 || v > 1'000'000) throw Error("SHMPS_RANK='" + r + "' is not a rank (a number >= 0)");
      s.options.rank = static_cast<int>(v);
    }
  }

  s.segment = Segment::open(s.options.segment, Access::read_write);
  // A server may still be creating the segment: wait for "ready", with a bound.
  const auto ready = [&] {
    return load_acquire(s.segment.header().state) != static_cast<std::uint32_t>(SegmentState::creating);
  };
  if (!wait_for(ready, s.deadline(), nullptr, nullptr))
    throw Error("segment '" + s.options.segment + "' is still being created after " +
                std::to_string(s.options.timeout.count()) + " ms: is its server stuck? (shmps-ctl inspect " +
                s.options.segment + ")");
  s.segment.validate();
  const SegmentHeader& h = s.segment.header();

  // Take a slot: its lock byte proves the previous holder, if any, is dead.
  s.slots_lock = LockFile::open(slots_lock_path(s.options.segment), false);
  if (s.options.rank >= 0) {
    if (static_cast<std::uint32_t>(s.options.rank) >= h.max_workers)
      throw Error("rank " + std::to_string(s.options.rank) + " is out of range: segment '" + s.options.segment + "' has " +
                  std::to_string(h.max_workers) + " worker slots (ranks 0 to " + std::to_string(h.max_workers - 1) +
                  "); raise max_workers in the model spec for more");
    if (!s.slots_lock.try_lock(static_cast<unsigned>(s.options.rank)))
      throw Error("worker slot " + std::to_string(s.options.rank) + " of segment '" + s.options.segment +
                  "' is held by a live process (pid " +
                  std::to_string(load_acquire(s.segment.slot(static_cast<unsigned>(s.options.rank)).pid)) +
                  "): choose another rank, or rank -1 for any free slot");
    s.rank = s.options.rank;
  } else {
    for (std::uint32_t r = 0; r < h.max_workers && s.rank < 0; ++r)
      if (s.slots_lock.try_lock(r)) s.rank = static_cast<int>(r);
    if (s.rank < 0)
      throw Error("all " + std::to_string(h.max_workers) + " worker slots of segment '" + s.options.segment +
                  "' are held by live processes: raise max_workers in the model spec, or stop a worker");
  }

  // Our ring: reserved by us, its writer, so that its pages are allocated by this process (first
  // touch: on our NUMA node, in our memory cgroup; the server leaves them unallocated), and
  // mapped for writing now, so that the first pushes pay no page faults. A full /dev/shm is an
  // error here, before the slot changes, never a SIGBUS in a push. Then the tables and the values
  // are mapped for reading, so that the first pulls pay none either.
  {
    const ByteRange ring = s.segment.ring_range(static_cast<unsigned>(s.rank));
    s.segment.reserve(ring.offset, ring.bytes, "the push ring of worker " + std::to_string(s.rank));
    s.segment.prefault_read(0, h.rings_offset);
    s.segment.prefault_read(h.values_offset, h.state_offset - h.values_offset);
    s.protect_values();  // read-only from here on in this process (view.cpp says why)
  }

  // Take over the slot: a new generation, resuming the push count of all earlier generations.
  WorkerSlotWorkerView slot(s.segment.slot(static_cast<unsigned>(s.rank)));
  s.slot = slot;
  s.ring = RingProducer(&s.segment.ring(static_cast<unsigned>(s.rank)), s.segment.ring_data(static_cast<unsigned>(s.rank)));
  s.step_start = s.ring.tail();
  // The last holder may have died between committing a record and storing `published`: the ring
  // still holds that record (the server has not consumed it), so take the larger sequence number.
  // The same for the resume state: the newest clock record that carried one is either still in
  // the ring, or the server consumed it and copied its state into the slot (before it moved the
  // head past it, so reading the head first, with an acquire load, makes the two look-ups cover
  // every case).
  std::uint64_t published = std::max(slot.previous_published(), slot.applied());
  std::uint64_t closed_clock = 0;  // after the newest clock record still in the ring
  {
    // The server's view of our ring, used read-only: the one walk over its records (ring.hpp).
    const RingConsumer view(&s.segment.ring(static_cast<unsigned>(s.rank)),
                            s.segment.ring_data(static_cast<unsigned>(s.rank)));
    const PushRecord* newest_state = nullptr;
    const std::uint64_t head = view.head_acquire();
    view.read(head, view.committed(), [&](std::uint64_t, const PushRecord& record) {
      if (is_gradient(record.kind) || record.kind == RecordKind::put) published = std::max(published, record.seq);
      if (record.kind == RecordKind::clock && record.offset != 0) newest_state = &record;
      if (record.kind == RecordKind::clock) closed_clock = std::max(closed_clock, record.clock + 1);
      return true;  // a malformed record ends the walk: nothing after it can be trusted
    });
    if (newest_state != nullptr) {
      const auto* bytes = reinterpret_cast<const std::byte*>(record_payload(newest_state));
      s.committed_state.assign(bytes, bytes + newest_state->offset);
    } else {
      s.committed_state = slot.resume_blob();
    }
  }
  s.published = published;
  // A streamed push the last holder died in: how far its chunks got (their sequence numbers are
  // consecutive from stream_first_seq, and `published` is the newest committed one).
  if (const auto stream = slot.previous_stream(); stream.first_seq != 0 && published >= stream.first_seq &&
                                                  stream.param < h.param_count &&
                                                  stream.offset + stream.count <= s.segment.param(stream.param).size) {
    std::uint64_t done = stream.offset;
    for (std::uint64_t k = published - stream.first_seq + 1; k > 0 && done < stream.offset + stream.count; --k)
      done = s.chunk_end(done, stream.offset + stream.count);
    if (done < stream.offset + stream.count)
      s.unfinished = UnfinishedPush{std::string(param_name(s.segment.param(stream.param))), stream.offset, stream.count,
                                    done - stream.offset};
    s.stream_words_open = s.unfinished.has_value();
  }
  // Enter at our worker group's current clock: its BSP step in progress, or its slowest live
  // worker's clock (so nobody waits for us); never below the clock this slot had reached.
  {
    const SegmentHeader& hdr = s.segment.header();
    s.clock = slot.previous_clock();
    if (load_acquire(hdr.consistency) == static_cast<std::uint32_t>(Consistency::bsp) && s.segment.streams_bsp_steps()) {
      // Streamed steps: the step the last holder was in, unless it ended it (its clock record is
      // in the ring or was consumed: it may have died before storing its new clock).
      const std::uint64_t open_step = s.clock;
      s.clock = std::max({s.clock, closed_clock, slot.consumed_clock(), s.group_clock()});
      // Still that step, and part of it committed: those pushes are in the sums or on their way,
      // so this process skips them when it repeats the step (commit_push).
      const std::uint64_t first = slot.previous_step_first_seq();
      if (s.clock == open_step && first != 0 && first <= published) {
        s.step_skip = published - first + 1;
        s.skipped_seq = first;
        s.step_first_written = true;
        s.unfinished.reset();  // the step skip covers a streamed push cut short too
        s.stream_words_open = true;
      }
    } else if (load_acquire(hdr.consistency) == static_cast<std::uint32_t>(Consistency::bsp)) {
      s.clock = std::max(s.clock, s.group_clock());
    } else {
      std::uint64_t slowest = UINT64_MAX;
      const std::uint32_t g = s.group();
      for (std::uint32_t r = s.segment.group_first_rank(g); r < s.segment.group_end_rank(g); ++r)
        if (static_cast<int>(r) != s.rank && s.counts(r)) slowest = std::min(slowest, load_acquire(s.segment.slot(r).clock));
      if (slowest != UINT64_MAX) s.clock = std::max(s.clock, slowest);
    }
  }
  s.generation = slot.previous_generation() + 1;
  slot.attach({.generation = s.generation,
               .pid = static_cast<std::int32_t>(::getpid()),
               .start_time = process_start_time(::getpid()),
               .attached_unix_ns = unix_ns(),
               .published = published,
               .clock = s.clock,
               .heartbeat_ns = monotonic_ns()});
  s.attached = true;
  s.owner_pid = ::getpid();
  Impl::register_for_fork(&s);

  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const ParamEntry& p = s.segment.param(i);
    ParamInfo info;
    info.name = std::string(param_name(p));
    for (std::uint32_t d = 0; d < p.ndim; ++d) info.shape.push_back(p.shape[d]);
    info.size = p.size;
    info.dtype = static_cast<ValueDType>(p.dtype);  // the same numbering (static_assert in view.cpp)
    info.init_put = p.init_put != 0;
    if (p.table_dim != 0) {
      info.rows = p.shape[0];
      info.dim = p.table_dim;
      info.keyed = is_keyed(p);
    }
    s.index.emplace(info.name, i);
    s.params.push_back(std::move(info));
  }
}

Worker::~Worker() {
  if (!impl_) return;
  impl_->forget_borrower();  // an outstanding PushBuffer is abandoned: nothing is published
  leave();
}
Worker::Worker(Worker&&) noexcept = default;
Worker& Worker::operator=(Worker&&) noexcept = default;

void Worker::leave() {
  Impl& s = *impl_;
  if (!s.attached) return;
  s.refuse_if_borrowed("leave()", "the worker is still attached");
  if (load_acquire(s.segment.slot(static_cast<std::uint32_t>(s.rank)).evicted_generation) == s.generation) {
    // Evicted as a straggler: its open step counts for nothing, and the slot stays marked
    // evicted (the tools show it) until a new process takes the rank. Only the lock is let go.
    s.slots_lock.unlock(static_cast<unsigned>(s.rank));
    s.slots_lock = LockFile();
    s.attached = false;
    return;
  }
  if (s.pushed_in_step || s.state_staged) {
    try {
      s.end_step();  // a finished worker's last pushes and state count (BSP counts a step only once ended)
    } catch (const Error&) {
      // The ring stayed full (no server): the pushes of this open step stay uncounted in BSP.
    }
  }
  s.slot.leave();
  s.slots_lock.unlock(static_cast<unsigned>(s.rank));
  s.slots_lock = LockFile();
  s.attached = false;
}

}  // namespace shmps
