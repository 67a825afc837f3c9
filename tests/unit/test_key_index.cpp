// The key index of a table with keys = "u64" (shm/key_index.hpp) against a plain std::map, in a
// small segment: inserts and erases in random order with many keys on few buckets (long runs,
// wrapping at the end), so that every backward shift of erase() is exercised; every key must be
// found at its slot by both the server's find() and the workers' find_key_slots(), and no erased
// key found at all. Also the rebuild from KeySlots, and the plan's refusals.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/shm/key_index.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/splitmix.hpp>

#include "../support/expect.hpp"

using namespace shmps::shm;
using shmps::test::error_of;

namespace {

struct Index {
  std::string name = "t-keyidx-" + std::to_string(::getpid());
  Segment segment = Segment::create(name, 1 << 16);
  ParamEntry table{};
  Index(std::uint64_t slots, std::uint64_t buckets) {
    table.shape[0] = slots;
    table.table_dim = 1;
    table.key_slots_offset = 4096;
    table.key_index_offset = 4096 + slots * sizeof(KeySlot);
    table.key_buckets = buckets;
  }
  ~Index() { Segment::remove(name); }
};

// Every key of `want` found at its slot, and `absent` not found, by both lookups.
void expect_index(const Index& ix, const std::map<std::uint64_t, std::uint64_t>& want, std::uint64_t absent) {
  const KeyIndexWriter server(const_cast<Segment&>(ix.segment), ix.table);
  std::vector<std::uint64_t> keys, slots;
  for (const auto& [key, slot] : want) {
    EXPECT_EQ(server.find(key), slot) << key;
    keys.push_back(key);
  }
  keys.push_back(absent);
  slots.resize(keys.size());
  ASSERT_TRUE(find_key_slots(ix.segment, ix.table, keys, slots, std::chrono::milliseconds(100)));
  for (std::size_t k = 0; k + 1 < keys.size(); ++k) EXPECT_EQ(slots[k], want.at(keys[k])) << keys[k];
  EXPECT_EQ(slots.back(), kNoKeySlot);
  EXPECT_EQ(server.find(absent), kNoKeySlot);
}

}  // namespace

TEST(KeyIndex, InsertsAndErasesInAnyOrderKeepEveryKeyFindable) {
  Index ix(64, 128);
  KeyIndexWriter index(ix.segment, ix.table);
  std::map<std::uint64_t, std::uint64_t> want;
  std::mt19937_64 rng(7);
  // Keys that share a home bucket: 64 keys on 8 homes make runs of many buckets.
  std::vector<std::uint64_t> pool;
  for (std::uint64_t k = 0; pool.size() < 400; ++k)
    if (key_bucket_of(k, 128) % 16 < 2 || key_bucket_of(k, 128) > 120) pool.push_back(k);
  std::vector<std::uint64_t> free_slots;
  for (std::uint64_t s = 0; s < 64; ++s) free_slots.push_back(s);
  for (int op = 0; op < 5000; ++op) {
    const std::uint64_t key = pool[rng() % pool.size()];
    index.begin();
    if (const auto it = want.find(key); it != want.end()) {
      EXPECT_TRUE(index.erase(key, it->second));
      free_slots.push_back(it->second);
      want.erase(it);
    } else if (!free_slots.empty()) {
      const std::uint64_t slot = free_slots.back();
      free_slots.pop_back();
      index.insert(key, slot);
      want[key] = slot;
    }
    index.end();
    if (op % 97 == 0) expect_index(ix, want, std::uint64_t{1} << 62);
  }
  expect_index(ix, want, std::uint64_t{1} << 62);
  // A key that is not there (or not at that slot) is not erased, and nothing else is touched.
  index.begin();
  EXPECT_FALSE(index.erase(std::uint64_t{1} << 62, 0));
  ASSERT_FALSE(want.empty());
  EXPECT_FALSE(index.erase(want.begin()->first, want.begin()->second + 1));
  index.end();
  expect_index(ix, want, std::uint64_t{1} << 62);
  // Rebuilt from the KeySlots alone, the index finds the same keys.
  KeySlot* slots = ix.segment.key_slots(ix.table);
  for (std::uint64_t s = 0; s < 64; ++s) slots[s] = KeySlot{0, 0};
  std::uint64_t stamp = 1;
  for (const auto& [key, slot] : want) slots[slot] = KeySlot{key, stamp++};
  index.begin();
  index.rebuild();
  index.end();
  expect_index(ix, want, std::uint64_t{1} << 62);
  // A key in two slots (a damaged segment) is indexed once, at the first: the key of the lowest
  // slot written again over the key of the highest.
  ASSERT_GE(want.size(), 2u);
  auto lowest = want.begin(), highest = want.begin();
  for (auto it = want.begin(); it != want.end(); ++it) {
    if (it->second < lowest->second) lowest = it;
    if (it->second > highest->second) highest = it;
  }
  slots[highest->second] = KeySlot{lowest->first, stamp++};
  want.erase(highest);
  index.begin();
  index.rebuild();
  index.end();
  expect_index(ix, want, std::uint64_t{1} << 62);
}

TEST(KeyIndex, AnIndexLeftMidChangeTimesOutUntilTheNextServerRebuildsIt) {
  Index ix(8, 16);
  KeyIndexWriter index(ix.segment, ix.table);
  index.begin();
  index.insert(1, 3);
  index.end();
  index.begin();  // a server killed here
  index.erase(1, 3);
  std::vector<std::uint64_t> keys{1}, slots(1);
  EXPECT_FALSE(find_key_slots(ix.segment, ix.table, keys, slots, std::chrono::milliseconds(20)));
  // The next server rebuilds it from the KeySlots, and readers find the keys again.
  ix.segment.key_slots(ix.table)[3] = KeySlot{1, 5};
  KeyIndexWriter next(ix.segment, ix.table);
  next.begin();
  next.rebuild();
  next.end();
  ASSERT_TRUE(find_key_slots(ix.segment, ix.table, keys, slots, std::chrono::milliseconds(20)));
  EXPECT_EQ(slots[0], 3u);
  EXPECT_EQ(ix.segment.key_index(ix.table).seq.load() % 2, 0u);
}

TEST(KeyIndex, TheInitOfAKeyBelowTheRowsIsThatRowsInit) {
  KeyedInit init{2, 0.0f, 24, 1.0f / 64, 0};
  std::vector<float> row(16);
  keyed_init_row(init, 5, row);
  for (std::uint64_t d = 0; d < 16; ++d) EXPECT_EQ(row[d], shmps::u24(shmps::splitmix_draw(24, 5 * 16 + d)) / 64);
  keyed_init_row(KeyedInit{1, 0.25f, 0, 0, 0}, ~std::uint64_t{0}, row);
  for (float v : row) EXPECT_EQ(v, 0.25f);
}

TEST(KeyIndex, ThePlanRefusesKeysWhereTheyCannotWork) {
  LayoutRequest request;
  request.params.push_back({"t", {64, 4}, false, 4, DType::f32, {}});
  request.params.back().keyed = true;
  request.slice_bytes = 256;
  const LayoutPlan plan = plan_layout(request);
  EXPECT_EQ(plan.params[0].key_buckets, 128u);
  EXPECT_NE(plan.params[0].key_slots_offset, 0u);
  EXPECT_NE(plan.redo_key_slots_at, 0u);
  request.server_groups = 2;
  EXPECT_NE(error_of([&] { plan_layout(request); }).find("server groups"), std::string::npos);
  request.server_groups = 1;
  request.params.back().dtype = DType::bf16;
  EXPECT_NE(error_of([&] { plan_layout(request); }).find("keeps float32 rows"), std::string::npos);
}
