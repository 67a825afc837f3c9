// What both collectors share: a push record cut into per-slice contributions, the resume state a
// clock record hands to its slot, and the log line of a malformed record.
#include "collect.hpp"

#include <algorithm>
#include <bit>
#include <utility>

#include <spdlog/spdlog.h>

#include <shmps/shm/worker_slot.hpp>

namespace shmps::server {

using namespace shmps::shm;

namespace {

void log_refused(const Segment& segment, std::uint32_t rank, const PushRecord& rec, const char* reason) {
  spdlog::error("event=bad_record segment={} rank={} seq={} reason=\"{}\"", segment.header().name, rank, rec.seq, reason);
}

// A rows record: its rows sorted by id (a repeated id keeps the record's order), then one
// contribution per slice they fall in. A round merges all of a slice's rows (apply.cpp), so a
// hot row is one update per round, whoever pushed it how often.
// `param`: the record's parameter, read once and checked by the caller.
bool add_row_contributions(const Segment& segment, std::uint32_t rank, const PushRecord& rec, std::uint32_t param,
                           std::vector<Contribution>& out, std::vector<RowRef>& row_refs) {
  const ParamEntry& p = segment.param(param);
  const std::uint64_t n = rec.offset, dim = p.table_dim, rows = p.shape[0];
  if (dim == 0) {
    log_refused(segment, rank, rec, "rows pushed to a dense parameter");
    return false;
  }
  if (rec.count != n * dim) {
    log_refused(segment, rank, rec, "rows of another width than the table's");
    return false;
  }
  if (is_keyed(p)) {
    // Keys, not row numbers: turned into slots after the collectors (KeyedTables::translate),
    // which takes the table and the row count from here, as checked, not from the ring again.
    if (n > UINT32_MAX) {
      log_refused(segment, rank, rec, "more rows than a record may have");
      return false;
    }
    out.push_back({kKeysToTranslate, rank, &rec, param, static_cast<std::uint32_t>(n)});
    return true;
  }
  const std::uint64_t* ids = record_ids(&rec);
  const std::uint64_t rows_per_slice = segment.header().slice_floats / dim;
  // A shift, not a division, whenever rows per slice is a power of two (the usual case).
  const bool shift = std::has_single_bit(rows_per_slice);
  const int bits = std::countr_zero(rows_per_slice);
  const auto slice_of = [&](std::uint64_t id) { return shift ? id >> bits : id / rows_per_slice; };
  bool sorted = true;
  for (std::uint64_t k = 0; k < n; ++k) {
    if (ids[k] >= rows) {
      log_refused(segment, rank, rec, "a row id outside the table");
      return false;
    }
    sorted = sorted && (k == 0 || ids[k - 1] <= ids[k]);
  }
  if (sorted) {  // the usual push (a batch's distinct ids, sorted): grouped as they are
    for (std::uint64_t k = 0; k < n;) {
      const std::uint64_t slice = slice_of(ids[k]);
      const std::uint64_t begin = row_refs.size(), first_row = slice * rows_per_slice;
      for (; k < n && slice_of(ids[k]) == slice; ++k)
        row_refs.push_back({static_cast<std::uint32_t>(k), static_cast<std::uint32_t>(ids[k] - first_row)});
      out.push_back({p.first_slice + slice, rank, &rec, begin, static_cast<std::uint32_t>(row_refs.size() - begin)});
    }
    return true;
  }
  thread_local std::vector<std::pair<std::uint64_t, std::uint32_t>> order;
  order.clear();
  for (std::uint64_t k = 0; k < n; ++k) order.emplace_back(ids[k], static_cast<std::uint32_t>(k));
  std::sort(order.begin(), order.end());
  for (std::size_t i = 0; i < order.size();) {
    const std::uint64_t slice = slice_of(order[i].first);
    const std::uint64_t begin = row_refs.size(), first_row = slice * rows_per_slice;
    for (; i < order.size() && slice_of(order[i].first) == slice; ++i)
      row_refs.push_back({order[i].second, static_cast<std::uint32_t>(order[i].first - first_row)});
    out.push_back({p.first_slice + slice, rank, &rec, begin, static_cast<std::uint32_t>(row_refs.size() - begin)});
  }
  return true;
}

}  // namespace

bool add_contributions(const Segment& segment, std::uint32_t rank, const PushRecord& rec,
                       std::vector<Contribution>& out, std::vector<RowRef>& row_refs) {
  const SegmentHeader& h = segment.header();
  if (const std::uint32_t param = rec.param; param < h.param_count && rec.kind == RecordKind::rows)
    return add_row_contributions(segment, rank, rec, param, out, row_refs);
  if (rec.param < h.param_count && segment.param(rec.param).table_dim != 0) {
    log_refused(segment, rank, rec, "a dense push to a table");
    return false;
  }
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
