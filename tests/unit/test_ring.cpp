// The push ring: all-or-nothing commit, wrap-around with padding, back-pressure, and a record
// whose writer died before the commit staying invisible.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include <shmps/shm/ring.hpp>

using namespace shmps::shm;

namespace {
// A ring in ordinary memory, laid out as in the segment: RingHeader then the bytes.
struct TestRing {
  explicit TestRing(std::uint64_t capacity)
      : memory(static_cast<std::byte*>(std::aligned_alloc(64, sizeof(RingHeader) + capacity))) {
    std::memset(memory.get(), 0, sizeof(RingHeader) + capacity);
    header()->capacity = capacity;
  }
  RingHeader* header() { return reinterpret_cast<RingHeader*>(memory.get()); }
  std::byte* data() { return memory.get() + sizeof(RingHeader); }
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte, Free> memory;
};

void fill(PushRecord* r, std::uint64_t seq, std::uint64_t count) {
  r->seq = seq;
  r->count = count;
  r->param = 0;
  for (std::uint64_t i = 0; i < count; ++i) record_payload(r)[i] = static_cast<float>(seq);
}

// Everything the consumer can see now: the sequence numbers of the committed push records.
std::vector<std::uint64_t> consume(RingConsumer& c) {
  std::vector<std::uint64_t> seqs;
  const std::uint64_t tail = c.committed();
  std::uint64_t pos = c.head();
  while (pos < tail) {
    EXPECT_TRUE(c.plausible(pos, tail));
    const PushRecord* r = c.record_at(pos);
    if (r->kind == RecordKind::push) {
      seqs.push_back(r->seq);
      for (std::uint64_t i = 0; i < r->count; ++i) EXPECT_EQ(record_payload(r)[i], static_cast<float>(r->seq));
    }
    pos += r->record_bytes;
  }
  c.release_to(pos);
  return seqs;
}
}  // namespace

TEST(Ring, CommittedRecordsArriveInOrder) {
  TestRing ring(4096);
  RingProducer p(ring.header(), ring.data());
  RingConsumer c(ring.header(), ring.data());
  for (std::uint64_t s = 1; s <= 3; ++s) {
    PushRecord* r = p.try_claim(10);
    ASSERT_NE(r, nullptr);
    fill(r, s, 10);
    p.commit();
  }
  EXPECT_EQ(consume(c), (std::vector<std::uint64_t>{1, 2, 3}));
  EXPECT_EQ(c.head(), c.committed());
}

TEST(Ring, RecordWhoseWriterDiedBeforeCommitIsInvisible) {
  TestRing ring(4096);
  RingProducer p(ring.header(), ring.data());
  RingConsumer c(ring.header(), ring.data());
  fill(p.try_claim(4), 1, 4);
  p.commit();
  // The writer fills a second record completely and "dies" before commit().
  fill(p.try_claim(4), 2, 4);
  EXPECT_EQ(consume(c), (std::vector<std::uint64_t>{1}));
  // Its successor (a new producer on the same ring) starts from the committed tail and
  // overwrites the dead record's bytes.
  RingProducer successor(ring.header(), ring.data());
  fill(successor.try_claim(4), 2, 4);
  successor.commit();
  EXPECT_EQ(consume(c), (std::vector<std::uint64_t>{2}));
}

TEST(Ring, FullRingRefusesUntilTheConsumerFreesRoom) {
  TestRing ring(1024);
  RingProducer p(ring.header(), ring.data());
  RingConsumer c(ring.header(), ring.data());
  EXPECT_EQ(p.max_record_floats(), (512u - 64u) / 4u);
  int committed = 0;
  while (PushRecord* r = p.try_claim(48)) {  // 64 + 192 = 256 bytes each
    fill(r, static_cast<std::uint64_t>(committed + 1), 48);
    p.commit();
    ++committed;
  }
  EXPECT_EQ(committed, 4);
  EXPECT_EQ(p.try_claim(48), nullptr);  // back-pressure: nothing is dropped or overwritten
  EXPECT_EQ(consume(c).size(), 4u);
  EXPECT_NE(p.try_claim(48), nullptr);
}

TEST(Ring, WrapsWithAPaddingRecordAndNeverSplitsARecord) {
  TestRing ring(1024);
  RingProducer p(ring.header(), ring.data());
  RingConsumer c(ring.header(), ring.data());
  std::uint64_t seq = 0;
  std::vector<std::uint64_t> seen;
  // Records of 320 bytes do not divide 1024: every few records the producer must pad.
  for (int round = 0; round < 50; ++round) {
    PushRecord* r = p.try_claim(64);
    if (r == nullptr) {
      auto got = consume(c);
      seen.insert(seen.end(), got.begin(), got.end());
      r = p.try_claim(64);
    }
    ASSERT_NE(r, nullptr);
    fill(r, ++seq, 64);
    p.commit();
  }
  auto got = consume(c);
  seen.insert(seen.end(), got.begin(), got.end());
  ASSERT_EQ(seen.size(), 50u);
  for (std::uint64_t i = 0; i < 50; ++i) EXPECT_EQ(seen[i], i + 1);
}

TEST(Ring, AnEmptyRingStartsOverAtItsBeginningWhenTheRecordFitsThere) {
  TestRing ring(4096);
  RingProducer p(ring.header(), ring.data());
  RingConsumer c(ring.header(), ring.data());
  const auto offset = [&](const PushRecord* r) { return reinterpret_cast<const std::byte*>(r) - ring.data(); };
  // 64 + 1024 bytes at 0, consumed: the ring is empty with its tail at 1088.
  PushRecord* first = p.try_claim(256);
  EXPECT_EQ(offset(first), 0);
  fill(first, 1, 256);
  p.commit();
  EXPECT_EQ(consume(c), (std::vector<std::uint64_t>{1}));
  // A record that fits before 1088 starts over at 0 (a padding record covers 1088..4096) ...
  PushRecord* second = p.try_claim(256);
  EXPECT_EQ(offset(second), 0);
  EXPECT_EQ(p.past_start_over(1088), 4096u);
  fill(second, 2, 256);
  p.commit();
  // The padding holds its room until the consumer passes it.
  EXPECT_EQ(p.try_claim(16), nullptr);
  EXPECT_EQ(consume(c), (std::vector<std::uint64_t>{2}));
  // Empty again (tail at 1088 in the ring): the next record starts over too ...
  PushRecord* third = p.try_claim(16);
  EXPECT_EQ(offset(third), 0);
  fill(third, 3, 16);
  p.commit();
  // ... but not one claimed while the ring holds anything: it goes after the last record.
  PushRecord* fourth = p.try_claim(16);
  EXPECT_EQ(offset(fourth), 128);
  fill(fourth, 4, 16);
  p.commit();
  EXPECT_EQ(consume(c), (std::vector<std::uint64_t>{3, 4}));
  // Nor one that does not fit in front of the position: 64 + 1600 bytes > 256.
  PushRecord* fifth = p.try_claim(400);
  EXPECT_EQ(offset(fifth), 256);
}

TEST(Ring, ImplausibleRecordsAreDetected) {
  TestRing ring(1024);
  RingConsumer c(ring.header(), ring.data());
  auto* r = reinterpret_cast<PushRecord*>(ring.data());
  r->kind = RecordKind::push;
  r->count = 10;
  r->record_bytes = 4096;  // larger than the ring
  EXPECT_FALSE(c.plausible(0, 4096));
  r->record_bytes = 100;  // not a multiple of 64
  EXPECT_FALSE(c.plausible(0, 1024));
  r->record_bytes = record_bytes_for(10);
  EXPECT_TRUE(c.plausible(0, record_bytes_for(10)));
  r->count = 1000;  // payload does not match the record size
  EXPECT_FALSE(c.plausible(0, record_bytes_for(10)));
}
