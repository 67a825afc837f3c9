// Tables with open-ended keys (keys = "u64"): which slot each pushed key goes to, admission and
// eviction, and the key index the workers look keys up in (shm/key_index.hpp; the layout is in
// layout.hpp, KeySlot). The server's only writer of both.
//
// A round's keyed rows records are taken by the collectors as they are (kKeysToTranslate), and
// turned into slots here once every ring has been read (translate), in three passes over the
// round's keys in collection order:
//   1. keys that hold a slot: the slot is theirs for the round (touched: it cannot be evicted);
//   2. keys that hold none: counted (admit_after), and once admitted given the least recently
//      updated slot not touched in this round (a free one first), whose old key is evicted; a key
//      not admitted (yet, or every slot touched) has its rows dropped and counted;
//   3. each record's rows as per-slice contributions, with the slot's KeyedRow (its key, its new
//      stamp, and fresh: admitted now, so its row starts from the key's init).
// The apply writes each touched slot's KeySlot with its row, through the redo entry; then
// publish_index changes the index (evicted keys out, admitted ones in) under its seqlock, before
// the round is published.
//
// Exactly once through a crash: the KeySlots are the truth, and a restarted server rebuilds the
// index and the recency order from them (rebuild). A round re-run after a crash (its records
// still in the rings, perhaps with more records now, read in another order) finds the keys its
// first attempt admitted in the slices it committed (pass 1), and the apply skips those slices'
// records (the exactly-once table): those keys' rows went in once, the first time. A key that
// holds no slot now had none of its rows of the round taken by any slot (a slot that had would
// name it, its KeySlot going in with its rows, and a key pushed in a round is never evicted in
// it), so it is admitted again, to whichever slot the re-run picks, and the apply takes its rows
// there even in a slice that skips the record's other rows (apply.cpp, apply_rows). (Admission
// counts are the server's memory only: after a restart they start again from zero, so a key may
// need admit_after more rows.)
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include <shmps/shm/segment.hpp>

#include "round.hpp"

namespace shmps::server {

class KeyedTables {
 public:
  explicit KeyedTables(shm::Segment& segment);
  bool any() const noexcept { return !tables_.empty(); }

  // From the KeySlots: the index (under its seqlock), the recency order, the next stamp. At
  // every server start (after the redo repair and any restore), and after a round that skipped
  // contributions (a re-run after a crash), whose order the KeySlots then define.
  void rebuild();
  // Turns the plan's kKeysToTranslate contributions into slots, rows and contributions (above).
  void translate(RoundPlan& plan);
  // After the round's apply: the index changes of translate(), and the counters.
  void publish_index();

 private:
  struct Table {
    std::uint32_t param;
    std::uint64_t rows;
    // The recency order of the slots, least recently updated first: a doubly linked list over
    // slot numbers (kNil ends it), in the order of their stamps.
    std::vector<std::uint32_t> prev, next;
    std::uint32_t head = 0, tail = 0;
    std::uint64_t next_stamp = 1;
    std::vector<std::uint64_t> touched_round;  // the round that last touched each slot
    std::vector<std::uint32_t> keyed_row;      // that round's KeyedRow of the slot
    std::unordered_map<std::uint64_t, std::uint32_t> admission_counts;  // keys not yet admitted
    std::unordered_map<std::uint64_t, std::uint32_t> admitted_now;       // this round's: key -> slot
    struct Change {
      std::uint64_t key;
      std::uint32_t slot;
      bool evicts;
      std::uint64_t evicted;
    };
    std::vector<Change> changes;  // this round's admissions, for publish_index
    std::uint64_t refused_rows = 0;
  };
  Table* table_of(std::uint32_t param) noexcept;
  void move_to_tail(Table& t, std::uint32_t slot) noexcept;
  // The slot's KeyedRow for this round (the first touch gives it its stamp).
  std::uint32_t touch(Table& t, std::uint32_t slot, std::uint64_t key, bool fresh, RoundPlan& plan);

  shm::Segment& segment_;
  std::vector<Table> tables_;
  std::uint64_t round_ = 0;
};

}  // namespace shmps::server
