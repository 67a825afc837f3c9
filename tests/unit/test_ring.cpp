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
  const RingConsumer::ReadResult result = c.read([&](std::uint64_t, const PushRecord& r) {
    if (r.kind == RecordKind::push) {
      seqs.push_back(r.seq);
      for (std::uint64_t i = 0; i < r.count; ++i) EXPECT_EQ(record_payload(&r)[i], static_cast<float>(r.seq));
    }
    return true;
  });
  EXPECT_FALSE(result.malformed);
  EXPECT_EQ(result.stopped_at, c.committed());
  c.release_to(result.stopped_at);
  return seqs;
}

// Commits a push record of `count` floats with sequence number `seq`.
void push(RingProducer& p, std::uint64_t seq, std::uint64_t count) {
  PushRecord* r = p.try_claim(count);
  ASSERT_NE(r, nullptr);
  fill(r, seq, count);
  p.commit();
}

struct Visit {
  std::uint64_t position;
  RecordKind kind;
  std::uint64_t seq;
};
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

// ---- RingConsumer::read(): the one walk over a ring --------------------------------------------

TEST(RingRead, VisitsEveryCommittedRecordInOrderWithItsPosition) {
  TestRing ring(1024);
  RingProducer p(ring.header(), ring.data());
  RingConsumer c(ring.header(), ring.data());
  // 320-byte records at 0, 320, 640.
  for (std::uint64_t s = 1; s <= 3; ++s) push(p, s, 64);
  std::vector<Visit> visits;
  auto result = c.read([&](std::uint64_t position, const PushRecord& r) {
    visits.push_back({position, r.kind, r.seq});
    return true;
  });
  ASSERT_EQ(visits.size(), 3u);
  for (std::uint64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(visits[i].position, i * 320);
    EXPECT_EQ(visits[i].kind, RecordKind::push);
    EXPECT_EQ(visits[i].seq, i + 1);
  }
  EXPECT_FALSE(result.malformed);
  EXPECT_EQ(result.stopped_at, 960u);
  // The fourth does not fit before the end (64 bytes left): a padding record comes first, and
  // read() visits it too, at its position.
  c.release_to(960);
  push(p, 4, 64);
  visits.clear();
  result = c.read([&](std::uint64_t position, const PushRecord& r) {
    visits.push_back({position, r.kind, r.seq});
    return true;
  });
  ASSERT_EQ(visits.size(), 2u);
  EXPECT_EQ(visits[0].position, 960u);
  EXPECT_EQ(visits[0].kind, RecordKind::padding);
  EXPECT_EQ(visits[1].position, 1024u);
  EXPECT_EQ(visits[1].kind, RecordKind::push);
  EXPECT_EQ(visits[1].seq, 4u);
  EXPECT_FALSE(result.malformed);
  EXPECT_EQ(result.stopped_at, 1024u + 320u);
}

TEST(RingRead, StopsAtTheRecordTheHandlerRefuses) {
  TestRing ring(4096);
  RingProducer p(ring.header(), ring.data());
  RingConsumer c(ring.header(), ring.data());
  for (std::uint64_t s = 1; s <= 4; ++s) push(p, s, 16);  // 128 bytes each
  std::vector<std::uint64_t> seen;
  const auto result = c.read([&](std::uint64_t, const PushRecord& r) {
    if (r.seq == 3) return false;
    seen.push_back(r.seq);
    return true;
  });
  EXPECT_EQ(seen, (std::vector<std::uint64_t>{1, 2}));
  EXPECT_EQ(result.stopped_at, 256u);  // the refused record counts as not read
  EXPECT_FALSE(result.malformed);
  EXPECT_EQ(c.head(), 0u);  // read() releases nothing
}

TEST(RingRead, StopsAtAMalformedRecordAndSaysSo) {
  TestRing ring(4096);
  RingProducer p(ring.header(), ring.data());
  RingConsumer c(ring.header(), ring.data());
  for (std::uint64_t s = 1; s <= 3; ++s) push(p, s, 16);
  // A buggy worker scribbles over the second record's size: it would send the walk past the ring.
  reinterpret_cast<PushRecord*>(ring.data() + 128)->record_bytes = 1 << 20;
  std::vector<std::uint64_t> seen;
  const auto result = c.read([&](std::uint64_t, const PushRecord& r) {
    seen.push_back(r.seq);
    return true;
  });
  EXPECT_EQ(seen, (std::vector<std::uint64_t>{1}));
  EXPECT_TRUE(result.malformed);
  EXPECT_EQ(result.stopped_at, 128u);
}

TEST(RingRead, NeverReadsPastTo) {
  TestRing ring(4096);
  RingProducer p(ring.header(), ring.data());
  RingConsumer c(ring.header(), ring.data());
  for (std::uint64_t s = 1; s <= 3; ++s) push(p, s, 16);  // committed up to 384
  // Up to 256: records 1 and 2 only, although 3 is committed.
  std::vector<std::uint64_t> seen;
  auto result = c.read(0, 256, [&](std::uint64_t, const PushRecord& r) {
    seen.push_back(r.seq);
    return true;
  });
  EXPECT_EQ(seen, (std::vector<std::uint64_t>{1, 2}));
  EXPECT_EQ(result.stopped_at, 256u);
  // A `to` inside a record: that record would end past it, so it is not read, and is reported
  // malformed (a record must end by the committed tail).
  seen.clear();
  result = c.read(0, 200, [&](std::uint64_t, const PushRecord& r) {
    seen.push_back(r.seq);
    return true;
  });
  EXPECT_EQ(seen, (std::vector<std::uint64_t>{1}));
  EXPECT_EQ(result.stopped_at, 128u);
  EXPECT_TRUE(result.malformed);
  // An empty range visits nothing.
  result = c.read(128, 128, [&](std::uint64_t, const PushRecord&) {
    ADD_FAILURE() << "visited a record of an empty range";
    return true;
  });
  EXPECT_EQ(result.stopped_at, 128u);
  EXPECT_FALSE(result.malformed);
}

TEST(RingRead, HeadAcquireSeesWhatTheConsumerReleased) {
  TestRing ring(4096);
  RingProducer p(ring.header(), ring.data());
  RingConsumer c(ring.header(), ring.data());
  push(p, 1, 16);
  EXPECT_EQ(c.head_acquire(), 0u);
  c.release_to(128);
  EXPECT_EQ(c.head_acquire(), 128u);
  EXPECT_EQ(c.head_acquire(), c.head());
}
