// The worker side of the protocols (ARCHITECTURE.md "Pull", "Push", "Worker life"): this file holds
// the accessors, pull(), the clock (ending a step, waiting for the consistency model) and saved
// worker state. Attaching and leaving are in attach.cpp, pushing in push.cpp, zero-copy reads in
// view.cpp.
//
// Everything here runs in the worker process and writes only the worker's own slot lines and
// its own ring. It takes no lock anyone else waits for: the one lock it holds (its byte of
// <name>.slots.lock) only proves it is alive.
#include "shmps/worker.hpp"

#include <cstring>
#include <string>

#include <shmps/shm/dtype.hpp>
#include <shmps/shm/reader.hpp>

#include "worker_impl.hpp"

namespace shmps {

using namespace shmps::shm;

std::atomic<bool (*)()> worker_detail::interrupt_check{nullptr};

void set_interrupt_check(bool (*check)()) noexcept { worker_detail::interrupt_check.store(check, std::memory_order_release); }

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

std::string_view to_string(ValueDType dtype) noexcept { return shm::to_string(static_cast<DType>(dtype)); }

std::uint64_t Worker::pull(std::string_view name, std::span<float> out) { return pull(name, out, 0); }

std::uint64_t Worker::pull(std::string_view name, std::span<std::uint16_t> out) {
  const std::uint32_t i = impl_->find(name);
  impl_->refuse_kind("pull of", i, false);
  if (out.size() != impl_->params[i].size)
    throw Error("pull of '" + std::string(name) + "': the output has " + std::to_string(out.size()) +
                " elements but the parameter has " + std::to_string(impl_->params[i].size) + " " +
                shape_string(impl_->segment.param(i)) + "; pass a buffer of that size, or pull a range with an offset");
  return pull(name, 0, out);
}

std::uint64_t Worker::pull(std::string_view name, std::size_t offset, std::span<std::uint16_t> out,
                           std::uint64_t min_version) {
  Impl& s = *impl_;
  s.refuse_if_detached("pull");
  const std::uint32_t i = s.find(name);
  const Segment& seg = s.segment;
  if (seg.param(i).dtype == DType::f32)
    throw Error("pull of '" + std::string(name) + "' into 2-byte elements: the parameter's values are float32 (its "
                "dtype is f32); pull it into a float buffer");
  s.check_range("pull of", i, offset, out.size());
  s.wait_for_consistency("pull of", name);
  s.wait_for_put("pull of", i, offset, out.size());
  s.wait_for_version("pull of", i, offset, out.size(), min_version);
  const SliceReadResult read = read_param_raw(seg, seg.param(i), offset, out, s.options.timeout);
  if (read.stuck_slice)
    throw Error("pull of '" + std::string(name) + "': slice " + std::to_string(*read.stuck_slice) +
                " has been mid-update for " + std::to_string(s.options.timeout.count()) + " ms; " + s.server_state() +
                "; a restarted server repairs it");
  s.slot.count_pull(static_cast<std::uint64_t>(out.size_bytes()));
  s.heartbeat();
  return read.min_version;
}

std::uint64_t Worker::pull(std::string_view name, std::span<float> out, std::uint64_t min_version) {
  const std::uint32_t i = impl_->find(name);
  impl_->refuse_kind("pull of", i, false);
  if (out.size() != impl_->params[i].size)
    throw Error("pull of '" + std::string(name) + "': the output has " + std::to_string(out.size()) +
                " elements but the parameter has " + std::to_string(impl_->params[i].size) + " " +
                shape_string(impl_->segment.param(i)) + "; pass a buffer of that size, or pull a range with an offset");
  return pull(name, 0, out, min_version);
}

std::uint64_t Worker::pull(std::string_view name, std::size_t offset, std::span<float> out) {
  return pull(name, offset, out, 0);
}

std::uint64_t Worker::pull(std::string_view name, std::size_t offset, std::span<float> out, std::uint64_t min_version) {
  Impl& s = *impl_;
  s.refuse_if_detached("pull");
  const std::uint32_t i = s.find(name);
  s.check_range("pull of", i, offset, out.size());
  const Segment& seg = s.segment;
  s.wait_for_consistency("pull of", name);
  s.wait_for_put("pull of", i, offset, out.size());
  s.wait_for_version("pull of", i, offset, out.size(), min_version);
  const SliceReadResult read = read_param(seg, seg.param(i), offset, out, s.options.timeout);
  if (read.stuck_slice)
    throw Error("pull of '" + std::string(name) + "': slice " + std::to_string(*read.stuck_slice) +
                " has been mid-update for " + std::to_string(s.options.timeout.count()) + " ms; " + s.server_state() +
                "; a restarted server repairs it");
  s.slot.count_pull(static_cast<std::uint64_t>(out.size_bytes()));
  s.heartbeat();
  return read.min_version;
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

void Worker::wait_for_workers(std::size_t count) { wait_for_workers(count, impl_->options.timeout); }

void Worker::wait_for_workers(std::size_t count, std::chrono::milliseconds timeout) {
  Impl& s = *impl_;
  s.refuse_if_detached("wait for workers");
  const std::uint32_t slots = s.segment.header().max_workers;
  if (count == 0 || count > slots)
    throw Error("wait_for_workers(" + std::to_string(count) + "): segment '" + s.segment.name() + "' has " +
                std::to_string(slots) + " worker slots; pass a count from 1 to " + std::to_string(slots));
  if (static_cast<std::size_t>(s.rank) >= count)
    throw Error("wait_for_workers(" + std::to_string(count) + "): this worker is rank " + std::to_string(s.rank) +
                ", outside ranks 0 to " + std::to_string(count - 1) + " it would wait for; pass the number of workers");
  // This worker's own admission first (BSP waits for it), and the clock it entered at.
  s.await_admission();
  const std::uint64_t entered = s.clock;
  // Joined: the generation now in the slot was admitted and is alive (attached, not proven dead),
  // or it has left after ending a step at or past the one this worker entered at (a fast worker
  // may join, end its step and leave between two looks of a slow one). Slots of earlier runs (a
  // restored checkpoint, a kept segment) hold admitted generations too, but dead or left at older
  // clocks: they do not count.
  const auto joined = [&](std::size_t r) {
    const WorkerSlot& slot = s.segment.slot(r);
    const std::uint64_t generation = load_acquire(slot.generation);
    if (generation == 0 || load_acquire(slot.admitted_generation) != generation) return false;
    const auto state = static_cast<SlotState>(load_acquire(slot.state));
    if (state == SlotState::attached) return load_acquire(slot.dead_generation) != generation;
    return state == SlotState::left && load_acquire(slot.clock) > entered;
  };
  const auto all = [&] {
    for (std::size_t r = 0; r < count; ++r)
      if (!joined(r)) return false;
    return true;
  };
  if (!wait_for(all, Clock::now() + timeout, nullptr, nullptr)) {
    std::string missing;
    for (std::size_t r = 0; r < count; ++r)
      if (!joined(r)) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
    throw Error("wait_for_workers(" + std::to_string(count) + "): after " + std::to_string(timeout.count()) +
                " ms, ranks " + missing + " of segment '" + s.segment.name() +
                "' have not joined (or the server has not admitted them): start them, or wait for fewer; " +
                s.server_state());
  }
  s.heartbeat();
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

void Worker::Impl::wait_for_version(const char* what, std::uint32_t param, std::uint64_t offset, std::uint64_t count,
                                    std::uint64_t min_version, const char* hint) {
  if (min_version == 0) return;
  const ParamEntry& p = segment.param(param);
  const std::uint64_t slice_floats = segment.header().slice_floats;
  const std::uint64_t first = offset / slice_floats, last = (offset + count - 1) / slice_floats;
  // The first slice still behind, or last + 1 once none is: versions only grow, so a slice once
  // seen at min_version need not be looked at again.
  std::uint64_t behind = first;
  const auto reached = [&] {
    while (behind <= last && load_acquire(segment.slice(p.first_slice + behind).version) / 2 >= min_version) ++behind;
    return behind > last;
  };
  if (reached()) return;
  const auto started = Clock::now();
  const bool ok = wait_for(reached, deadline(), &slot.progress_word(), &slot.waiting_flag());
  slot.add_wait_ns(static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started).count()));
  if (!ok)
    throw Error(std::string(what) + " '" + params[param].name + "' at version " + std::to_string(min_version) +
                ": slice " + std::to_string(behind) + " of it (elements from " +
                std::to_string(behind * slice_floats) + ") has had " +
                std::to_string(load_acquire(segment.slice(p.first_slice + behind).version) / 2) + " updates after " +
                std::to_string(options.timeout.count()) + " ms of waiting; " + server_state() + "; " + hint);
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
  const WorkerSlot& own = segment.slot(static_cast<std::uint32_t>(rank));
  auto fresh = [&] {
    if (load_acquire(own.evicted_generation) == generation) return true;  // refused below
    const auto now_mode = static_cast<Consistency>(load_acquire(h.consistency));
    if (now_mode == Consistency::bsp) return group_clock() >= clock;
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
    refuse_if_evicted("go on");
    if (!ok) {
      std::string behind, waiting;
      const std::uint32_t g = group();
      const bool bsp_now = static_cast<Consistency>(load_acquire(h.consistency)) == Consistency::bsp;
      for (std::uint32_t r = segment.group_first_rank(g); r < segment.group_end_rank(g); ++r) {
        if (static_cast<int>(r) != rank && counts(r) && load_acquire(segment.slot(r).clock) < clock) {
          if (bsp_now)  // the barrier waits for it: say who it is, and why
            waiting += (waiting.empty() ? "" : "; ") + describe_behind(r, load_acquire(segment.slot(r).clock));
          else
            behind += (behind.empty() ? "" : ", ") + std::to_string(r) + " (clock " +
                      std::to_string(load_acquire(segment.slot(r).clock)) + ")";
        } else if (static_cast<int>(r) != rank && !counts(r) && load_acquire(segment.slot(r).streamed_step) == clock &&
                 load_acquire(segment.slot(r).clock) < clock && load_acquire(segment.slot(r).consumed_clock) < clock)
          // A streamed BSP step waits for a dead worker whose part of it is summed but that did
          // not end it (collect_streamed_step's test).
          behind += (behind.empty() ? "" : ", ") + std::to_string(r) + " (gone with part of step " +
                    std::to_string(clock - 1) + " summed: start rank " + std::to_string(r) + " again to finish it)";
      }
      throw Error(std::string(what) + " '" + std::string(name) + "' at clock " + std::to_string(clock) + " waited " +
                  std::to_string(options.timeout.count()) + " ms for " +
                  (static_cast<Consistency>(load_acquire(h.consistency)) == Consistency::bsp
                       ? "the server to finish step " + std::to_string(clock - 1) +
                             (h.group_count > 1 ? " of worker group " + std::to_string(g) + " (group clock "
                                                : std::string(" (model clock ")) +
                             std::to_string(group_clock()) + ")"
                       : "the slowest workers to come within the staleness bound") +
                  (waiting.empty() ? "" : "; waiting for " + waiting) +
                  (behind.empty() && !waiting.empty() ? "" : "; workers behind: " + (behind.empty() ? "none" : behind)) +
                  "; " + (waiting.empty() ? server_state() : waiting_server_state()));
    }
  }
  record_staleness();
}

}  // namespace shmps
