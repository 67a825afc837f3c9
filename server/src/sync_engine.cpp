#include "sync_engine.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/killpoint.hpp>
#include <shmps/shm/proc.hpp>
#include <shmps/shm/ring.hpp>

#include "redo.hpp"

namespace shmps::server {

using namespace shmps::shm;

SyncEngine::SyncEngine(Segment& segment, std::unique_ptr<SyncTransport> transport, SyncEvery every)
    : segment_(segment), transport_(std::move(transport)), every_(every), group_(segment.header().server_group),
      groups_(segment.header().server_groups), last_round_(std::chrono::steady_clock::now()),
      records_at_last_round_(load_counter(segment.header().records_applied)),
      refresh_after_ns_(static_cast<std::uint64_t>(
          std::max<std::int64_t>(kRefreshRounds * every.period.count(), kMinRefreshMs) * 1'000'000)) {
  // Slices in flight when the last server of this replica died: their deltas are sent again (the
  // home adds each at most once, and answers again).
  for (std::uint64_t s = 0; s < segment.header().slice_count; ++s) {
    const SyncSlice& sync = segment.sync_slice(s);
    if (load_own(sync.sent_seq) > load_own(sync.synced_seq)) to_send_.push_back(s);
  }
  in_flight_ = to_send_.size();
  if (in_flight_ != 0)
    spdlog::info("event=sync_resend segment={} slices={} reason=\"in flight when the previous server stopped: sent "
                 "again, and added by their home groups only if they were not before\"",
                 segment.header().name, in_flight_);
}

bool SyncEngine::tick(bool may_write) {
  if (paused()) return false;
  bool did = false;
  may_write_ = may_write;
  if (may_write) did |= receive();
  if (in_flight_ == 0) {
    if (full_ == Full::waiting) {
      begin_round(true);
      full_ = Full::running;
      did = true;
    } else if (full_ == Full::none && round_due()) {
      did |= begin_round(false);
    }
  }
  did |= send_pending();
  transport_->flush();
  if (full_ == Full::running && in_flight_ == 0) full_ = Full::done;
  return did;
}

bool SyncEngine::receive() {
  if (paused()) return false;
  const bool did =
      transport_->receive([this](std::uint32_t from, const PushRecord& r) { return handle(from, r); }) != 0;
  transport_->flush();  // the answers
  return did;
}

void SyncEngine::request_full_sync() {
  if (full_ == Full::none) full_ = Full::waiting;
}

bool SyncEngine::take_full_sync_done() {
  if (full_ != Full::done) return false;
  full_ = Full::none;
  return true;
}

bool SyncEngine::busy() const {
  return !paused() && (full_ == Full::waiting || (may_write_ && transport_->waiting()));
}

bool SyncEngine::round_due() const {
  if (every_.updates != 0)
    return load_counter(segment_.header().records_applied) - records_at_last_round_ >= every_.updates;
  return std::chrono::steady_clock::now() - last_round_ >= every_.period;
}

// Every non-home slice not in flight that changed since its last sync, or was last synced
// refresh_after_ns_ ago (its delta may be zero: the home's values come back, so that a group
// whose workers do not touch a slice still sees the others' updates of it), or every one: its
// delta into sync_sent, then its sequence number (a server killed in between has sent nothing:
// the slice is not in flight, and the next round computes its delta again).
//
// A round's number is the time it began (unix ns), or the last number + 1 if the clock went
// back: numbers only grow, over every life of the replica and also when it is made again from
// scratch (a home's exactly-once table then still accepts its deltas).
bool SyncEngine::begin_round(bool every_slice) {
  SegmentHeader& h = segment_.header();
  last_round_ = std::chrono::steady_clock::now();
  records_at_last_round_ = load_counter(h.records_applied);
  const std::uint64_t seq = std::max(load_own(h.sync_seq) + 1, unix_ns());
  store_release(h.sync_seq, seq);
  bool any = false;
  for (std::uint64_t s = 0; s < h.slice_count; ++s) {
    SyncSlice& sync = segment_.sync_slice(s);
    if (sync.home == group_ || load_own(sync.sent_seq) > load_own(sync.synced_seq)) continue;
    const SliceEntry& slice = segment_.slice(s);
    const bool stale = seq - load_own(sync.synced_seq) >= refresh_after_ns_;
    if (!every_slice && !stale && load_own(slice.version) == sync.clean_version) continue;
    any = true;
    const ParamEntry& p = segment_.param(slice.param);
    const float* values = segment_.values(p) + slice.first;
    const float* base = segment_.sync_base(p) + slice.first;
    float* sent = segment_.sync_sent(p) + slice.first;
    for (std::uint64_t k = 0; k < slice.count; ++k) sent[k] = values[k] - base[k];
    store_release(sync.sent_seq, seq);
    to_send_.push_back(s);
    ++in_flight_;
  }
  if (any) h.sync_rounds.fetch_add(1, std::memory_order_relaxed);
  return any;
}

bool SyncEngine::send_pending() {
  if (to_send_.empty()) return false;
  SegmentHeader& h = segment_.header();
  std::size_t kept = 0;
  bool did = false;
  for (std::size_t i = 0; i < to_send_.size(); ++i) {
    const std::uint64_t s = to_send_[i];
    const SyncSlice& sync = segment_.sync_slice(s);
    if (load_own(sync.sent_seq) <= load_own(sync.synced_seq)) continue;  // answered already (sent by an earlier server)
    const SliceEntry& slice = segment_.slice(s);
    float* payload = transport_->try_claim(sync.home, RecordKind::sync_delta, s, load_own(sync.sent_seq), slice.count, 0);
    if (payload == nullptr) {  // no room yet (or the home's server has never been up): later
      to_send_[kept++] = s;
      continue;
    }
    std::memcpy(payload, segment_.sync_sent(segment_.param(slice.param)) + slice.first, slice.count * sizeof(float));
    kill_point("sync.before_send");
    transport_->commit(sync.home, RecordKind::sync_delta);
    h.sync_sent.fetch_add(1, std::memory_order_relaxed);
    h.sync_bytes.fetch_add(record_bytes_for(slice.count), std::memory_order_relaxed);
    did = true;
  }
  to_send_.resize(kept);
  return did;
}

// A record from group `from`: checked (another server wrote it, but a wrong one must not make
// this one write outside a slice), then handled. False: stop here, hand it again later.
bool SyncEngine::handle(std::uint32_t from, const PushRecord& r) {
  const SegmentHeader& h = segment_.header();
  const bool known_slice = r.offset < h.slice_count && r.count == segment_.slice(r.offset).count;
  const char* problem = nullptr;
  if (!known_slice) problem = "names no slice of this model (another job's server?)";
  else if (r.generation != from) problem = "says it comes from another group than the one that sent it";
  else if (r.kind == RecordKind::sync_delta && segment_.sync_slice(r.offset).home != group_) problem = "is a delta for a slice this group is not home of";
  else if (r.kind == RecordKind::sync_fresh && segment_.sync_slice(r.offset).home != from) problem = "holds values of a slice its sender is not home of";
  if (problem != nullptr) {
    if (warned_bad_records_++ < 10)
      spdlog::error("event=sync_record_refused segment={} from_group={} slice={} seq={} reason=\"the record {}; it is "
                    "skipped\"", h.name, from, r.offset, r.seq, problem);
    return true;
  }
  if (r.kind == RecordKind::sync_delta) return add_delta(from, r);
  take_fresh(r);
  return true;
}

// Completes a sync write whose new values (and, for a take, fresh base) are in `e`: names it in the
// entry, marks it valid (from here on a restarted server finishes it), copies it in under the
// slice's seqlock with its table entries (redo.hpp), and clears the mark.
void SyncEngine::copy_in_through_redo(RedoEntry& e, RedoTarget target, std::uint64_t s, std::uint64_t seq,
                                      std::uint32_t origin, std::uint64_t clean_version) {
  const SliceEntry& slice = segment_.slice(s);
  e.target = target;
  e.mode = RedoMode::whole;
  e.slice = s;
  e.count = slice.count;
  e.version_after = load_own(slice.version) + 2;
  e.step_after = slice.step;
  e.clock_after = 0;
  e.sync_seq = seq;
  e.sync_origin = origin;
  e.sync_clean_version = clean_version;
  store_release(e.valid, 1U);
  copy_in(segment_, e);
  store_release(e.valid, 0U);
}

// As home: adds the delta once (atomically with its exactly-once entry), then answers with the
// slice's values and version, also for a delta added before (its requester lost the answer, or
// sent it again). The answer's room is claimed first: without it nothing is done, and the delta
// is handed again later. A zero delta (a refresh) writes nothing: a slice nobody wrote keeps
// version 0, which an init = "put" parameter's pulls wait on.
bool SyncEngine::add_delta(std::uint32_t from, const PushRecord& r) {
  SegmentHeader& h = segment_.header();
  const std::uint64_t s = r.offset;
  SliceEntry& slice = segment_.slice(s);
  const ParamEntry& p = segment_.param(slice.param);
  float* values = segment_.values(p) + slice.first;
  float* answer = transport_->try_claim(from, RecordKind::sync_fresh, s, r.seq, slice.count, 0);
  if (answer == nullptr) return false;  // no room to answer yet: handed again once the requester took some
  const float* delta = record_payload(&r);
  const bool zero = std::all_of(delta, delta + slice.count, [](float d) { return d == 0.0f; });
  if (segment_.sync_applied(s, from) >= r.seq) {
    h.sync_duplicates.fetch_add(1, std::memory_order_relaxed);
  } else if (!zero) {
    RedoEntry& e = segment_.redo(0);
    store_release(e.valid, 0U);  // never filled while marked valid
    float* next = segment_.redo_values(e);
    for (std::uint64_t k = 0; k < slice.count; ++k) next[k] = values[k] + delta[k];
    copy_in_through_redo(e, RedoTarget::sync_add, s, r.seq, from, 0);
    h.sync_added.fetch_add(1, std::memory_order_relaxed);
  }
  std::memcpy(answer, values, slice.count * sizeof(float));
  reinterpret_cast<PushRecord*>(answer)[-1].clock = load_own(slice.version);  // the answer's header
  kill_point("sync.before_answer");
  transport_->commit(from, RecordKind::sync_fresh);
  h.sync_bytes.fetch_add(record_bytes_for(slice.count), std::memory_order_relaxed);
  return true;
}

// As requester: the home's values plus what this group applied since it sent the delta.
void SyncEngine::take_fresh(const PushRecord& r) {
  SegmentHeader& h = segment_.header();
  const std::uint64_t s = r.offset;
  SyncSlice& sync = segment_.sync_slice(s);
  if (r.seq != load_own(sync.sent_seq) || load_own(sync.synced_seq) >= r.seq) return;  // an answer taken before
  SliceEntry& slice = segment_.slice(s);
  if (r.clock == 0 && load_own(slice.version) == 0) {
    // Nobody has written the slice, here or at home (an init = "put" parameter not put yet):
    // nothing to take, and its version stays 0 so that its pulls still wait.
    store_release(sync.synced_seq, r.seq);
    if (--in_flight_ == 0) store_release(h.last_sync_unix_ns, unix_ns());
    return;
  }
  const ParamEntry& p = segment_.param(slice.param);
  const float* values = segment_.values(p) + slice.first;
  const float* base = segment_.sync_base(p) + slice.first;
  const float* sent = segment_.sync_sent(p) + slice.first;
  const float* fresh = record_payload(&r);
  RedoEntry& e = segment_.redo(0);
  store_release(e.valid, 0U);  // never filled while marked valid
  float* next = segment_.redo_values(e);
  bool unchanged = true;  // this group's workers wrote nothing to the slice while its delta was away
  for (std::uint64_t k = 0; k < slice.count; ++k) {
    const float local = values[k] - base[k] - sent[k];
    unchanged = unchanged && local == 0.0f;
    next[k] = fresh[k] + local;
  }
  std::memcpy(segment_.redo_sync_base(e), fresh, slice.count * sizeof(float));
  // clean_version 0: still changed, so the slice goes in the next round.
  copy_in_through_redo(e, RedoTarget::sync_take, s, r.seq, static_cast<std::uint32_t>(r.generation),
                       unchanged ? load_own(slice.version) + 2 : 0);
  h.sync_taken.fetch_add(1, std::memory_order_relaxed);
  if (--in_flight_ == 0) store_release(h.last_sync_unix_ns, unix_ns());
}

}  // namespace shmps::server
