// The round plan: what one apply round takes from the rings, and what it hands the apply engine
// and the publisher.
//
// A round is: collect (collect.hpp) fills a RoundPlan from the rings; the apply engine
// (apply.hpp) applies its contributions to the slices; the publisher (publish.hpp) moves each
// ring's head to its RankRound::end and tells the workers. Nothing is published before the
// apply is done, so a server killed mid-round leaves every ring as it was (the redo protocol
// and the exactly-once table handle the slices it had written, redo.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <shmps/shm/layout.hpp>

namespace shmps::server {

// A row of a rows record in one slice, as the collector checked it: its index in the record (its
// gradient row) and its row within the slice. The apply takes both from here, never from the
// ring again: a worker can still write its ring's bytes after the commit (a borrowed buffer's
// ids kept by mistake), and an id read a second time could point anywhere.
struct RowRef {
  std::uint32_t index;  // in the record: gradient row `index`
  std::uint32_t row;    // within the slice: its row `row` (the slice's first row + row is the id)
  // A table with keys = "u64": 1 + the row's place in RoundPlan::keyed_rows (the key the slot
  // holds after the round); 0 for a table of row numbers.
  std::uint32_t keyed = 0;
};

// A keyed table's slot that a round updates (KeyedTables::translate): the key it holds after the
// round, the stamp of this update (KeySlot::stamp), and whether the key was admitted to it in
// this round, so that its row starts from the key's init and its optimizer state from zero.
struct KeyedRow {
  std::uint64_t key;
  std::uint64_t stamp;
  bool fresh;
};

// Contribution::slice of a keyed table's rows record as a collector takes it: its keys become
// slots, and the record its per-slice contributions, only once every ring has been read
// (KeyedTables::translate), because which slot a new key gets depends on all the round's keys.
// Such a contribution's rows_begin is the table's parameter index, rows_count the record's rows.
inline constexpr std::uint64_t kKeysToTranslate = UINT64_MAX;

// One piece of apply work: the part of one push record that falls into one slice. For a rows
// record (a table's), the rows of the record in that slice: RoundPlan::row_refs[rows_begin,
// rows_begin + rows_count), in the order of their ids (and, for a repeated id, in the record's
// order).
struct Contribution {
  std::uint64_t slice;
  std::uint32_t rank;
  const shm::PushRecord* record;
  std::uint64_t rows_begin = 0;
  std::uint32_t rows_count = 0;
};

// A put record (Worker::put) a round takes: applied before the round's contributions
// (apply_put.hpp). A collector takes one only when no push of its ring comes before it in the
// round, so that order is the ring's.
struct PutTake {
  std::uint32_t rank;
  const shm::PushRecord* record;
};

// What a round takes from one worker's ring. Reset at the start of every round (begin()).
struct RankRound {
  std::uint64_t seen_tail = 0;  // the committed tail the round looked at
  std::uint64_t end = 0;        // where the ring's head moves to once the round is applied
  std::uint64_t free_to = 0;    // BSP: the end of the padding in front of the ring's first run of pushes
  std::uint64_t last_seq = 0;   // the last push sequence number the server is then done with
  std::uint64_t records = 0;    // pushes applied
  std::uint64_t discarded = 0;  // pushes discarded (a BSP step whose writer died in it)
  std::uint64_t clock = 0;      // the clock after the newest clock record the round consumes
  // Taken in front of everything else, so kept when a BSP step is not complete (take_nothing):
  std::uint64_t puts = 0;            // put records
  std::uint64_t front_discarded = 0; // pushes of a dead generation's open run, in front of a put
  std::uint64_t front_last_seq = 0;  // the newest sequence number of those
  std::uint64_t streamed_step = 0;  // streamed BSP: step + 1 when the round sums pushes of the step
  // BSP: the newest clock record of the step that carries resume state (kept once the step is
  // complete).
  const shm::PushRecord* step_state = nullptr;
  bool moved = false;           // publish: whether the round moved the ring's head

  void begin(std::uint64_t head, std::uint64_t tail) noexcept {
    *this = RankRound{};
    seen_tail = tail;
    end = head;
    free_to = head;
  }
  // Takes nothing after all (an incomplete BSP step): only leading padding is given back.
  // What was taken in front of the step with that padding (collect_step) stays taken.
  void take_nothing() noexcept {
    RankRound kept{};
    kept.seen_tail = seen_tail;
    kept.end = kept.free_to = free_to;
    kept.puts = puts;
    kept.front_discarded = front_discarded;
    kept.front_last_seq = front_last_seq;
    *this = kept;
  }
  // Takes a put record: counted with the round's records.
  void take_put(const shm::PushRecord& record) noexcept {
    ++puts;
    front_last_seq = std::max(front_last_seq, record.seq);
  }
  // The last sequence number the server is done with after this round.
  std::uint64_t done_seq() const noexcept { return std::max(last_seq, front_last_seq); }
};

struct RoundPlan {
  std::vector<RankRound> ranks;            // one per worker slot
  std::vector<Contribution> contributions; // in collection order; the apply engine sorts them
  std::vector<PutTake> puts;               // in collection order; applied first
  std::vector<RowRef> row_refs;            // the rows of the rows records' contributions (Contribution)
  std::vector<KeyedRow> keyed_rows;        // keyed tables: the slots the round updates (RowRef::keyed)

  // Records taken: pushes applied and puts.
  std::uint64_t records() const noexcept {
    std::uint64_t n = 0;
    for (const auto& r : ranks) n += r.records + r.puts;
    return n;
  }
  std::uint64_t discarded() const noexcept {
    std::uint64_t n = 0;
    for (const auto& r : ranks) n += r.discarded + r.front_discarded;
    return n;
  }
};

}  // namespace shmps::server
