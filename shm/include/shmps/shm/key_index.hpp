// The key index of a table with open-ended keys (keys = "u64"; the layout is KeySlot,
// KeyIndexHeader and KeyBucket in layout.hpp): open addressing with linear probing, at most half
// full (ParamEntry::key_buckets is at least twice the slots), deleted with backward shifts so
// that no tombstones build up however many keys come and go.
//
// Workers look keys up lock-free and read-only under the index's seqlock (find_key_slots); only
// the server changes it, once per apply round (KeyIndexWriter). The index is derived: KeySlot[]
// is the truth, and the server rebuilds the index from it at every start (rebuild_key_index), so
// a server killed while it changes the index loses nothing.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>

#include <shmps/shm/segment.hpp>

namespace shmps::shm {

inline constexpr std::uint64_t kNoKeySlot = UINT64_MAX;

// Where a key's probe starts: the SplitMix64 output function of the key, masked.
std::uint64_t key_bucket_of(std::uint64_t key, std::uint64_t buckets) noexcept;

// Reader side: slots[k] = the slot keys[k] is in, or kNoKeySlot, looked up 64 keys per seqlock
// read of the index (a read that overlaps the server's change, once a round, is read again; a
// longer one would overlap it more often). False if the index stayed in the middle of a change
// for `timeout` (a server killed while changing it; the next one rebuilds it). The slot must still be checked against its KeySlot under the slice's seqlock: the server
// may give it to another key after this returns (read_keyed_rows does both).
bool find_key_slots(const Segment& segment, const ParamEntry& table, std::span<const std::uint64_t> keys,
                    std::span<std::uint64_t> slots, std::chrono::milliseconds timeout);

// The row a key not in any slot reads as: element d is the table's init of element key * dim + d.
void keyed_init_row(const KeyedInit& init, std::uint64_t key, std::span<float> row) noexcept;

// Server side: the only writer. begin() makes the index's seqlock word odd, end() even again; in
// between, erase() and insert() change it (a key erased or inserted once per round at most).
class KeyIndexWriter {
 public:
  KeyIndexWriter(Segment& segment, const ParamEntry& table) noexcept;
  // The slot of `key`, or kNoKeySlot (the server's own look, no seqlock needed).
  std::uint64_t find(std::uint64_t key) const noexcept;
  // Fetches key's first bucket into the cache (a find of it a few keys later misses less).
  void prefetch(std::uint64_t key) const noexcept { __builtin_prefetch(&buckets_[key_bucket_of(key, mask_ + 1)]); }
  void begin() noexcept;
  void insert(std::uint64_t key, std::uint64_t slot) noexcept;  // key must not be in the index
  // Removes key's entry for `slot`; false (nothing changed) if there is none.
  bool erase(std::uint64_t key, std::uint64_t slot) noexcept;
  void end() noexcept;
  // Empties the index and inserts every taken slot's key (KeySlot::stamp != 0), between begin
  // and end. A key in two slots (never written so; a damaged segment) is indexed at the first.
  void rebuild() noexcept;

 private:
  Segment& segment_;
  const ParamEntry& table_;
  KeyBucket* buckets_;
  std::uint64_t mask_;
  std::uint64_t before_ = 0;
};

}  // namespace shmps::shm
