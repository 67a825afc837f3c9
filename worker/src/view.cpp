// Zero-copy reads (Worker::view): the values in the segment itself, after the same wait as a pull.
//
// Why a BSP view is a consistent snapshot without a copy: a worker at clock c reads only once
// its worker group's clock >= c, i.e. once the group's step c-1 is applied whole (the server
// stores the group clock after the last slice's copy and the clearing of its redo mark). The
// server then collects the group's step c, and it takes it only when every worker of the group
// that counts has ended step c (collect_step.cpp); with one group nothing else writes, and with
// several the other groups' steps write under the view (Hogwild between groups). This worker
// counts (attached, admitted: the wait includes the admission, and alive: it holds its lock
// byte), so no value changes before its clock() or leave(). A server killed and restarted in
// between replays only redo entries still marked valid, which belong to a step being applied,
// never to step c while this worker is in it.
//
// Like the rest of the worker, this writes only this worker's own slot (statistics, heartbeat).
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include <shmps/shm/dtype.hpp>

#include "worker_impl.hpp"

namespace shmps {

// The values and the optimizer state are the server's (ARCHITECTURE.md: a worker writes only its
// own slot and ring). A view hands out their addresses, and torch has no read-only tensors, so a
// write through one (an in-place op, a local optimizer step on a module bound to views) would
// silently change the model of every worker. Mapped read-only in the worker's process, such a
// write is a SIGSEGV of that worker instead, which the job survives like any worker's death. The
// values start on a page (plan_layout) and the state runs to the end of the segment, so nothing
// a worker writes shares a page with them.
void Worker::Impl::protect_values() {
  const SegmentHeader& h = segment.header();
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  const std::uint64_t from = (h.values_offset + page - 1) / page * page;
  if (from >= segment.size()) return;
  if (::mprotect(segment.base() + from, segment.size() - from, PROT_READ) != 0)
    throw Error("segment '" + segment.name() + "': cannot map its values read-only (mprotect: " +
                std::strerror(errno) + "); nothing was changed");
}

static_assert(static_cast<int>(ValueDType::f32) == static_cast<int>(DType::f32) &&
              static_cast<int>(ValueDType::bf16) == static_cast<int>(DType::bf16) &&
              static_cast<int>(ValueDType::fp16) == static_cast<int>(DType::fp16));

std::span<const float> Worker::view(std::string_view name) {
  return view(name, 0, impl_->params[impl_->find(name)].size);
}

std::span<const float> Worker::view(std::string_view name, std::size_t offset, std::size_t count) {
  const std::uint32_t i = impl_->find(name);
  const ParamEntry& p = impl_->segment.param(i);
  if (p.dtype != DType::f32)
    throw Error("view of '" + std::string(name) + "': its values are " + std::string(to_string(p.dtype)) +
                " (2 bytes an element, dtype in the model spec), not float32: use view_raw() for the stored values, "
                "or pull() into a float buffer");
  impl_->view_range(name, i, offset, count);
  return {impl_->segment.values(p) + offset, count};
}

std::span<const std::uint16_t> Worker::view_raw(std::string_view name) {
  return view_raw(name, 0, impl_->params[impl_->find(name)].size);
}

std::span<const std::uint16_t> Worker::view_raw(std::string_view name, std::size_t offset, std::size_t count) {
  const std::uint32_t i = impl_->find(name);
  const ParamEntry& p = impl_->segment.param(i);
  if (p.dtype == DType::f32)
    throw Error("view_raw of '" + std::string(name) + "': its values are float32 (dtype f32), not 2-byte elements: "
                "use view()");
  impl_->view_range(name, i, offset, count);
  return {impl_->segment.values16(p) + offset, count};
}

void Worker::Impl::view_range(std::string_view name, std::uint32_t i, std::size_t offset, std::size_t count) {
  Impl& s = *this;
  s.refuse_if_detached("view parameters");
  if (s.params[i].keyed)
    throw Error("view of '" + std::string(name) + "': it is a table with keys = \"u64\", whose rows are slots that "
                "keys come and go from: use pull_rows() with the keys");
  s.check_range("view of", i, offset, count);
  s.wait_for_consistency("view of", name);
  s.wait_for_put("view of", i, offset, count);
  const Segment& seg = s.segment;
  const ParamEntry& p = seg.param(i);
  if (load_acquire(seg.header().consistency) == static_cast<std::uint32_t>(Consistency::bsp)) {
    // By the argument above no slice of the range can be mid-update now; a version word left odd
    // would mean a server died mid-copy and none repaired it yet. Check it (one load per slice)
    // and fail as a pull does rather than hand out a torn snapshot.
    const std::uint64_t slice_floats = seg.header().slice_floats;
    for (std::uint64_t k = offset / slice_floats; k * slice_floats < offset + count; ++k) {
      const SliceEntry& slice = seg.slice(p.first_slice + k);
      const bool ok = wait_for([&] { return (load_acquire(slice.version) & 1U) == 0; }, s.deadline(), nullptr, nullptr);
      if (!ok)
        throw Error("view of '" + std::string(name) + "': slice " + std::to_string(k) + " has been mid-update for " +
                    std::to_string(s.options.timeout.count()) + " ms; " + s.server_state() +
                    "; a restarted server repairs it");
    }
  }
  s.slot.count_view();
  s.heartbeat();
}

}  // namespace shmps
