#include "shmps/shm/key_index.hpp"

#include <algorithm>
#include <thread>

#include <shmps/shm/seqlock.hpp>
#include <shmps/splitmix.hpp>

namespace shmps::shm {

namespace {

// Buckets are read while the server may write them (the seqlock discards such reads): relaxed
// atomic loads and stores, plain moves on x86, and no data race for ThreadSanitizer.
std::uint64_t load_word(const std::uint64_t& w) noexcept { return __atomic_load_n(&w, __ATOMIC_RELAXED); }
void store_word(std::uint64_t& w, std::uint64_t v) noexcept { __atomic_store_n(&w, v, __ATOMIC_RELAXED); }

}  // namespace

std::uint64_t key_bucket_of(std::uint64_t key, std::uint64_t buckets) noexcept {
  return splitmix_mix(key) & (buckets - 1);
}

namespace {

// Keys [first, last) in one seqlock read of the index, retried while it changes.
bool find_group(const KeyBucket* buckets, std::uint64_t mask, const std::atomic<std::uint64_t>& seq,
                std::span<const std::uint64_t> keys, std::span<std::uint64_t> slots, std::size_t first,
                std::size_t last, std::chrono::milliseconds timeout) {
  const std::uint64_t bucket_count = mask + 1;
  // A big table's index does not stay in the cache: fetch every key's first bucket before the
  // read, so that the misses overlap instead of following one another.
  for (std::size_t k = first; k < last; ++k) __builtin_prefetch(&buckets[key_bucket_of(keys[k], bucket_count)]);
  std::chrono::steady_clock::time_point give_up{};
  for (std::uint64_t attempt = 0;; ++attempt) {
    std::uint64_t version = 0;
    const auto read = seqlock_try_read(seq, version, [&] {
      for (std::size_t k = first; k < last; ++k) {
        slots[k] = kNoKeySlot;
        // At most key_buckets probes: a torn read (discarded below) must not loop for ever.
        for (std::uint64_t b = key_bucket_of(keys[k], bucket_count), n = 0; n <= mask; b = (b + 1) & mask, ++n) {
          const std::uint64_t slot_plus_one = load_word(buckets[b].slot_plus_one);
          if (slot_plus_one == 0) break;
          if (load_word(buckets[b].key) == keys[k]) {
            slots[k] = slot_plus_one - 1;
            break;
          }
        }
      }
    });
    if (read == SeqlockRead::ok) return true;
    if (attempt == 63) give_up = std::chrono::steady_clock::now() + timeout;
    if (attempt >= 63 && (attempt & 63) == 63) {
      if (std::chrono::steady_clock::now() > give_up) return false;
      std::this_thread::yield();
    }
  }
}

}  // namespace

bool find_key_slots(const Segment& segment, const ParamEntry& table, std::span<const std::uint64_t> keys,
                    std::span<std::uint64_t> slots, std::chrono::milliseconds timeout) {
  const KeyBucket* buckets = segment.key_buckets(table);
  const std::uint64_t mask = table.key_buckets - 1;
  const auto& seq = segment.key_index(table).seq;
  constexpr std::size_t kGroup = 64;
  for (std::size_t first = 0; first < keys.size(); first += kGroup) {
    const std::size_t last = std::min(keys.size(), first + kGroup);
    if (!find_group(buckets, mask, seq, keys, slots, first, last, timeout)) return false;
  }
  return true;
}

void keyed_init_row(const KeyedInit& init, std::uint64_t key, std::span<float> row) noexcept {
  const std::uint64_t first = key * row.size();  // wraps at 2^64, as documented (KeyedInit)
  for (std::size_t d = 0; d < row.size(); ++d) {
    switch (init.kind) {
      case 1: row[d] = init.value; break;
      case 2: row[d] = u24(splitmix_draw(init.stream, first + d)) * init.scale; break;
      default: row[d] = 0.0f; break;
    }
  }
}

KeyIndexWriter::KeyIndexWriter(Segment& segment, const ParamEntry& table) noexcept
    : segment_(segment), table_(table), buckets_(segment.key_buckets(table)), mask_(table.key_buckets - 1) {}

std::uint64_t KeyIndexWriter::find(std::uint64_t key) const noexcept {
  for (std::uint64_t b = key_bucket_of(key, table_.key_buckets);; b = (b + 1) & mask_) {
    if (buckets_[b].slot_plus_one == 0) return kNoKeySlot;
    if (buckets_[b].key == key) return buckets_[b].slot_plus_one - 1;
  }
}

void KeyIndexWriter::begin() noexcept {
  auto& seq = segment_.key_index(table_).seq;
  const std::uint64_t word = seq.load(std::memory_order_relaxed);
  // Odd: a server killed between begin and end left it so. Readers already stay away; this change
  // (the next server's rebuild) goes on from there, and end() makes the word even again.
  before_ = (word & 1U) != 0 ? word - 1 : seqlock_write_begin(seq);
}
void KeyIndexWriter::end() noexcept { seqlock_write_end(segment_.key_index(table_).seq, before_, 1); }

void KeyIndexWriter::insert(std::uint64_t key, std::uint64_t slot) noexcept {
  std::uint64_t b = key_bucket_of(key, table_.key_buckets);
  while (buckets_[b].slot_plus_one != 0) b = (b + 1) & mask_;
  store_word(buckets_[b].key, key);
  store_word(buckets_[b].slot_plus_one, slot + 1);
}

bool KeyIndexWriter::erase(std::uint64_t key, std::uint64_t slot) noexcept {
  std::uint64_t hole = key_bucket_of(key, table_.key_buckets);
  for (;; hole = (hole + 1) & mask_) {
    if (buckets_[hole].slot_plus_one == 0) return false;  // the end of the run: not there
    if (buckets_[hole].key == key && buckets_[hole].slot_plus_one == slot + 1) break;
  }
  // Backward shift: every later key of the run whose probe would pass the hole moves into it.
  for (std::uint64_t b = (hole + 1) & mask_; buckets_[b].slot_plus_one != 0; b = (b + 1) & mask_) {
    const std::uint64_t home = key_bucket_of(buckets_[b].key, table_.key_buckets);
    // b's key may fill the hole if its home is not in (hole, b] (cyclically).
    const bool home_after_hole = ((b - home) & mask_) < ((b - hole) & mask_);
    if (home_after_hole) continue;
    store_word(buckets_[hole].key, buckets_[b].key);
    store_word(buckets_[hole].slot_plus_one, buckets_[b].slot_plus_one);
    hole = b;
  }
  store_word(buckets_[hole].slot_plus_one, 0);
  store_word(buckets_[hole].key, 0);
  return true;
}

void KeyIndexWriter::rebuild() noexcept {
  for (std::uint64_t b = 0; b <= mask_; ++b) {
    store_word(buckets_[b].slot_plus_one, 0);
    store_word(buckets_[b].key, 0);
  }
  const KeySlot* slots = segment_.key_slots(table_);
  for (std::uint64_t s = 0; s < table_.shape[0]; ++s)
    if (slots[s].stamp != 0 && find(slots[s].key) == kNoKeySlot) insert(slots[s].key, s);
}

}  // namespace shmps::shm
