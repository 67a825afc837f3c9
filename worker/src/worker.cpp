// The worker side of the protocols (ARCHITECTURE.md "Pull", "Push", "Worker life").
//
// Everything here runs in the worker process and writes only the worker's own slot lines and
// its own ring. It takes no lock anyone else waits for: the one lock it holds (its byte of
// <name>.slots.lock) only proves it is alive.
#include "shmps/worker.hpp"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#if defined(__SSE__)
#include <immintrin.h>
#endif
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/futex.hpp>
#include <shmps/shm/killpoint.hpp>
#include <shmps/shm/liveness.hpp>
#include <shmps/shm/membership.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/proc.hpp>
#include <shmps/shm/reader.hpp>
#include <shmps/shm/ring.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/shm/worker_slot.hpp>

#include "worker_impl.hpp"

namespace shmps {

using namespace shmps::shm;

namespace {

std::string env_or(const char* name, std::string fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : std::move(fallback);
}

// Copies `n` gradient values into ring memory (unless kStore is Store::none), and in the same
// pass checks that they are all finite and sums their squares (for clipping by norm on the
// server). Returns the index of the first non-finite value, or n.
//
// Why vectors by hand: a single running float sum is a chain of dependent adds, which held a
// push to a fifth of memcpy's speed; the compiler may not reorder float adds on its own. Two
// 16-float accumulators (GCC vector extensions: native registers on AVX-512, split on smaller
// ones) keep the copy at memory speed. The order of the adds is fixed by the code, so the sum is
// the same on every run.
//
// Why streaming stores for big records: a normal store first reads the destination line into
// the cache (read for ownership), so a copy moves three bytes per byte; a streaming store writes
// the line whole. For a record bigger than kStreamingBytes, which cannot stay in a core's cache
// until the server reads it anyway, that measured 17 GB/s against 6-10 GB/s for cached stores
// and for glibc's memcpy on the 64 MiB push of shmps-bench. Small records keep cached stores:
// the server reads them from the cache moments later (latency).
using Floats16 = float __attribute__((vector_size(64)));
enum class Store { none, cached, streaming };
constexpr std::size_t kStreamingBytes = std::size_t{1} << 20;

inline Floats16 load16(const float* p) noexcept {
  Floats16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <Store kStore>
inline void store16(float* dst, const Floats16& v) noexcept {
  if constexpr (kStore == Store::cached) {
    std::memcpy(dst, &v, sizeof v);
  } else if constexpr (kStore == Store::streaming) {  // dst is 64-byte aligned (ring records are)
#if defined(__AVX512F__)
    _mm512_stream_ps(dst, reinterpret_cast<const __m512&>(v));
#elif defined(__AVX__)
    _mm256_stream_ps(dst, reinterpret_cast<const __m256*>(&v)[0]);
    _mm256_stream_ps(dst + 8, reinterpret_cast<const __m256*>(&v)[1]);
#elif defined(__SSE__)
    for (int q = 0; q < 4; ++q) _mm_stream_ps(dst + 4 * q, reinterpret_cast<const __m128*>(&v)[q]);
#else
    std::memcpy(dst, &v, sizeof v);
#endif
  }
}

template <Store kStore>
std::size_t scan_gradient(float* __restrict dst, const float* __restrict src, std::size_t n, double& sum_sq) {
  constexpr std::size_t kBlock = 1024;  // floats per block: the sums go into a double per block
  double total = 0.0;
  for (std::size_t b = 0; b < n; b += kBlock) {
    const std::size_t e = std::min(n, b + kBlock);
    Floats16 sq0{}, sq1{}, probe0{}, probe1{};  // x * 0 is NaN exactly when x is NaN or Inf
    std::size_t i = b;
    for (; i + 32 <= e; i += 32) {
      const Floats16 x0 = load16(src + i), x1 = load16(src + i + 16);
      store16<kStore>(dst + i, x0);
      store16<kStore>(dst + i + 16, x1);
      sq0 += x0 * x0;
      sq1 += x1 * x1;
      probe0 += x0 * 0.0f;
      probe1 += x1 * 0.0f;
    }
    float block_sq = 0.0f, probe = 0.0f;
    for (; i < e; ++i) {
      const float x = src[i];
      if constexpr (kStore != Store::none) dst[i] = x;
      block_sq += x * x;
      probe += x * 0.0f;
    }
    const Floats16 sq = sq0 + sq1, pr = probe0 + probe1;
    for (int l = 0; l < 16; ++l) {
      block_sq += sq[l];
      probe += pr[l];
    }
    if (probe != 0.0f) {  // true for NaN too
      for (std::size_t k = b; k < e; ++k)
        if (!std::isfinite(src[k])) return k;
    }
    total += static_cast<double>(block_sq);
  }
#if defined(__SSE__)
  if constexpr (kStore == Store::streaming) _mm_sfence();  // streaming stores are weakly ordered
#endif
  sum_sq = total;
  return n;
}

// Copies a gradient into ring memory, checking it (see scan_gradient).
std::size_t copy_gradient(float* dst, const float* src, std::size_t n, double& sum_sq) {
  if (n * sizeof(float) >= kStreamingBytes) return scan_gradient<Store::streaming>(dst, src, n, sum_sq);
  return scan_gradient<Store::cached>(dst, src, n, sum_sq);
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
      if (record.kind == RecordKind::push) published = std::max(published, record.seq);
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
  // Enter at the job's current clock: BSP's step in progress, or the slowest live worker's clock
  // (so nobody waits for us); never below the clock this slot had reached.
  {
    const SegmentHeader& hdr = s.segment.header();
    s.clock = slot.previous_clock();
    if (load_acquire(hdr.consistency) == static_cast<std::uint32_t>(Consistency::bsp) && s.segment.streams_bsp_steps()) {
      // Streamed steps: the step the last holder was in, unless it ended it (its clock record is
      // in the ring or was consumed: it may have died before storing its new clock).
      const std::uint64_t open_step = s.clock;
      s.clock = std::max({s.clock, closed_clock, slot.consumed_clock(), load_acquire(hdr.model_clock)});
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
      s.clock = std::max(s.clock, load_acquire(hdr.model_clock));
    } else {
      std::uint64_t slowest = UINT64_MAX;
      for (std::uint32_t r = 0; r < hdr.max_workers; ++r)
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

int Worker::rank() const { return impl_->rank; }
const std::string& Worker::segment() const { return impl_->segment.name(); }
const std::vector<ParamInfo>& Worker::params() const { return impl_->params; }
const ParamInfo& Worker::param(std::string_view name) const { return impl_->params[impl_->find(name)]; }
std::uint64_t Worker::published() const { return impl_->published; }

std::string Worker::consistency() const {
  const SegmentHeader& h = impl_->segment.header();
  const auto mode = static_cast<Consistency>(load_acquire(h.consistency));
  if (mode != Consistency::ssp) return std::string(to_string(mode));
  return "ssp:" + std::to_string(load_acquire(h.staleness));
}
std::uint64_t Worker::applied() const { return impl_->slot.applied(); }

std::uint64_t Worker::pull(std::string_view name, std::span<float> out) {
  const std::uint32_t i = impl_->find(name);
  if (out.size() != impl_->params[i].size)
    throw Error("pull of '" + std::string(name) + "': the output has " + std::to_string(out.size()) +
                " elements but the parameter has " + std::to_string(impl_->params[i].size) + " " +
                shape_string(impl_->segment.param(i)) + "; pass a buffer of that size, or pull a range with an offset");
  return pull(name, 0, out);
}

std::uint64_t Worker::pull(std::string_view name, std::size_t offset, std::span<float> out) {
  Impl& s = *impl_;
  s.refuse_if_detached("pull");
  const std::uint32_t i = s.find(name);
  s.check_range("pull of", i, offset, out.size());
  const Segment& seg = s.segment;
  s.wait_for_consistency("pull of", name);
  const SliceReadResult read = read_param(seg, seg.param(i), offset, out, s.options.timeout);
  if (read.stuck_slice)
    throw Error("pull of '" + std::string(name) + "': slice " + std::to_string(*read.stuck_slice) +
                " has been mid-update for " + std::to_string(s.options.timeout.count()) + " ms; " + s.server_state() +
                "; a restarted server repairs it");
  s.slot.count_pull(static_cast<std::uint64_t>(out.size_bytes()));
  s.heartbeat();
  return read.min_version;
}

std::uint64_t Worker::push(std::string_view name, std::span<const float> grad) {
  const std::uint32_t i = impl_->find(name);
  if (grad.size() != impl_->params[i].size)
    throw Error("push to '" + std::string(name) + "': the gradient has " + std::to_string(grad.size()) +
                " elements but the parameter has " + std::to_string(impl_->params[i].size) + " " +
                shape_string(impl_->segment.param(i)) + "; nothing was pushed");
  return push(name, 0, grad);
}

std::uint64_t Worker::push(std::string_view name, std::size_t offset, std::span<const float> grad) {
  Impl& s = *impl_;
  if (grad.size() > s.ring.max_record_floats()) return s.push_streamed(s.find(name), offset, grad);
  float* dst = s.claim_push("push to", name, offset, grad.size());
  double sum_sq = 0.0;
  const std::size_t bad = copy_gradient(dst, grad.data(), grad.size(), sum_sq);
  if (bad != grad.size()) s.reject_push("push to", bad, grad[bad]);
  return s.commit_push(sum_sq);
}

// A push bigger than one record streams through the ring: consecutive records of whole chunks
// (chunk_end), each committed on its own as soon as it is written, so the ring never has to hold
// the whole push, and the server applies each chunk as it comes. What stays whole:
// - the checks: the whole gradient is checked (finite) and its norm summed before the first
//   chunk is written, so a rejected push publishes nothing, and every chunk carries the whole
//   push's squared norm (clipping by norm scales every chunk alike);
// - exactly once: each chunk has its own sequence number;
// - a push cut short by the death of its worker is finished by the slot's next process: the slot
//   keeps the push's parameter, range and first sequence number, so that process's push of the
//   same parameter and range sends only the chunks not yet committed (unfinished_push()).
std::uint64_t Worker::Impl::push_streamed(std::uint32_t i, std::size_t offset, std::span<const float> grad) {
  refuse_if_detached("push");
  if (borrower != nullptr) refuse_if_borrowed("push to '" + params[i].name + "'", "nothing was pushed");
  check_range("push to", i, offset, grad.size());
  double sum_sq = 0.0;
  const std::size_t bad = scan_gradient<Store::none>(nullptr, grad.data(), grad.size(), sum_sq);
  if (bad != grad.size()) {
    slot.count_rejected_push();
    bump_counter(segment.rejected(static_cast<unsigned>(rank), i));
    throw Error("push to '" + params[i].name + "' rejected: element " + std::to_string(offset + bad) + " is " +
                (std::isnan(grad[bad]) ? "NaN" : "infinite") +
                "; nothing was pushed (check the loss and learning rate, or clip gradients before pushing)");
  }
  const std::uint64_t end = offset + grad.size();
  std::uint64_t begin = offset;
  const bool resumes = unfinished && unfinished->name == params[i].name && unfinished->offset == offset &&
                       unfinished->count == grad.size();
  std::uint64_t chunks_done = 0;
  if (resumes)
    for (; begin < offset + unfinished->committed; ++chunks_done) begin = chunk_end(begin, end);
  const std::optional<UnfinishedPush> resumed = resumes ? unfinished : std::nullopt;
  if (resumes) unfinished.reset();
  // The chunks' sequence numbers are consecutive from first_seq (a resumed push counts the
  // chunks its predecessor committed as if this process had sent them).
  slot.begin_stream({.first_seq = published + 1 - chunks_done, .param = i, .offset = offset, .count = grad.size()});
  stream_words_open = false;  // they describe this push now
  std::uint64_t seq = published;
  const std::uint64_t first = begin;
  try {
    while (begin < end) {
      const std::uint64_t stop = chunk_end(begin, end);
      float* dst = claim_push("push to", params[i].name, begin, stop - begin);
      double ignored = 0.0;
      copy_gradient(dst, grad.data() + (begin - offset), stop - begin, ignored);  // checked above
      seq = commit_push(sum_sq);
      begin = stop;
      if (begin < end) kill_point("push.mid_stream");
    }
  } catch (const Error& e) {
    stream_words_open = true;  // the next other push must clear them
    if (begin == offset) throw;  // nothing of it is committed
    if (begin == first) {  // a resumed push that got no further
      unfinished = resumed;
      throw;
    }
    // Cut short (the server gone for the whole timeout): what was committed stays committed.
    unfinished = UnfinishedPush{params[i].name, offset, grad.size(), begin - offset};
    throw Error(std::string(e.what()) + " (this push streams through the ring in chunks: elements [" +
                std::to_string(offset) + ", " + std::to_string(begin) +
                ") were committed; push the same gradient again to send only the rest, see unfinished_push())");
  }
  return seq;
}

std::optional<UnfinishedPush> Worker::unfinished_push() const { return impl_->unfinished; }

PushBuffer Worker::borrow_push(std::string_view name) {
  return borrow_push(name, 0, impl_->params[impl_->find(name)].size);
}

PushBuffer Worker::borrow_push(std::string_view name, std::size_t offset, std::size_t count) {
  Impl& s = *impl_;
  float* data = s.claim_push("borrowed push to", name, offset, count);
  return PushBuffer(&s, data, count, offset);
}

// Checks the range, waits for room as the consistency model allows, and claims a record.
float* Worker::Impl::claim_push(const char* what, std::string_view name, std::size_t offset, std::size_t count) {
  refuse_if_detached("push");
  const std::uint32_t i = find(name);
  if (borrower != nullptr) refuse_if_borrowed(std::string(what) + " '" + std::string(name) + "'", "nothing was pushed");
  check_range(what, i, offset, count);
  await_admission();
  if (count > ring.max_record_floats())
    throw Error(std::string(what) + " '" + std::string(name) + "': " + std::to_string(count) +
                " elements do not fit one ring record (at most " + std::to_string(ring.max_record_floats()) +
                " with ring_bytes = " + std::to_string(ring.capacity()) +
                "); a borrowed buffer is one record: borrow ranges (offset, count), or use push(), which streams a "
                "gradient of any size through the ring; nothing was pushed");

  // Claim room (back-pressure: wait for the server, never drop). In BSP the server takes a
  // step's pushes only once the step has ended: if the ring holds nothing but this worker's open
  // step and is still full, waiting would never end.
  const auto step_overflows = [&] {
    return !segment.streams_bsp_steps() &&
           load_acquire(segment.header().consistency) == static_cast<std::uint32_t>(Consistency::bsp) &&
           ring.head() >= ring.past_start_over(step_start);
  };
  PushRecord* record = ring.try_claim(count);
  if (record == nullptr) {
    const std::uint64_t waited_from = monotonic_ns();
    bool overflow = false;
    const bool ok = wait_for(
        [&] {
          if ((record = ring.try_claim(count)) != nullptr) return true;
          if (!step_overflows()) return false;
          // The server may have freed the room between the claim and that look: claim once more
          // before calling it an overflow (once the ring holds only this step, nothing frees it).
          if ((record = ring.try_claim(count)) != nullptr) return true;
          return overflow = true;
        },
        deadline(), &slot.progress_word(), &slot.waiting_flag());
    slot.add_backpressure_ns(monotonic_ns() - waited_from);
    if (overflow)
      throw Error(std::string(what) + " '" + std::string(name) + "': the pushes of this BSP step (" +
                  std::to_string(ring.tail() - ring.past_start_over(step_start)) + " bytes so far) fill the whole ring of " +
                  std::to_string(ring.capacity()) +
                  " bytes, and the server takes them only once the step ends: end steps sooner (clock()), push less "
                  "per step, or raise ring_bytes in the model spec; nothing was pushed");
    if (!ok)
      throw Error(std::string(what) + " '" + std::string(name) + "': the ring of worker " + std::to_string(rank) +
                  " has been full for " + std::to_string(options.timeout.count()) + " ms; " + server_state() +
                  "; nothing was pushed");
  }
  claim = Claim{record, i, offset, count};
  return record_payload(record);
}

// Fills the claimed record's header and publishes it with one release store.
std::uint64_t Worker::Impl::commit_push(double sum_sq) {
  PushRecord* record = claim.record;
  const std::uint64_t seq = published + 1;
  record->param = claim.param;
  record->offset = claim.offset;
  record->count = claim.count;
  record->seq = seq;
  record->generation = generation;
  record->clock = clock;
  record->grad_sq_norm = sum_sq;
  const std::uint64_t bytes = claim.count * sizeof(float);
  if (step_skip != 0) {  // committed by this slot's previous process, and in the step sums already
    --step_skip;
    give_back();
    pushed_in_step = true;
    return skipped_seq++;
  }
  claim = {};
  if (stream_words_open) {  // another push comes between: the unfinished stream's words no longer add up
    slot.end_stream();
    stream_words_open = false;
  }
  if (!pushed_in_step && !step_first_written) {
    slot.set_step_first_seq(seq);  // before the commit: a successor must find it with the push
    step_first_written = true;
  }
  kill_point("push.before_commit");
  ring.commit();  // one release store: the record now exists, whole
  published = seq;
  pushed_in_step = true;
  slot.publish(seq, monotonic_ns());
  slot.count_push_bytes(bytes);
  heartbeat();
  wake_server();
  return seq;
}

// Refuses the claimed record because of the non-finite `value` at index `bad` of its payload:
// counts it, gives the room back (the record was never committed: it does not exist), throws.
void Worker::Impl::reject_push(const char* what, std::size_t bad, float value) {
  const Claim refused = claim;
  give_back();
  slot.count_rejected_push();
  bump_counter(segment.rejected(static_cast<unsigned>(rank), refused.param));
  throw Error(std::string(what) + " '" + params[refused.param].name + "' rejected: element " +
              std::to_string(refused.offset + bad) + " is " + (std::isnan(value) ? "NaN" : "infinite") +
              "; nothing was pushed (check the loss and learning rate, or clip gradients before pushing)");
}

PushBuffer::PushBuffer(Worker::Impl* owner, float* data, std::size_t size, std::size_t offset) noexcept
    : owner_(owner), data_(data), size_(size), offset_(offset) {
  owner_->borrower = this;
}

PushBuffer::PushBuffer(PushBuffer&& other) noexcept
    : owner_(other.owner_), data_(other.data_), size_(other.size_), offset_(other.offset_) {
  if (owner_ != nullptr) owner_->borrower = this;
  other.detach();
}

PushBuffer& PushBuffer::operator=(PushBuffer&& other) noexcept {
  if (this == &other) return *this;
  drop();
  owner_ = other.owner_;
  data_ = other.data_;
  size_ = other.size_;
  offset_ = other.offset_;
  if (owner_ != nullptr) owner_->borrower = this;
  other.detach();
  return *this;
}

PushBuffer::~PushBuffer() { drop(); }

void PushBuffer::detach() noexcept {
  owner_ = nullptr;
  data_ = nullptr;
  size_ = 0;
  offset_ = 0;
}

void PushBuffer::drop() noexcept {
  if (owner_ == nullptr) return;
  owner_->give_back();
  detach();
}

std::uint64_t PushBuffer::commit() {
  if (owner_ == nullptr)
    throw Error("commit() of a push buffer that holds nothing (committed or dropped already, moved from, or its "
                "Worker is gone); borrow another with Worker::borrow_push; nothing was pushed");
  Worker::Impl& s = *owner_;
  if (s.forked_away) {  // a buffer borrowed before fork(): the room is the parent's
    drop();
    s.refuse_if_detached("push");
  }
  const std::size_t n = size_;
  double sum_sq = 0.0;
  const std::size_t bad = scan_gradient<Store::none>(nullptr, data_, n, sum_sq);
  const float value = bad != n ? data_[bad] : 0.0f;
  s.borrower = nullptr;  // this buffer is done with, whatever happens next
  detach();
  if (bad != n) s.reject_push("borrowed push to", bad, value);
  return s.commit_push(sum_sq);
}

void Worker::wait_applied(std::uint64_t seq) {
  Impl& s = *impl_;
  if (seq > s.published)
    throw Error("wait_applied(" + std::to_string(seq) + "): this worker has published only " +
                std::to_string(s.published) + " pushes; pass a sequence number returned by push()");
  const bool ok = wait_for([&] { return s.slot.applied() >= seq; }, s.deadline(), &s.slot.progress_word(),
                           &s.slot.waiting_flag());
  if (!ok)
    throw Error("wait_applied(" + std::to_string(seq) + "): not applied after " + std::to_string(s.options.timeout.count()) +
                " ms (applied so far: " + std::to_string(s.slot.applied()) + "); " + s.server_state());
  s.heartbeat();
}

std::uint64_t Worker::clock() {
  Impl& s = *impl_;
  s.refuse_if_detached("train");
  s.refuse_if_borrowed("clock()", "the step was not ended");
  s.end_step();
  return s.clock;
}

std::uint64_t Worker::current_clock() const { return impl_->clock; }

void Worker::save_state(std::span<const std::byte> state) {
  if (state.size() > kResumeBlobBytes)
    throw Error("save_state: " + std::to_string(state.size()) + " bytes is more than the " +
                std::to_string(kResumeBlobBytes) + " a slot keeps; save a cursor, not the data");
  impl_->staged_state.assign(state.begin(), state.end());
  impl_->state_staged = true;
}

std::vector<std::byte> Worker::load_state() const { return impl_->committed_state; }

std::uint64_t Worker::generation() const { return impl_->generation; }

void Worker::Impl::end_step() {
  await_admission();
  const std::uint64_t state_floats = state_staged ? (staged_state.size() + sizeof(float) - 1) / sizeof(float) : 0;
  PushRecord* record = ring.try_claim(state_floats);
  if (record == nullptr) {
    const bool ok = wait_for([&] { return (record = ring.try_claim(state_floats)) != nullptr; }, deadline(),
                             &slot.progress_word(), &slot.waiting_flag());
    if (!ok)
      throw Error("clock(): the ring of worker " + std::to_string(rank) + " has been full for " +
                  std::to_string(options.timeout.count()) + " ms; " + server_state());
  }
  record->kind = RecordKind::clock;
  record->param = 0;
  record->offset = state_staged ? staged_state.size() : 0;  // the resume state's length in bytes
  record->count = state_floats;
  if (state_staged) std::memcpy(record_payload(record), staged_state.data(), staged_state.size());
  record->seq = published;
  record->generation = generation;
  record->clock = clock;
  record->grad_sq_norm = 0.0;
  ring.commit();  // the step's pushes, and the state that follows them, now count together
  step_start = ring.tail();
  if (step_first_written) slot.set_step_first_seq(0);
  step_first_written = false;
  step_skip = 0;
  if (state_staged) {
    committed_state = staged_state;
    state_staged = false;
  }
  clock += 1;
  pushed_in_step = false;
  slot.set_clock(clock);
  heartbeat();
  wake_server();
}

void Worker::Impl::wait_for_consistency(const char* what, std::string_view name) {
  await_admission();
  const SegmentHeader& h = segment.header();
  const auto mode = static_cast<Consistency>(load_acquire(h.consistency));
  auto record_staleness = [&] {
    const std::uint64_t slowest = slowest_clock();
    const std::uint64_t staleness = clock > slowest ? clock - slowest : 0;
    slot.record_staleness(staleness);
  };
  if (mode == Consistency::asp) {
    record_staleness();
    return;
  }
  // Fresh enough yet? Re-read the mode every time: a live switch may change it while we wait.
  auto fresh = [&] {
    const auto now_mode = static_cast<Consistency>(load_acquire(h.consistency));
    if (now_mode == Consistency::bsp) return load_acquire(h.model_clock) >= clock;
    if (now_mode == Consistency::ssp) {
      const std::uint64_t bound = load_acquire(h.staleness);
      return clock <= bound || slowest_clock() >= clock - bound;
    }
    return true;
  };
  if (!fresh()) {
    const auto started = Clock::now();
    // BSP steps end with a bump of our progress word; SSP waits on other workers' clocks, which
    // nobody signals: poll those with short naps.
    const bool bsp = mode == Consistency::bsp;
    const bool ok = wait_for(fresh, deadline(), bsp ? &slot.progress_word() : nullptr, bsp ? &slot.waiting_flag() : nullptr);
    slot.add_wait_ns(static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started).count()));
    if (!ok) {
      std::string behind;
      for (std::uint32_t r = 0; r < h.max_workers; ++r) {
        if (static_cast<int>(r) != rank && counts(r) && load_acquire(segment.slot(r).clock) < clock)
          behind += (behind.empty() ? "" : ", ") + std::to_string(r) + " (clock " +
                    std::to_string(load_acquire(segment.slot(r).clock)) + ")";
        else if (static_cast<int>(r) != rank && !counts(r) && load_acquire(segment.slot(r).streamed_step) == clock &&
                 load_acquire(segment.slot(r).clock) < clock && load_acquire(segment.slot(r).consumed_clock) < clock)
          // A streamed BSP step waits for a dead worker whose part of it is summed but that did
          // not end it (collect_streamed_step's test).
          behind += (behind.empty() ? "" : ", ") + std::to_string(r) + " (gone with part of step " +
                    std::to_string(clock - 1) + " summed: start rank " + std::to_string(r) + " again to finish it)";
      }
      throw Error(std::string(what) + " '" + std::string(name) + "' at clock " + std::to_string(clock) + " waited " +
                  std::to_string(options.timeout.count()) + " ms for " +
                  (static_cast<Consistency>(load_acquire(h.consistency)) == Consistency::bsp
                       ? "the server to finish step " + std::to_string(clock - 1) + " (model clock " +
                             std::to_string(load_acquire(h.model_clock)) + ")"
                       : "the slowest workers to come within the staleness bound") +
                  "; workers behind: " + (behind.empty() ? "none" : behind) + "; " + server_state());
    }
  }
  record_staleness();
}

void Worker::leave() {
  Impl& s = *impl_;
  if (!s.attached) return;
  s.refuse_if_borrowed("leave()", "the worker is still attached");
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
