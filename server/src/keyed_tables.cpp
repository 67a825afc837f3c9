#include "keyed_tables.hpp"

#include <algorithm>


#include <shmps/shm/atomics.hpp>
#include <shmps/shm/key_index.hpp>
#include <shmps/shm/killpoint.hpp>
#include <shmps/shm/ring.hpp>

namespace shmps::server {

using namespace shmps::shm;

namespace {
constexpr std::uint32_t kNil = UINT32_MAX;
// How many keys waiting for admission a table remembers: as many as it has slots. Past that the
// counts start again (a key seen once among millions is what admit_after is there to keep out).
constexpr std::uint64_t kCountsPerSlot = 1;
constexpr std::uint32_t kAhead = 8;  // keys looked up ahead (prefetched) in pass 1
}  // namespace

KeyedTables::KeyedTables(Segment& segment) : segment_(segment) {
  for (std::uint32_t i = 0; i < segment.header().param_count; ++i) {
    const ParamEntry& p = segment.param(i);
    if (!is_keyed(p)) continue;
    Table t;
    t.param = i;
    t.rows = p.shape[0];
    t.prev.resize(t.rows);
    t.next.resize(t.rows);
    t.touched_round.assign(t.rows, 0);
    t.keyed_row.resize(t.rows);
    tables_.push_back(std::move(t));
  }
  rebuild();
}

KeyedTables::Table* KeyedTables::table_of(std::uint32_t param) noexcept {
  for (Table& t : tables_)
    if (t.param == param) return &t;
  return nullptr;
}

void KeyedTables::rebuild() {
  for (Table& t : tables_) {
    const ParamEntry& p = segment_.param(t.param);
    KeyIndexWriter index(segment_, p);
    index.begin();
    index.rebuild();
    index.end();
    const KeySlot* slots = segment_.key_slots(p);
    std::vector<std::uint32_t> order(t.rows);
    for (std::uint32_t s = 0; s < t.rows; ++s) order[s] = s;
    std::sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) {
      return slots[a].stamp != slots[b].stamp ? slots[a].stamp < slots[b].stamp : a < b;
    });
    std::uint64_t held = 0;
    t.next_stamp = 1;
    for (std::size_t i = 0; i < order.size(); ++i) {
      t.prev[order[i]] = i == 0 ? kNil : order[i - 1];
      t.next[order[i]] = i + 1 == order.size() ? kNil : order[i + 1];
      if (slots[order[i]].stamp != 0) ++held;
      t.next_stamp = std::max(t.next_stamp, slots[order[i]].stamp + 1);
    }
    t.head = order.front();
    t.tail = order.back();
    store_release(segment_.param_stats(t.param).keys_held, held);
  }
}

void KeyedTables::move_to_tail(Table& t, std::uint32_t slot) noexcept {
  if (t.tail == slot) return;
  const std::uint32_t before = t.prev[slot], after = t.next[slot];
  if (before != kNil) t.next[before] = after; else t.head = after;
  t.prev[after] = before;  // after != kNil: slot is not the tail
  t.prev[slot] = t.tail;
  t.next[slot] = kNil;
  t.next[t.tail] = slot;
  t.tail = slot;
}

std::uint32_t KeyedTables::touch(Table& t, std::uint32_t slot, std::uint64_t key, bool fresh, RoundPlan& plan) {
  if (t.touched_round[slot] == round_) return t.keyed_row[slot];
  t.touched_round[slot] = round_;
  move_to_tail(t, slot);
  t.keyed_row[slot] = static_cast<std::uint32_t>(plan.keyed_rows.size());
  plan.keyed_rows.push_back({key, t.next_stamp++, fresh});
  return t.keyed_row[slot];
}

void KeyedTables::translate(RoundPlan& plan) {
  if (tables_.empty()) return;
  // The records to translate, in collection order; the other contributions stay where they are.
  thread_local std::vector<Contribution> keyed;
  keyed.clear();
  std::size_t kept = 0;
  for (const Contribution& c : plan.contributions) {
    if (c.slice == kKeysToTranslate)
      keyed.push_back(c);
    else
      plan.contributions[kept++] = c;
  }
  plan.contributions.resize(kept);
  if (keyed.empty()) return;
  ++round_;
  for (Table& t : tables_) {
    t.admitted_now.clear();
    t.changes.clear();
  }
  // The round's keys, read out of the rings once (a worker may still write its ring's bytes after
  // a commit: a key read twice could differ), with each record's table and row count as the
  // collector checked them (Contribution::rows_begin and rows_count). Each key's slot for the
  // round goes beside it (kNoKeySlot: its rows are dropped).
  thread_local std::vector<std::uint64_t> keys, slot_of;
  keys.clear();
  for (const Contribution& c : keyed) {
    const std::uint64_t* ring_keys = record_ids(c.record);
    for (std::uint32_t k = 0; k < c.rows_count; ++k) keys.push_back(ring_keys[k]);
  }
  slot_of.assign(keys.size(), kNoKeySlot);
  // Pass 1: keys that hold a slot.
  std::size_t at = 0;
  for (const Contribution& c : keyed) {
    Table& t = *table_of(static_cast<std::uint32_t>(c.rows_begin));
    const KeyIndexWriter index(segment_, segment_.param(t.param));
    for (std::uint32_t k = 0; k < c.rows_count; ++k, ++at) {
      if (k + kAhead < c.rows_count) index.prefetch(keys[at + kAhead]);  // the index's misses overlap
      const std::uint64_t slot = index.find(keys[at]);
      if (slot == kNoKeySlot) continue;
      slot_of[at] = slot;
      touch(t, static_cast<std::uint32_t>(slot), keys[at], false, plan);
    }
  }
  // Pass 2: the others, admitted (or not) in order.
  at = 0;
  for (const Contribution& c : keyed) {
    Table& t = *table_of(static_cast<std::uint32_t>(c.rows_begin));
    const ParamEntry& p = segment_.param(t.param);
    const KeySlot* slots = segment_.key_slots(p);
    for (std::uint32_t k = 0; k < c.rows_count; ++k, ++at) {
      if (slot_of[at] != kNoKeySlot) continue;
      const std::uint64_t key = keys[at];
      if (const auto it = t.admitted_now.find(key); it != t.admitted_now.end()) {
        slot_of[at] = it->second;
        continue;
      }
      if (p.admit_after > 1) {
        if (t.admission_counts.size() >= t.rows * kCountsPerSlot) t.admission_counts.clear();
        std::uint32_t& count = t.admission_counts[key];
        if (++count < p.admit_after) {
          ++t.refused_rows;
          continue;
        }
        t.admission_counts.erase(key);
      }
      // The least recently updated slot, unless this round has touched it (touched slots are at
      // the tail: then every slot holds a key of this round).
      const std::uint32_t victim = t.head;
      if (t.touched_round[victim] == round_) {
        ++t.refused_rows;
        continue;
      }
      const bool evicts = slots[victim].stamp != 0;
      t.changes.push_back({key, victim, evicts, evicts ? slots[victim].key : 0});
      t.admitted_now.emplace(key, victim);
      slot_of[at] = victim;
      touch(t, victim, key, true, plan);
    }
  }
  // Pass 3: each record's rows, sorted by slot, as per-slice contributions.
  thread_local std::vector<std::pair<std::uint64_t, std::uint32_t>> order;
  at = 0;
  for (const Contribution& c : keyed) {
    Table& t = *table_of(static_cast<std::uint32_t>(c.rows_begin));
    const ParamEntry& p = segment_.param(t.param);
    const std::uint64_t rows_per_slice = segment_.header().slice_floats / p.table_dim;
    order.clear();
    for (std::uint32_t k = 0; k < c.rows_count; ++k, ++at)
      if (slot_of[at] != kNoKeySlot) order.emplace_back(slot_of[at], k);
    std::sort(order.begin(), order.end());
    for (std::size_t i = 0; i < order.size();) {
      const std::uint64_t slice = order[i].first / rows_per_slice;
      const std::uint64_t begin = plan.row_refs.size(), first_row = slice * rows_per_slice;
      for (; i < order.size() && order[i].first / rows_per_slice == slice; ++i)
        plan.row_refs.push_back({order[i].second, static_cast<std::uint32_t>(order[i].first - first_row),
                                 t.keyed_row[order[i].first] + 1});
      plan.contributions.push_back(
          {p.first_slice + slice, c.rank, c.record, begin, static_cast<std::uint32_t>(plan.row_refs.size() - begin)});
    }
  }
}

void KeyedTables::publish_index() {
  for (Table& t : tables_) {
    ParamStats& stats = segment_.param_stats(t.param);
    if (t.refused_rows != 0) {
      stats.keys_refused_rows.fetch_add(t.refused_rows, std::memory_order_relaxed);
      t.refused_rows = 0;
    }
    if (t.changes.empty()) continue;
    KeyIndexWriter index(segment_, segment_.param(t.param));
    std::uint64_t evicted = 0;
    index.begin();
    for (const auto& change : t.changes) {
      if (!change.evicts) continue;
      index.erase(change.evicted, change.slot);
      ++evicted;
    }
    kill_point("keys.mid_index");  // tests: the index half changed (the next server rebuilds it)
    for (const auto& change : t.changes) index.insert(change.key, change.slot);
    index.end();
    stats.keys_admitted.fetch_add(t.changes.size(), std::memory_order_relaxed);
    stats.keys_evicted.fetch_add(evicted, std::memory_order_relaxed);
    stats.keys_held.fetch_add(t.changes.size() - evicted, std::memory_order_relaxed);
    t.changes.clear();
  }
}

}  // namespace shmps::server
