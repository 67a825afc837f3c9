// The two views of a push ring (layout in layout.hpp): the producer's, used only by the worker
// that holds the slot, and the consumer's, used only by the server. iceoryx-style: the data is
// plain (RingHeader + bytes), and each side gets a class with only what it may do.
#pragma once

#include <cstdint>
#include <utility>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/layout.hpp>

namespace shmps::shm {

// Worker side. Not thread-safe; one producer per ring by construction (the slot lock).
class RingProducer {
 public:
  RingProducer() = default;
  RingProducer(RingHeader* header, std::byte* data) noexcept
      : header_(header), data_(data), capacity_(header->capacity), tail_(load_own(header->tail)) {}

  // The largest payload (floats) a single record may carry: half the ring, so that a record plus
  // the padding before it always fits in an empty ring.
  std::uint64_t max_record_floats() const noexcept {
    return (capacity_ / 2 - sizeof(PushRecord)) / sizeof(float);
  }

  // Reserves room for a record of `count` floats. Returns its (uncommitted, invisible) header,
  // or nullptr if the consumer has not freed enough room yet. May write a padding record first;
  // it becomes visible together with the record at commit().
  //
  // When the ring is empty, a record that fits before the current position starts over at the
  // ring's beginning (after a padding record to the end): a worker whose pushes the server keeps
  // up with then writes the same few cache-hot, already-mapped lines again and again, instead of
  // walking the whole ring through the caches and the TLB. The price: until the server has
  // consumed that padding (its next round), only the bytes before the old position are free, so
  // a worker whose server is stalled can queue less than a whole ring after a start-over.
  PushRecord* try_claim(std::uint64_t count) noexcept { return try_claim_bytes(record_bytes_for(count)); }
  // The same for a record of `need` bytes (a multiple of 64): a rows record (rows_record_bytes).
  PushRecord* try_claim_bytes(std::uint64_t need) noexcept {
    std::uint64_t pos = tail_;
    const std::uint64_t to_end = capacity_ - pos % capacity_;
    const std::uint64_t head = load_acquire(header_->head);  // bytes before head are free again
    const bool start_over = head == pos && pos % capacity_ != 0 && need <= pos % capacity_;
    const std::uint64_t pad = to_end < need || start_over ? to_end : 0;
    if (start_over) {
      start_over_from_ = pos;
      start_over_to_ = pos + pad;
    }
    if (capacity_ - (pos - head) < pad + need) return nullptr;
    if (pad != 0) {
      auto* filler = reinterpret_cast<PushRecord*>(data_ + pos % capacity_);
      filler->kind = RecordKind::padding;
      filler->record_bytes = pad;
      pos += pad;
    }
    auto* record = reinterpret_cast<PushRecord*>(data_ + pos % capacity_);
    record->kind = RecordKind::push;
    record->record_bytes = need;
    pending_tail_ = pos + need;
    return record;
  }

  // Makes the claimed record (and any padding before it) visible with one release store.
  void commit() noexcept {
    tail_ = pending_tail_;
    store_release(header_->tail, tail_);
  }

  // `position`, or the end of the start-over padding that begins there: where the records
  // written from `position` on begin. (A BSP step that starts over begins after the padding,
  // which the server gives back at once; only the step's own records can fill the ring.)
  std::uint64_t past_start_over(std::uint64_t position) const noexcept {
    return position == start_over_from_ ? start_over_to_ : position;
  }

  // Gives up the claimed record: nothing was stored to the shared tail, so the bytes written past
  // it stay invisible, and the next try_claim() starts at the same place.
  void abandon() noexcept {
    pending_tail_ = tail_;
    if (start_over_to_ != UINT64_MAX && start_over_to_ > tail_)  // its start-over padding was never committed
      start_over_from_ = start_over_to_ = UINT64_MAX;
  }

  std::uint64_t capacity() const noexcept { return capacity_; }
  std::uint64_t tail() const noexcept { return tail_; }
  std::uint64_t head() const noexcept { return load_acquire(header_->head); }

 private:
  RingHeader* header_ = nullptr;
  std::byte* data_ = nullptr;
  std::uint64_t capacity_ = 0;
  std::uint64_t tail_ = 0;          // last committed position (we are the only writer)
  std::uint64_t pending_tail_ = 0;  // position after the claimed record
  std::uint64_t start_over_from_ = UINT64_MAX, start_over_to_ = UINT64_MAX;  // the last start-over padding
};

// Server side.
class RingConsumer {
 public:
  RingConsumer() = default;
  RingConsumer(RingHeader* header, const std::byte* data) noexcept
      : header_(header), data_(data), capacity_(header->capacity) {}
  // A ring of a sync segment (sync_segment.hpp): its records are sync records, never a worker's.
  static RingConsumer for_sync(RingHeader* header, const std::byte* data) noexcept {
    RingConsumer c(header, data);
    c.sync_ = true;
    return c;
  }

  // The head as its owner, the server, reads it back (it is the only writer).
  std::uint64_t head() const noexcept { return load_own(header_->head); }
  // The head as another process reads it: a worker looking, at attach, at what its ring still
  // holds. Acquire: what the server wrote before it released these bytes (the slot's resume blob
  // of a clock record it consumed) is visible once this position is.
  std::uint64_t head_acquire() const noexcept { return load_acquire(header_->head); }
  // Everything before the returned position is committed and may be read.
  std::uint64_t committed() const noexcept { return load_acquire(header_->tail); }
  const PushRecord* record_at(std::uint64_t position) const noexcept {
    return reinterpret_cast<const PushRecord*>(data_ + position % capacity_);
  }
  // Whether a record header read at `position` is well formed (a buggy worker must not be able
  // to make the server read outside the ring).
  bool plausible(std::uint64_t position, std::uint64_t end) const noexcept {
    const PushRecord* r = record_at(position);
    const std::uint64_t to_end = capacity_ - position % capacity_;
    return r->record_bytes >= sizeof(PushRecord) && r->record_bytes % kCacheLine == 0 &&
           r->record_bytes <= to_end && r->record_bytes <= end - position &&  // position < end: no wrap past 2^64
           (r->kind == RecordKind::padding ||
            (!sync_ && (r->kind == RecordKind::push || r->kind == RecordKind::put) &&
             record_bytes_for(r->count) == r->record_bytes) ||
            (!sync_ && r->kind == RecordKind::rows && rows_record_plausible(*r)) ||
            (sync_ && (r->kind == RecordKind::sync_delta || r->kind == RecordKind::sync_fresh) &&
             record_bytes_for(r->count) == r->record_bytes) ||
            (!sync_ && r->kind == RecordKind::clock && record_bytes_for(r->count) == r->record_bytes &&
             r->offset <= r->count * sizeof(float) && r->offset <= kResumeBlobBytes));
  }
  // The one consumer walk over a ring (Aeron's read(handler)): calls
  //   bool handler(std::uint64_t position, const PushRecord& record)
  // for each committed record in [from, to), in order, padding records included. The handler
  // returns false to stop at that record (it counts as not read). The walk also stops at the
  // first malformed record: a buggy or hostile worker cannot make the server read outside the
  // ring. Nothing is released: the caller gives bytes back with release_to() once applied.
  struct ReadResult {
    std::uint64_t stopped_at;  // `to`, or the record the handler refused, or the malformed one
    bool malformed;            // stopped_at is a malformed record: nothing from there on is readable
  };
  template <class Handler>
  ReadResult read(std::uint64_t from, std::uint64_t to, Handler&& handler) const {
    // A tail more than a ring ahead of the head is no tail a producer can commit (it never has
    // more than `capacity` bytes outstanding): without this, a hostile worker's tail made the
    // walk go round the ring again, reading (and applying) its records twice, or for 2^62 bytes,
    // hanging the server (found with fuzz_ring_records). A tail behind the head holds nothing.
    if (to > from && to - from > capacity_) return {from, true};
    std::uint64_t position = from;
    while (position < to) {
      if (!plausible(position, to)) return {position, true};
      const PushRecord& record = *record_at(position);
      if (!handler(position, record)) return {position, false};
      position += record.record_bytes;
    }
    return {position, false};
  }
  // Everything committed and not yet released.
  template <class Handler>
  ReadResult read(Handler&& handler) const {
    return read(head(), committed(), std::forward<Handler>(handler));
  }

  // Gives the bytes before `position` back to the producer. Call only once they are applied.
  void release_to(std::uint64_t position) noexcept { store_release(header_->head, position); }

 private:
  RingHeader* header_ = nullptr;
  const std::byte* data_ = nullptr;
  std::uint64_t capacity_ = 0;
  bool sync_ = false;  // a sync segment's ring: sync records only
};

inline const float* record_payload(const PushRecord* record) noexcept {
  return reinterpret_cast<const float*>(record + 1);
}
inline float* record_payload(PushRecord* record) noexcept { return reinterpret_cast<float*>(record + 1); }
// A rows record's ids, after its rows (layout.hpp, RecordKind::rows).
inline const std::uint64_t* record_ids(const PushRecord* record) noexcept {
  return reinterpret_cast<const std::uint64_t*>(reinterpret_cast<const std::byte*>(record) + record_bytes_for(record->count));
}
inline std::uint64_t* record_ids(PushRecord* record) noexcept {
  return reinterpret_cast<std::uint64_t*>(reinterpret_cast<std::byte*>(record) + record_bytes_for(record->count));
}

}  // namespace shmps::shm
