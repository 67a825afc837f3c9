// What both collectors share: a push record cut into per-slice contributions, the resume state a
// clock record hands to its slot, and the log line of a malformed record.
#include "collect.hpp"

#include <spdlog/spdlog.h>

#include <shmps/shm/worker_slot.hpp>

namespace shmps::server {

using namespace shmps::shm;

bool add_contributions(const Segment& segment, std::uint32_t rank, const PushRecord& rec,
                       std::vector<Contribution>& out) {
  const SegmentHeader& h = segment.header();
  if (rec.param >= h.param_count || rec.count == 0 || rec.offset > segment.param(rec.param).size ||
      rec.count > segment.param(rec.param).size - rec.offset) {
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
  const auto* blob = reinterpret_cast<const std::byte*>(record_payload(&clock_record));
  WorkerSlotServerView(segment.slot(rank)).keep_resume({blob, clock_record.offset}, clock_record.clock);
}

void log_bad_record(const Segment& segment, std::uint32_t rank, std::uint64_t position) {
  spdlog::error("event=bad_record segment={} rank={} position={} action=\"discarding the rest of this ring\"",
                segment.header().name, rank, position);
}

}  // namespace shmps::server
