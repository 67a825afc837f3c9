// What both collectors share: a push record cut into per-slice contributions, the resume state a
// clock record hands to its slot, and the log line of a malformed record.
#include "collect.hpp"

#include <spdlog/spdlog.h>

#include <cstring>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/seqlock.hpp>

namespace shmps::server {

using namespace shmps::shm;

bool add_contributions(const Segment& segment, std::uint32_t rank, const PushRecord& rec,
                       std::vector<Contribution>& out) {
  const SegmentHeader& h = segment.header();
  if (rec.param >= h.param_count || rec.count == 0 || rec.offset + rec.count > segment.param(rec.param).size) {
    spdlog::error("event=bad_record segment={} rank={} seq={} reason=\"range outside its parameter\"", h.name, rank,
                  rec.seq);
    return false;
  }
  const ParamEntry& p = segment.param(rec.param);
  const std::uint64_t first = p.first_slice + rec.offset / h.slice_floats;
  const std::uint64_t last = p.first_slice + (rec.offset + rec.count - 1) / h.slice_floats;
  for (std::uint64_t slice = first; slice <= last; ++slice) out.push_back({slice, rank, &rec});
  return true;
}

void keep_resume_state(Segment& segment, std::uint32_t rank, const PushRecord& clock_record) {
  if (clock_record.offset == 0) return;
  WorkerSlot& slot = segment.slot(rank);
  const std::uint64_t before = seqlock_write_begin(slot.resume_version);
  std::memcpy(slot.resume, record_payload(&clock_record), clock_record.offset);
  store_release(slot.resume_bytes, static_cast<std::uint32_t>(clock_record.offset));
  store_release(slot.resume_clock, clock_record.clock);
  seqlock_write_end(slot.resume_version, before, 1);
}

void log_bad_record(const Segment& segment, std::uint32_t rank, std::uint64_t position) {
  spdlog::error("event=bad_record segment={} rank={} position={} action=\"discarding the rest of this ring\"",
                segment.header().name, rank, position);
}

}  // namespace shmps::server
