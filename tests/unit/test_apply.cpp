// The server's components on their own: the apply engine (a round plan in, slices out), the
// redo copy, and the collectors (rings in, a round plan out), on a model laid out in anonymous
// memory. No server, no worker process, nothing on /dev/shm.
#include <gtest/gtest.h>
#include <tbb/task_arena.h>

#include <bit>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/initialise.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/server/server.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/ring.hpp>

#include "apply.hpp"
#include "apply_chunks.hpp"
#include "bootstrap.hpp"
#include "collect.hpp"
#include "redo.hpp"

using namespace shmps;
using namespace shmps::shm;
using server::Aggregation;
using server::ApplyEngine;
using server::RoundPlan;

namespace {

// 1000 floats of 10.0 in slices of 256 (the last one 232), SGD at learning rate 1: each
// gradient element is subtracted exactly, so every expected value below is exact.
constexpr const char* kSgd = R"(
max_workers = 4
slice_bytes = 1024
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "p"
shape = [1000]
init = { kind = "constant", value = 10.0 }
)";

struct Model {
  server::ModelSpec spec;
  Segment segment;
  tbb::task_arena arena{2};

  explicit Model(const std::string& body, const std::string& extra = "") {
    server::ServerOptions options;
    options.spec = server::parse_model_spec("name = \"unit\"\n" + extra + body, "<test spec>");
    options.threads = 2;
    spec = options.spec;
    const LayoutRequest request = server::layout_request(options);
    const LayoutPlan plan = plan_layout(request);
    segment = Segment::anonymous(plan.total_bytes);
    server::lay_out_segment(segment, spec, request, plan, 0);
    for (std::size_t i = 0; i < spec.params.size(); ++i) {
      const ParamEntry& p = segment.param(i);
      server::initialise(spec.params[i].init, std::span<float>(segment.values(p), p.size));
    }
  }
  std::span<const float> values() { return {segment.values(segment.param(0)), segment.param(0).size}; }
  std::uint64_t version(std::uint64_t slice) { return load_acquire(segment.slice(slice).version); }
};

// Push records as a worker's ring holds them: a 64-byte header and the gradient after it.
class Records {
 public:
  const PushRecord& push(std::uint64_t offset, std::vector<float> grad, std::uint64_t seq) {
    auto* rec = allocate(grad.size());
    rec->kind = RecordKind::push;
    rec->offset = offset;
    rec->count = grad.size();
    rec->seq = seq;
    rec->generation = 1;
    std::memcpy(record_payload(rec), grad.data(), grad.size() * sizeof(float));
    return *rec;
  }

 private:
  PushRecord* allocate(std::size_t count) {
    const std::size_t bytes = record_bytes_for(count);
    void* memory = std::aligned_alloc(kCacheLine, bytes);
    std::memset(memory, 0, bytes);
    storage_.emplace_back(static_cast<std::byte*>(memory));
    auto* rec = reinterpret_cast<PushRecord*>(memory);
    rec->record_bytes = bytes;
    return rec;
  }
  struct Free {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  std::vector<std::unique_ptr<std::byte, Free>> storage_;
};

std::vector<float> filled(std::size_t n, float v) { return std::vector<float>(n, v); }

RoundPlan plan_of(Model& m, std::initializer_list<std::pair<std::uint32_t, const PushRecord*>> records) {
  RoundPlan plan;
  plan.ranks.resize(m.segment.header().max_workers);
  for (const auto& [rank, rec] : records) EXPECT_TRUE(server::add_contributions(m.segment, rank, *rec, plan.contributions, plan.row_refs));
  return plan;
}

}  // namespace

TEST(ApplyEngine, EachContributionIsOneOptimizerStepOnItsSlices) {
  Model m(kSgd);
  Records r;
  // Rank 0 over the whole parameter; rank 1 over [100, 400): slices 0 and 1.
  RoundPlan plan = plan_of(m, {{0, &r.push(0, filled(1000, 1.0f), 1)}, {1, &r.push(100, filled(300, 2.0f), 1)}});
  ASSERT_EQ(plan.contributions.size(), 4u + 2u);
  ApplyEngine engine(m.segment, m.arena);
  const server::ApplyTotals totals = engine.apply(plan.contributions, Aggregation::each);
  EXPECT_EQ(totals.floats, 1300u);
  EXPECT_EQ(totals.skipped, 0u);
  const auto v = m.values();
  for (std::size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], (i >= 100 && i < 400) ? 7.0f : 9.0f) << "element " << i;
  // Two updates on slices 0 and 1, one on slices 2 and 3: the version counts updates twice.
  EXPECT_EQ(m.version(0), 4u);
  EXPECT_EQ(m.version(1), 4u);
  EXPECT_EQ(m.version(2), 2u);
  EXPECT_EQ(m.version(3), 2u);
  EXPECT_EQ(m.segment.slice(0).step, 2u);
  // The exactly-once table: each rank's push recorded on the slices it touched, and only there.
  EXPECT_EQ(m.segment.last_applied(0, 0), 1u);
  EXPECT_EQ(m.segment.last_applied(1, 1), 1u);
  EXPECT_EQ(m.segment.last_applied(2, 1), 0u);
  for (std::uint32_t t = 0; t < m.segment.header().redo_count; ++t) EXPECT_EQ(load_acquire(m.segment.redo(t).valid), 0u);
  EXPECT_EQ(load_acquire(m.segment.param_stats(0).floats_applied), 1300u);
}

TEST(ApplyEngine, APlanAppliedAgainIsSkippedWhole) {
  // What a restarted server does with records its predecessor applied but did not release.
  Model m(kSgd);
  Records r;
  const PushRecord& a = r.push(0, filled(1000, 1.0f), 5);
  const PushRecord& b = r.push(200, filled(100, 3.0f), 9);
  ApplyEngine engine(m.segment, m.arena);
  RoundPlan first = plan_of(m, {{0, &a}, {2, &b}});
  engine.apply(first.contributions, Aggregation::each);
  const std::vector<float> after(m.values().begin(), m.values().end());
  const std::uint64_t version0 = m.version(0);
  RoundPlan again = plan_of(m, {{0, &a}, {2, &b}});
  const server::ApplyTotals totals = engine.apply(again.contributions, Aggregation::each);
  EXPECT_EQ(totals.skipped, again.contributions.size());
  EXPECT_EQ(totals.floats, 0u);
  EXPECT_EQ(std::vector<float>(m.values().begin(), m.values().end()), after);
  EXPECT_EQ(m.version(0), version0);
  // A newer push of the same rank is applied.
  RoundPlan newer = plan_of(m, {{0, &r.push(0, filled(1000, 1.0f), 6)}});
  engine.apply(newer.contributions, Aggregation::each);
  EXPECT_EQ(m.values()[0], after[0] - 1.0f);
}

TEST(ApplyEngine, SumAndMeanMakeOneStepOfAllRanks) {
  for (const Aggregation how : {Aggregation::sum, Aggregation::mean}) {
    Model m(kSgd);
    Records r;
    RoundPlan plan = plan_of(m, {{0, &r.push(0, filled(1000, 1.0f), 1)},
                                 {1, &r.push(0, filled(1000, 2.0f), 1)},
                                 {2, &r.push(0, filled(500, 4.0f), 1)}});  // [0, 500): slice 0 and most of slice 1
    ApplyEngine(m.segment, m.arena).apply(plan.contributions, how);
    const auto v = m.values();
    for (std::size_t i = 0; i < v.size(); ++i) {
      // The engine's arithmetic: the sum in rank order, times 1/ranks for the mean (ranks that
      // contributed to the slice: three for slices 0 and 1, two after).
      const std::size_t slice = i / 256;
      const float sum = i < 500 ? 1.0f + 2.0f + 4.0f : 1.0f + 2.0f;
      const float ranks = slice <= 1 ? 3.0f : 2.0f;
      const float g = how == Aggregation::mean ? sum * (1.0f / ranks) : sum;
      ASSERT_EQ(v[i], 10.0f - g) << "element " << i;
    }
    for (std::uint64_t s = 0; s < 4; ++s) EXPECT_EQ(m.version(s), 2u) << "one update per slice and step";
  }
}

// Streamed BSP steps with bf16 Adam state (the merge of streamed steps and bf16 state): the step
// sums stay float32, the redo entry carries them in its float32 values area, and the step made
// from them (apply_step_sums) equals, bit for bit in values and in the bf16 state, the step a
// ring-held BSP round makes from the same pushes (Aggregation::sum).
TEST(ApplyEngine, StreamedStepSumsWithBf16StateEqualARingHeldStep) {
  constexpr const char* kAdamBf16 = R"(
max_workers = 4
slice_bytes = 1024
consistency = "bsp"
bsp_aggregate = "sum"
[optimizer]
kind = "adam"
lr = 0.01
state_dtype = "bf16"
[[param]]
name = "p"
shape = [1000]
init = { kind = "constant", value = 10.0 }
)";
  Model held(kAdamBf16);
  Model streamed(kAdamBf16, "ring_bytes = 4096\n");
  ASSERT_FALSE(held.segment.streams_bsp_steps());
  ASSERT_TRUE(streamed.segment.streams_bsp_steps());
  ASSERT_EQ(streamed.segment.header().optimizer.state_dtype, StateDType::bf16);
  ASSERT_EQ(streamed.segment.state_elem_bytes(), 2u);
  Records r;
  auto grad = [](std::uint32_t rank, std::uint64_t step, std::size_t n, std::size_t first) {
    std::vector<float> g(n);
    for (std::size_t i = 0; i < n; ++i)
      g[i] = 0.37f * static_cast<float>(static_cast<int>((first + i) * 7 + rank * 3 + step * 5) % 11 - 5) +
             0.01f * static_cast<float>(rank);
    return g;
  };
  for (std::uint64_t step = 0; step < 3; ++step) {
    const std::uint64_t seq = step + 1;
    const PushRecord& a = r.push(0, grad(0, step, 1000, 0), seq);
    const PushRecord& b = r.push(0, grad(1, step, 1000, 0), seq);
    const PushRecord& c = r.push(300, grad(2, step, 400, 300), seq);  // slices 1 and 2 only
    RoundPlan whole = plan_of(held, {{0, &a}, {1, &b}, {2, &c}});
    ApplyEngine(held.segment, held.arena).apply(whole.contributions, Aggregation::sum);
    // The same pushes as they stream in: rank 0 alone, then ranks 1 and 2 onto its sums.
    ApplyEngine engine(streamed.segment, streamed.arena);
    RoundPlan first = plan_of(streamed, {{0, &a}});
    engine.add_to_step_sums(first.contributions, step);
    RoundPlan rest = plan_of(streamed, {{1, &b}, {2, &c}});
    engine.add_to_step_sums(rest.contributions, step);
    engine.apply_step_sums(step, 1.0f);
    for (std::uint64_t s = 0; s < 4; ++s) {
      EXPECT_EQ(streamed.segment.slice(s).step, step + 1) << "slice " << s;
      EXPECT_EQ(load_acquire(streamed.segment.slice(s).clock), step + 1) << "slice " << s;
    }
  }
  const auto hv = held.values(), sv = streamed.values();
  for (std::size_t i = 0; i < hv.size(); ++i)
    ASSERT_EQ(std::bit_cast<std::uint32_t>(hv[i]), std::bit_cast<std::uint32_t>(sv[i])) << "element " << i;
  EXPECT_NE(hv[0], 10.0f);
  const ParamEntry& hp = held.segment.param(0);
  const ParamEntry& sp = streamed.segment.param(0);
  for (int a = 0; a < 2; ++a)
    EXPECT_EQ(std::memcmp(held.segment.state_bytes(hp, a), streamed.segment.state_bytes(sp, a), hp.size * 2), 0)
        << "state array " << a;
  for (std::uint32_t t = 0; t < streamed.segment.header().redo_count; ++t)
    EXPECT_EQ(load_acquire(streamed.segment.redo(t).valid), 0u);
}

TEST(Redo, CopyInIsIdempotent) {
  // A server killed after marking its entry valid leaves the copy to its successor, which may
  // itself be killed in the middle: copying in once or twice gives the same slice.
  Model m(kSgd);
  RedoEntry& e = m.segment.redo(0);
  e.slice = 1;
  e.count = m.segment.slice(1).count;
  e.version_after = 6;
  e.step_after = 3;
  for (std::uint64_t k = 0; k < e.count; ++k) m.segment.redo_values(e)[k] = 42.0f + static_cast<float>(k);
  m.segment.redo_last_applied(e)[2] = 17;
  store_release(e.valid, 1U);
  for (int round = 0; round < 2; ++round) {
    server::copy_in(m.segment, e);
    const auto v = m.values();
    for (std::uint64_t k = 0; k < e.count; ++k) ASSERT_EQ(v[256 + k], 42.0f + static_cast<float>(k));
    EXPECT_EQ(v[255], 10.0f) << "the slice before is untouched";
    EXPECT_EQ(v[512], 10.0f) << "the slice after is untouched";
    EXPECT_EQ(m.version(1), 6u);
    EXPECT_EQ(m.segment.slice(1).step, 3u);
    EXPECT_EQ(m.segment.last_applied(1, 2), 17u);
  }
}

namespace {

// Writes records into slot `rank`'s ring the way a worker does (RingProducer).
struct Producer {
  RingProducer ring;
  Producer(Segment& s, std::uint32_t rank) : ring(&s.ring(rank), s.ring_data(rank)) {}
  void push(std::uint64_t offset, std::size_t count, float value, std::uint64_t seq, std::uint64_t generation = 1,
            bool commit = true) {
    PushRecord* rec = ring.try_claim(count);
    ASSERT_NE(rec, nullptr);
    rec->param = 0;
    rec->offset = offset;
    rec->count = count;
    rec->seq = seq;
    rec->generation = generation;
    for (std::size_t k = 0; k < count; ++k) record_payload(rec)[k] = value;
    if (commit) ring.commit();
  }
  void clock(std::uint64_t step, std::uint64_t generation = 1) {
    PushRecord* rec = ring.try_claim(0);
    ASSERT_NE(rec, nullptr);
    rec->kind = RecordKind::clock;
    rec->clock = step;
    rec->generation = generation;
    ring.commit();
  }
};

std::vector<RingConsumer> consumers(Segment& s) {
  std::vector<RingConsumer> rings;
  for (std::uint32_t r = 0; r < s.header().max_workers; ++r) rings.emplace_back(&s.ring(r), s.ring_data(r));
  return rings;
}

RoundPlan begin_round(const std::vector<RingConsumer>& rings) {
  RoundPlan plan;
  plan.ranks.resize(rings.size());
  for (std::size_t r = 0; r < rings.size(); ++r) plan.ranks[r].begin(rings[r].head(), rings[r].committed());
  return plan;
}

void attach(Segment& s, std::uint32_t rank) {  // what a worker's attach and the server's admission leave
  WorkerSlot& slot = s.slot(rank);
  store_release(slot.state, static_cast<std::uint32_t>(SlotState::attached));
  store_release(slot.generation, std::uint64_t{1});
  store_release(slot.admitted_generation, std::uint64_t{1});
}

}  // namespace

TEST(Collect, AsTheyComeTakesEveryCommittedPushAndMovesNothing) {
  Model m(kSgd);
  Producer w0(m.segment, 0), w2(m.segment, 2);
  w0.push(0, 1000, 1.0f, 1);
  w0.clock(0);
  w2.push(300, 10, 1.0f, 1);
  w2.push(0, 10, 1.0f, 2, 1, /*commit=*/false);  // claimed, never committed: does not exist
  auto rings = consumers(m.segment);
  RoundPlan plan = begin_round(rings);
  server::collect_as_they_come(m.segment, rings, plan);
  EXPECT_EQ(plan.ranks[0].records, 1u);
  EXPECT_EQ(plan.ranks[0].clock, 1u) << "the clock after step 0";
  EXPECT_EQ(plan.ranks[0].end, rings[0].committed());
  EXPECT_EQ(plan.ranks[2].records, 1u);
  EXPECT_EQ(plan.ranks[2].last_seq, 1u);
  EXPECT_EQ(plan.ranks[2].end, rings[2].committed());
  EXPECT_EQ(plan.contributions.size(), 4u + 1u);
  EXPECT_EQ(rings[0].head(), 0u) << "collecting releases nothing";
}

TEST(Collect, StepWaitsForEveryWorkerThatCounts) {
  Model m(kSgd, "consistency = \"bsp\"\n");
  attach(m.segment, 0);
  attach(m.segment, 1);
  Producer w0(m.segment, 0), w1(m.segment, 1);
  w0.push(0, 1000, 1.0f, 1);
  w0.clock(0);
  auto rings = consumers(m.segment);
  RoundPlan plan = begin_round(rings);
  EXPECT_FALSE(server::collect_step(m.segment, rings, 0, 0, plan)) << "rank 1 has not finished step 0";
  EXPECT_TRUE(plan.contributions.empty());
  EXPECT_EQ(plan.ranks[0].end, 0u) << "nothing is taken from an incomplete step";
  EXPECT_EQ(plan.records(), 0u);

  w1.push(0, 1000, 2.0f, 1);
  w1.clock(0);
  w0.push(0, 1000, 5.0f, 2);  // step 1 of rank 0, not finished: not part of step 0
  plan = begin_round(rings);
  ASSERT_TRUE(server::collect_step(m.segment, rings, 0, 0, plan));
  EXPECT_EQ(plan.ranks[0].records, 1u);
  EXPECT_EQ(plan.ranks[1].records, 1u);
  EXPECT_EQ(plan.ranks[0].last_seq, 1u);
  EXPECT_EQ(plan.contributions.size(), 8u);
  EXPECT_LT(plan.ranks[0].end, rings[0].committed()) << "step 1's push stays in the ring";
  ApplyEngine(m.segment, m.arena).apply(plan.contributions, Aggregation::sum);
  for (const float v : m.values()) ASSERT_EQ(v, 10.0f - 3.0f);
}

TEST(Collect, StepDiscardsTheOpenGroupOfADeadGeneration) {
  // A worker killed in the middle of step 0 (a push, no clock record) and restarted: the new
  // generation's step counts, the dead one's push is discarded, never applied.
  Model m(kSgd, "consistency = \"bsp\"\n");
  attach(m.segment, 0);
  Producer w0(m.segment, 0);
  w0.push(0, 1000, 100.0f, 1, /*generation=*/1);
  store_release(m.segment.slot(0).generation, std::uint64_t{2});
  store_release(m.segment.slot(0).admitted_generation, std::uint64_t{2});
  w0.push(0, 1000, 1.0f, 2, /*generation=*/2);
  w0.clock(0, 2);
  auto rings = consumers(m.segment);
  RoundPlan plan = begin_round(rings);
  ASSERT_TRUE(server::collect_step(m.segment, rings, 0, 0, plan));
  EXPECT_EQ(plan.ranks[0].discarded, 1u);
  EXPECT_EQ(plan.ranks[0].records, 1u);
  EXPECT_EQ(plan.ranks[0].last_seq, 2u);
  ApplyEngine(m.segment, m.arena).apply(plan.contributions, Aggregation::sum);
  for (const float v : m.values()) ASSERT_EQ(v, 9.0f);
}

// ---- The chunked apply (apply_chunks.hpp) and its recovery ------------------------------------

namespace {

// 5000 floats in slices of 4096 (the last one 904): slice 0 is four 1024-float chunks. Adam, so
// that recovery must also get the optimizer state and each update's step count right.
constexpr const char* kAdamChunks = R"(
max_workers = 2
slice_bytes = 16384
ring_bytes = 65536
[optimizer]
kind = "adam"
lr = 0.01
[[param]]
name = "p"
shape = [5000]
init = { kind = "constant", value = 1.0 }
)";

// A whole-parameter push of rank `rank` in its ring, with gradients that differ per element.
const PushRecord& push_varied(Segment& s, std::uint32_t rank, std::uint64_t seq) {
  RingProducer ring(&s.ring(rank), s.ring_data(rank));
  PushRecord* rec = ring.try_claim(5000);
  EXPECT_NE(rec, nullptr);
  rec->param = 0;
  rec->offset = 0;
  rec->count = 5000;
  rec->seq = seq;
  rec->generation = 1;
  for (std::size_t k = 0; k < 5000; ++k)
    record_payload(rec)[k] = static_cast<float>((k * 7 + rank * 3 + seq) % 23) * 0.25f - 2.5f;
  ring.commit();
  return *rec;
}

struct SliceState {
  std::vector<float> values, m, v;
  std::uint64_t version = 0, step = 0, row0 = 0, row1 = 0;
  bool operator==(const SliceState&) const = default;
};

float* state_of(Segment& s, int array) { return reinterpret_cast<float*>(s.state_bytes(s.param(0), array)); }
float* redo_state_of(Segment& s, RedoEntry& e, int array) { return reinterpret_cast<float*>(s.redo_state(e, array)); }

SliceState slice0(Model& m) {
  Segment& s = m.segment;
  const ParamEntry& p = s.param(0);
  const std::uint64_t n = s.slice(0).count;
  return {std::vector<float>(s.values(p), s.values(p) + n), std::vector<float>(state_of(s, 0), state_of(s, 0) + n),
          std::vector<float>(state_of(s, 1), state_of(s, 1) + n), m.version(0), s.slice(0).step,
          s.last_applied(0, 0), s.last_applied(0, 1)};
}

}  // namespace

TEST(ChunkedApply, AServerKilledAfterAnyChunkIsFinishedFromTheInputsAsIfNeverKilled) {
  // Model `done` runs two rounds of two ranks' pushes. Model `killed` runs the first round, then
  // is left as a server killed in round two's apply of slice 0 leaves it: chunks below `done_chunks`
  // written, optionally the next one half copied (its new values in the redo entry), the rest old.
  // finish_chunked must then leave slice 0 exactly (bit for bit) as the finished model has it.
  constexpr std::uint64_t kChunk = server::kApplyChunkFloats;
  for (const Aggregation how : {Aggregation::each, Aggregation::mean}) {
    Model done(kAdamChunks);
    ApplyEngine done_engine(done.segment, done.arena);
    for (std::uint64_t round = 1; round <= 2; ++round) {
      RoundPlan plan = plan_of(done, {{0, &push_varied(done.segment, 0, round)}, {1, &push_varied(done.segment, 1, round)}});
      done_engine.apply(plan.contributions, how);
    }
    const SliceState want = slice0(done);
    ASSERT_EQ(done.segment.slice(0).count, 4 * kChunk);
    ASSERT_EQ(want.step, how == Aggregation::each ? 4u : 2u);

    for (std::uint64_t done_chunks = 0; done_chunks < 4; ++done_chunks)
      for (const bool pending : {false, true}) {
        SCOPED_TRACE(testing::Message() << (how == Aggregation::each ? "each" : "mean") << ", " << done_chunks
                                        << " chunks written" << (pending ? ", the next one half copied" : ""));
        Model killed(kAdamChunks);
        ApplyEngine engine(killed.segment, killed.arena);
        RoundPlan first = plan_of(killed, {{0, &push_varied(killed.segment, 0, 1)}, {1, &push_varied(killed.segment, 1, 1)}});
        engine.apply(first.contributions, how);
        const PushRecord& a = push_varied(killed.segment, 0, 2);
        const PushRecord& b = push_varied(killed.segment, 1, 2);
        Segment& s = killed.segment;
        const ParamEntry& p = s.param(0);
        RedoEntry& e = s.redo(1);
        e.target = RedoTarget::values;
        e.mode = how == Aggregation::each ? RedoMode::each : RedoMode::mean;
        e.slice = 0;
        e.count = 4 * kChunk;
        e.version_after = want.version;
        e.step_after = want.step;
        e.clock_after = 0;
        e.inputs = 2;
        const auto ring_offset = [&](std::uint32_t rank, const PushRecord& rec) {
          return static_cast<std::uint64_t>(reinterpret_cast<const std::byte*>(&rec) - s.ring_data(rank));
        };
        s.redo_inputs(e)[0] = RedoInput{0, 0, ring_offset(0, a), 2};
        s.redo_inputs(e)[1] = RedoInput{1, 0, ring_offset(1, b), 2};
        s.redo_last_applied(e)[0] = want.row0;
        s.redo_last_applied(e)[1] = want.row1;
        // The slice as the killed server left it.
        store_release(s.slice(0).version, load_acquire(s.slice(0).version) + 1);
        const std::uint64_t written = done_chunks * kChunk;
        std::copy_n(want.values.begin(), written, s.values(p));
        std::copy_n(want.m.begin(), written, state_of(s, 0));
        std::copy_n(want.v.begin(), written, state_of(s, 1));
        store_release(e.done, written);
        store_release(e.chunk_lo, kNoChunk);
        if (pending) {
          std::copy_n(want.values.begin() + written, kChunk, s.redo_values(e));
          std::copy_n(want.m.begin() + written, kChunk, redo_state_of(s, e, 0));
          std::copy_n(want.v.begin() + written, kChunk, redo_state_of(s, e, 1));
          std::copy_n(want.values.begin() + written, kChunk / 2, s.values(p) + written);  // torn
          e.chunk_count = kChunk;
          store_release(e.chunk_lo, written);
        }
        store_release(e.valid, 1U);

        server::finish_chunked(s, e);
        EXPECT_EQ(load_acquire(e.valid), 0u);
        const SliceState got = slice0(killed);
        EXPECT_EQ(got.version, want.version);
        EXPECT_EQ(got.step, want.step);
        EXPECT_EQ(got.row0, want.row0);
        EXPECT_EQ(got.row1, want.row1);
        for (std::size_t k = 0; k < want.values.size(); ++k) {
          ASSERT_EQ(got.values[k], want.values[k]) << "element " << k;
          ASSERT_EQ(got.m[k], want.m[k]) << "element " << k;
          ASSERT_EQ(got.v[k], want.v[k]) << "element " << k;
        }
      }
  }
}

TEST(ChunkedApply, ARedoEntryNamingAPushItsRingNoLongerHoldsIsReportedAsDamage) {
  Model m(kAdamChunks);
  Segment& s = m.segment;
  const PushRecord& a = push_varied(s, 0, 1);
  RedoEntry& e = s.redo(0);
  e.target = RedoTarget::values;
  e.mode = RedoMode::each;
  e.slice = 0;
  e.count = s.slice(0).count;
  e.version_after = 2;
  e.step_after = 1;
  e.inputs = 1;
  const auto offset = static_cast<std::uint64_t>(reinterpret_cast<const std::byte*>(&a) - s.ring_data(0));
  s.redo_inputs(e)[0] = RedoInput{0, 0, offset, 7};  // the ring holds push 1 there
  store_release(e.done, std::uint64_t{0});
  store_release(e.chunk_lo, kNoChunk);
  store_release(e.valid, 1U);
  const std::vector<float> before(m.values().begin(), m.values().end());
  try {
    server::finish_chunked(s, e);
    FAIL() << "no error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("names push 7 of worker 0, but its ring no longer holds that push"),
              std::string::npos)
        << error.what();
    EXPECT_NE(std::string(error.what()).find("shmps-ctl destroy"), std::string::npos) << error.what();
  }
  EXPECT_EQ(std::vector<float>(m.values().begin(), m.values().end()), before) << "nothing changed";
}

TEST(ApplyEngine, ARunWithMoreContributionsThanTheRedoEntryNamesGoesInWhole) {
  // kSgd has 4 worker slots: a redo entry names up to 2 * 4 + 16 = 24 inputs. Thirty pushes of
  // one rank to slice 0 in one round take the whole-slice redo instead, with the same result.
  Model m(kSgd);
  Records r;
  RoundPlan plan;
  plan.ranks.resize(4);
  for (std::uint64_t seq = 1; seq <= 30; ++seq)
    ASSERT_TRUE(server::add_contributions(m.segment, 0, r.push(0, filled(256, 1.0f), seq), plan.contributions, plan.row_refs));
  ASSERT_GT(plan.contributions.size(), redo_input_capacity(4));
  const server::ApplyTotals totals = ApplyEngine(m.segment, m.arena).apply(plan.contributions, Aggregation::each);
  EXPECT_EQ(totals.floats, 30u * 256u);
  const auto v = m.values();
  for (std::size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], i < 256 ? 10.0f - 30.0f : 10.0f) << "element " << i;
  EXPECT_EQ(m.version(0), 60u);
  EXPECT_EQ(m.segment.slice(0).step, 30u);
  EXPECT_EQ(m.segment.last_applied(0, 0), 30u);
  EXPECT_EQ(m.segment.redo(0).mode, RedoMode::whole);
}

TEST(ChunkedApply, TheMonitorsNormSampleCoversTheWholeSliceWhenAPushTouchesPartOfIt) {
  // An ASP push of elements [0, 100) changes one chunk of slice 0; the sample (taken at a slice's
  // first update) is the squared norm of all 4096 values, the unchanged chunks included.
  Model m(kAdamChunks);
  RingProducer ring(&m.segment.ring(0), m.segment.ring_data(0));
  PushRecord* rec = ring.try_claim(100);
  ASSERT_NE(rec, nullptr);
  rec->param = 0;
  rec->count = 100;
  rec->seq = 1;
  rec->generation = 1;
  for (std::size_t k = 0; k < 100; ++k) record_payload(rec)[k] = 1.0f;
  ring.commit();
  RoundPlan plan = plan_of(m, {{0, rec}});
  ApplyEngine(m.segment, m.arena).apply(plan.contributions, Aggregation::each);
  double want = 0;
  for (std::uint64_t k = 0; k < m.segment.slice(0).count; ++k) want += double(m.values()[k]) * double(m.values()[k]);
  const double got = std::bit_cast<double>(load_acquire(m.segment.slice(0).value_sq_norm));
  EXPECT_NEAR(got, want, want * 1e-6);
  EXPECT_GT(got, 4000.0) << "the 3996 unchanged values of 1.0 count";
}
