// Parameters whose values are stored in bf16 or fp16 (the spec's `dtype`): the fp16 conversion
// against hand-computed values and its definition (bf16's is test_bf16.cpp's), rounding as the
// server does it, the spec, the layout, and the apply engine on a model laid out in anonymous
// memory: one rounding to nearest even per optimizer step, exact sums of small integers, an
// idempotent redo copy, and a checkpoint round trip. No server process, nothing on /dev/shm
// (but the checkpoint file, in a temporary directory).
#include <gtest/gtest.h>
#include <tbb/task_arena.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <random>
#include <span>
#include <unistd.h>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/checkpoint.hpp>
#include <shmps/server/initialise.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/server/safetensors.hpp>
#include <shmps/server/server.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/dtype.hpp>
#include <shmps/shm/memory.hpp>
#include <shmps/shm/ring.hpp>

#include "apply.hpp"
#include "bootstrap.hpp"
#include "collect.hpp"
#include "redo.hpp"

using namespace shmps;
using namespace shmps::shm;
using server::Aggregation;
using server::ApplyEngine;
using server::RoundPlan;

namespace {

float bits(std::uint32_t u) { return std::bit_cast<float>(u); }

// ---- fp16: the definition, in double arithmetic -------------------------------------------------

// The value of binary16 bit pattern h (finite only).
double fp16_value(std::uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const double v = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
  return (h & 0x8000) ? -v : v;
}

}  // namespace

TEST(Fp16, RoundsToNearestTiesToEvenAgainstHandComputedValues) {
  EXPECT_EQ(to_fp16(1.0f), 0x3c00);
  EXPECT_EQ(to_fp16(-2.0f), 0xc000);
  EXPECT_EQ(to_fp16(0.5f), 0x3800);
  EXPECT_EQ(to_fp16(65504.0f), 0x7bff);                     // the largest finite fp16
  EXPECT_EQ(to_fp16(0.1f), 0x2e66);                         // numpy.float16(0.1).view(uint16)
  EXPECT_EQ(to_fp16(1.0f + 0x1p-11f), 0x3c00);              // a tie (half an ulp of 2^-10): even, below
  EXPECT_EQ(to_fp16(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);   // just above half: up
  EXPECT_EQ(to_fp16(1.0f + 0x1p-11f - 0x1p-20f), 0x3c00);   // just below half: down
  EXPECT_EQ(to_fp16(1.0f + 0x1p-10f + 0x1p-11f), 0x3c02);   // a tie, the even neighbour is above
  EXPECT_EQ(to_fp16(-(1.0f + 0x1p-10f + 0x1p-11f)), 0xbc02);
  EXPECT_EQ(to_fp16(2.0f - 0x1p-12f), 0x4000);              // the carry goes into the exponent
  // Subnormals: multiples of 2^-24, rounded like any other value.
  EXPECT_EQ(to_fp16(0x1p-24f), 0x0001);                     // the smallest
  EXPECT_EQ(to_fp16(0x1p-25f), 0x0000);                     // a tie between 0 and 2^-24: 0
  EXPECT_EQ(to_fp16(0x1p-25f + 0x1p-40f), 0x0001);          // just above half
  EXPECT_EQ(to_fp16(3 * 0x1p-25f), 0x0002);                 // 1.5 x 2^-24: a tie, even is 2
  EXPECT_EQ(to_fp16(5 * 0x1p-25f), 0x0002);                 // 2.5 x 2^-24: a tie, even is 2
  EXPECT_EQ(to_fp16(1023 * 0x1p-24f), 0x03ff);              // the largest subnormal
  EXPECT_EQ(to_fp16(0x1p-14f - 0x1p-25f), 0x0400);          // a tie with the smallest normal: even
  EXPECT_EQ(to_fp16(0x1p-14f), 0x0400);                     // the smallest normal
  EXPECT_EQ(to_fp16(-0x1p-24f), 0x8001);
  EXPECT_EQ(to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(to_fp16(1e-30f), 0x0000);
  EXPECT_EQ(to_fp16(bits(0x80000001)), 0x8000);  // a float32 subnormal: a signed zero
}

TEST(Fp16, InfinitiesOverflowAndNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(to_fp16(inf), 0x7c00);
  EXPECT_EQ(to_fp16(-inf), 0xfc00);
  EXPECT_EQ(to_fp16(65519.99f), 0x7bff);  // below the tie with the next power of two: the largest finite
  EXPECT_EQ(to_fp16(65520.0f), 0x7c00);   // the tie: the even neighbour is the infinity
  EXPECT_EQ(to_fp16(-65520.0f), 0xfc00);
  EXPECT_EQ(to_fp16(1e6f), 0x7c00);
  EXPECT_EQ(to_fp16(std::numeric_limits<float>::max()), 0x7c00);
  for (std::uint32_t nan : {0x7f800001U, 0x7f801fffU, 0x7fc00000U, 0xff800001U, 0x7fffffffU}) {
    const std::uint16_t h = to_fp16(bits(nan));
    EXPECT_TRUE(std::isnan(from_fp16(h))) << std::hex << nan;  // never an infinity
    EXPECT_EQ(h & 0x8000, (nan >> 16) & 0x8000) << "sign kept";
    EXPECT_EQ(h & 0x0200, 0x0200) << "made quiet";
  }
}

TEST(Fp16, WideningIsExactAndRoundTrips) {
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    const auto b = static_cast<std::uint16_t>(h);
    const float f = from_fp16(b);
    const int e = (h >> 10) & 0x1f;
    if (e == 0x1f) {
      ASSERT_EQ(std::isnan(f), (h & 0x3ff) != 0) << std::hex << h;
      if ((h & 0x3ff) == 0) {
        ASSERT_EQ(f, (h & 0x8000) ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity());
      }
      ASSERT_EQ(to_fp16(f), (h & 0x3ff) != 0 ? (h | 0x200) : h) << std::hex << h;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), fp16_value(b)) << std::hex << h;
    ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0);
    ASSERT_EQ(to_fp16(f), b) << std::hex << h;
  }
}

// Against the definition: the nearer of the two fp16 values around f, or on a tie the one with an
// even last bit; from 65520 up, infinity. Both the scalar function and the vectorised loop.
TEST(Fp16, MatchesTheDefinitionOnRandomFloats) {
  std::mt19937 rng(11);
  std::vector<float> in(100003);
  std::uniform_int_distribution<int> exponent(-30, 17);
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  for (std::size_t i = 0; i < in.size(); ++i) {
    float f = std::ldexp(mantissa(rng), exponent(rng));
    if (i % 3 == 0) f = std::ldexp(static_cast<float>(rng() % 4096) + 0.5f, exponent(rng) - 11);  // many exact ties
    in[i] = rng() % 2 ? -f : f;
  }
  std::vector<std::uint16_t> out(in.size());
  to_fp16(in.data(), out.data(), in.size());
  for (std::size_t i = 0; i < in.size(); ++i) {
    const double x = std::fabs(static_cast<double>(in[i]));
    const std::uint16_t sign = in[i] < 0 ? 0x8000 : 0;
    std::uint16_t want = 0x7c00;
    if (x < 65520.0) {
      // The largest fp16 magnitude at most x, and the next one up.
      std::uint16_t lo = 0;
      for (std::uint16_t step = 0x4000; step != 0; step >>= 1)
        if (lo + step <= 0x7bff && fp16_value(static_cast<std::uint16_t>(lo + step)) <= x) lo = static_cast<std::uint16_t>(lo + step);
      const double below = fp16_value(lo), above = lo == 0x7bff ? 65536.0 : fp16_value(static_cast<std::uint16_t>(lo + 1));
      const double d_lo = x - below, d_hi = above - x;
      want = d_lo < d_hi || (d_lo == d_hi && (lo & 1) == 0) ? lo : static_cast<std::uint16_t>(lo + 1);
    }
    ASSERT_EQ(out[i], sign | want) << in[i];
    ASSERT_EQ(to_fp16(in[i]), out[i]);
  }
}

// round_to: what the server does to new values once per update, so that they narrow exactly.
TEST(ValueDType, RoundToKeepsOnlyWhatTheDTypeHolds) {
  std::vector<float> v{1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 257.0f, 259.0f, 0.1f, -3.0f};
  round_to(DType::bf16, v.data(), v.size());
  // bf16 has 7 mantissa bits: the ulp of [1, 2) is 2^-7, of [256, 512) 2.
  EXPECT_EQ(v[0], 1.0f);                // a tie: the even neighbour, 1
  EXPECT_EQ(v[1], 1.0f + 0x1p-6f);      // a tie between 1 + 2^-7 (odd) and 1 + 2^-6 (even)
  EXPECT_EQ(v[2], 256.0f);              // a tie between 256 (even) and 258
  EXPECT_EQ(v[3], 260.0f);              // a tie between 258 (odd) and 260
  EXPECT_EQ(v[4], bits(0x3dcd0000));    // 0.1 = 0x3dcccccd: up
  EXPECT_EQ(v[5], -3.0f);
  std::vector<float> h{1.0f + 0x1p-11f, 2049.0f, 2051.0f, 0.1f};
  round_to(DType::fp16, h.data(), h.size());
  EXPECT_EQ(h[0], 1.0f);
  EXPECT_EQ(h[1], 2048.0f);  // fp16 integers are exact up to 2048, then even ones
  EXPECT_EQ(h[2], 2052.0f);
  EXPECT_EQ(h[3], from_fp16(0x2e66));
  std::vector<float> f{0.1f};
  round_to(DType::f32, f.data(), 1);
  EXPECT_EQ(f[0], 0.1f);
}

// ---- The spec -----------------------------------------------------------------------------------

namespace {

std::string spec_error(const std::string& text) {
  try {
    server::parse_model_spec(text, "m.toml");
  } catch (const server::SpecError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(ValueDType, TheSpecTakesDTypeOnAParamOrATableAndNamesAMistake) {
  const auto spec = server::parse_model_spec(
      "name = \"d\"\n[optimizer]\nlr = 1\n[[param]]\nname = \"a\"\nshape = [4]\ndtype = \"bf16\"\n"
      "[[param]]\nname = \"b\"\nshape = [4]\ndtype = \"fp16\"\n[[param]]\nname = \"c\"\nshape = [4]\n",
      "m.toml");
  EXPECT_EQ(spec.params[0].dtype, DType::bf16);
  EXPECT_EQ(spec.params[1].dtype, DType::fp16);
  EXPECT_EQ(spec.params[2].dtype, DType::f32);
  const std::string head = "name = \"d\"\n[optimizer]\nlr = 1\n[[param]]\nname = \"a\"\nshape = [4]\n";
  // Where, what, and what to write instead.
  EXPECT_EQ(spec_error(head + "dtype = \"bf17\"\n"),
            "m.toml:7:9: param[0].dtype: unknown dtype \"bf17\" (did you mean \"bf16\"?); write \"f32\" (float32, the "
            "default), \"bf16\" (bfloat16) or \"fp16\" (IEEE half)");
  EXPECT_NE(spec_error(head + "dtype = 16\n").find("param[0].dtype: expected a string, got an integer (16)"), std::string::npos);
  // A table takes a dtype too, with the same words for a mistake.
  EXPECT_NE(spec_error(head + "[[table]]\nname = \"t\"\nrows = 8\ndim = 4\ndtype = \"bf17\"\n")
                .find("table[0].dtype: unknown dtype \"bf17\" (did you mean \"bf16\"?)"),
            std::string::npos);
}

TEST(ValueDType, ATableTakesADTypeAndItsRowsTakeTwoBytesEach) {
  const auto spec = server::parse_model_spec(
      "name = \"d\"\nslice_bytes = 64\n[optimizer]\nlr = 1\n[[param]]\nname = \"a\"\nshape = [4]\n"
      "[[table]]\nname = \"t\"\nrows = 64\ndim = 4\ndtype = \"bf16\"\n"
      "[[table]]\nname = \"u\"\nrows = 8\ndim = 4\ndtype = \"fp16\"\n",
      "m.toml");
  ASSERT_EQ(spec.params.size(), 3u);
  EXPECT_EQ(spec.params[1].dtype, DType::bf16);
  EXPECT_EQ(spec.params[1].table_dim, 4u);
  EXPECT_EQ(spec.params[2].dtype, DType::fp16);
  EXPECT_EQ(server::validate_model_spec(spec), "");
  LayoutRequest request;
  request.params = {{"t", {64, 4}, false, 4, DType::bf16}, {"h", {4}, false, 0, DType::f32}};
  request.slice_bytes = 64;  // 16 elements: 4 rows of 4 per slice, whatever the dtype
  request.ring_bytes = 4096;
  const LayoutPlan plan = plan_layout(request);
  EXPECT_EQ(plan.params[0].slice_count, 16u);
  EXPECT_EQ(memory_breakdown(plan).values_bytes, 64u * 4 * 2 + 4 * 4);
}

// ---- The layout ---------------------------------------------------------------------------------

TEST(ValueDType, A2ByteParameterTakesHalfTheValuesAndTheF32RegionsStayFloat32) {
  LayoutRequest request;
  request.params = {{"a", {1000}, false, 0, DType::bf16}, {"b", {1000}, false, 0, DType::f32},
                    {"c", {1000}, false, 0, DType::fp16}};
  request.slice_bytes = 1024;
  request.bsp = true;
  request.ring_bytes = 4096;  // less than a step: the step sums, float32 for every parameter
  const LayoutPlan plan = plan_layout(request);
  EXPECT_EQ(plan.params[1].values_offset - plan.params[0].values_offset, 2048u);  // 1000 x 2, aligned to 64
  EXPECT_EQ(plan.params[2].values_offset - plan.params[1].values_offset, 4032u);  // 1000 x 4, aligned
  EXPECT_EQ(plan.params[0].f32_offset, 0u);
  EXPECT_EQ(plan.params[1].f32_offset, 4032u);
  EXPECT_EQ(plan.params[2].f32_offset, 8064u);
  EXPECT_EQ(plan.step_sums_bytes, 3 * 4032u);
  EXPECT_EQ(plan.params[0].slice_count, 4u);  // slices count elements (256 each) whatever the dtype
  const MemoryBreakdown m = memory_breakdown(plan);
  EXPECT_EQ(m.values_bytes, 2000u + 4000u + 2000u);
  EXPECT_NE(memory_table(m).find("3000 elements, 2000 of them in 2 bytes"), std::string::npos) << memory_table(m);
  // Refused: server groups (they sync float32 values).
  LayoutRequest groups = request;
  groups.server_groups = 2;
  try {
    plan_layout(groups);
    ADD_FAILURE() << "server groups with a bf16 parameter were not refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("parameter 'a' has dtype bf16, and server groups"), std::string::npos) << e.what();
  }
}

// ---- The apply engine ---------------------------------------------------------------------------

namespace {

// A model laid out in anonymous memory, as the server lays it out (the initial values rounded).
struct Model {
  server::ModelSpec spec;
  Segment segment;
  tbb::task_arena arena{2};

  explicit Model(const std::string& body) {
    server::ServerOptions options;
    options.spec = server::parse_model_spec("name = \"unit\"\n" + body, "<test spec>");
    options.threads = 2;
    spec = options.spec;
    const LayoutRequest request = server::layout_request(options);
    const LayoutPlan plan = plan_layout(request);
    segment = Segment::anonymous(plan.total_bytes);
    server::lay_out_segment(segment, spec, request, plan, 0);
    for (std::size_t i = 0; i < spec.params.size(); ++i) {
      const ParamEntry& p = segment.param(i);
      std::vector<float> v(p.size);
      server::initialise(spec.params[i].init, std::span<float>(v));
      if (p.dtype == DType::f32)
        std::memcpy(segment.values(p), v.data(), v.size() * sizeof(float));
      else
        narrow(p.dtype, v.data(), segment.values16(p), p.size);
    }
  }
  const ParamEntry& param(std::size_t i = 0) { return segment.param(i); }
  // The values as float32 (widened).
  std::vector<float> values(std::size_t i = 0) {
    const ParamEntry& p = param(i);
    std::vector<float> v(p.size);
    if (p.dtype == DType::f32)
      std::memcpy(v.data(), segment.values(p), p.size * sizeof(float));
    else
      widen(p.dtype, segment.values16(p), v.data(), p.size);
    return v;
  }
  std::vector<std::uint16_t> stored(std::size_t i = 0) {
    const ParamEntry& p = param(i);
    return {segment.values16(p), segment.values16(p) + p.size};
  }
};

// Push records as a worker's ring holds them.
class Records {
 public:
  const PushRecord& push(std::uint32_t param, std::uint64_t offset, std::vector<float> grad, std::uint64_t seq) {
    const std::size_t bytes = record_bytes_for(grad.size());
    void* memory = std::aligned_alloc(kCacheLine, bytes);
    std::memset(memory, 0, bytes);
    storage_.emplace_back(static_cast<std::byte*>(memory));
    auto* rec = reinterpret_cast<PushRecord*>(memory);
    rec->record_bytes = bytes;
    rec->kind = RecordKind::push;
    rec->param = param;
    rec->offset = offset;
    rec->count = grad.size();
    rec->seq = seq;
    rec->generation = 1;
    std::memcpy(record_payload(rec), grad.data(), grad.size() * sizeof(float));
    return *rec;
  }

 private:
  struct Free {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  std::vector<std::unique_ptr<std::byte, Free>> storage_;
};

RoundPlan plan_of(Model& m, std::initializer_list<std::pair<std::uint32_t, const PushRecord*>> records) {
  RoundPlan plan;
  plan.ranks.resize(m.segment.header().max_workers);
  for (const auto& [rank, rec] : records)
    EXPECT_TRUE(server::add_contributions(m.segment, rank, *rec, plan.contributions, plan.row_refs));
  return plan;
}

std::string sgd_model(const char* dtype, float init, std::uint64_t size = 1000) {
  return "max_workers = 4\nslice_bytes = 1024\n[optimizer]\nkind = \"sgd\"\nlr = 1.0\n[[param]]\nname = \"p\"\nshape = [" +
         std::to_string(size) + "]\ndtype = \"" + dtype + "\"\ninit = { kind = \"constant\", value = " +
         std::to_string(init) + " }\n";
}

}  // namespace

TEST(ValueDType, TheInitialValuesAreRoundedAndStoredIn2Bytes) {
  Model m(sgd_model("bf16", 0.1f));
  for (std::uint16_t b : m.stored()) ASSERT_EQ(b, 0x3dcd);  // 0.1 rounded to nearest even, as bf16 bits
  Model h(sgd_model("fp16", 0.1f));
  for (std::uint16_t b : h.stored()) ASSERT_EQ(b, 0x2e66);
}

// Each optimizer step rounds once: two pushes of -2^-8 in one round each leave 1.0 unchanged (1 +
// 2^-8 is a tie, and the even neighbour is 1), where rounding once per round (their sum, -2^-7)
// would give 1 + 2^-7. And a step that lands on a tie with an even neighbour above goes up.
TEST(ValueDType, Bf16ValuesAreRoundedToNearestEvenOncePerOptimizerStep) {
  Model m(sgd_model("bf16", 1.0f));
  Records r;
  RoundPlan plan = plan_of(m, {{0, &r.push(0, 0, std::vector<float>(1000, -0x1p-8f), 1)},
                               {1, &r.push(0, 0, std::vector<float>(1000, -0x1p-8f), 1)}});
  ApplyEngine engine(m.segment, m.arena);
  engine.apply(plan.contributions, Aggregation::each);
  for (float v : m.values()) ASSERT_EQ(v, 1.0f);
  EXPECT_EQ(load_acquire(m.segment.slice(0).version), 4u);  // two updates, each counted
  // 1 + 3 x 2^-8: a tie between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
  RoundPlan up = plan_of(m, {{0, &r.push(0, 0, std::vector<float>(1000, -3 * 0x1p-8f), 2)}});
  engine.apply(up.contributions, Aggregation::each);
  for (float v : m.values()) ASSERT_EQ(v, 1.0f + 0x1p-6f);
  for (std::uint16_t b : m.stored()) ASSERT_EQ(b, 0x3f82);
  // BSP: the step's gradients summed in float32 (-2^-8 - 2^-8 = -2^-7), one step, one rounding.
  RoundPlan step = plan_of(m, {{0, &r.push(0, 0, std::vector<float>(1000, -0x1p-8f), 3)},
                               {1, &r.push(0, 0, std::vector<float>(1000, -0x1p-8f), 2)}});
  engine.apply(step.contributions, Aggregation::sum);
  for (float v : m.values()) ASSERT_EQ(v, 1.0f + 0x1p-6f + 0x1p-7f);  // 1.0234375: exact in bf16
}

TEST(ValueDType, Fp16ValuesAreRoundedToNearestEvenOncePerOptimizerStep) {
  Model m(sgd_model("fp16", 1.0f));
  Records r;
  RoundPlan plan = plan_of(m, {{0, &r.push(0, 0, std::vector<float>(1000, -0x1p-11f), 1)},
                               {1, &r.push(0, 0, std::vector<float>(1000, -0x1p-11f), 1)}});
  ApplyEngine engine(m.segment, m.arena);
  engine.apply(plan.contributions, Aggregation::each);
  for (float v : m.values()) ASSERT_EQ(v, 1.0f);  // each step a tie, each back to 1
  RoundPlan up = plan_of(m, {{2, &r.push(0, 0, std::vector<float>(1000, -3 * 0x1p-11f), 1)}});
  engine.apply(up.contributions, Aggregation::each);
  for (std::uint16_t b : m.stored()) ASSERT_EQ(b, 0x3c02);  // 1 + 3 x 2^-11: a tie, up to the even 1 + 2^-9
}

// Small integers are exact in bf16 up to 256: SGD at learning rate 1 with small-integer
// gradients gives the exact sum, element by element, in ASP (a step per push, partial ranges
// across slices) and in BSP (summed, one step).
TEST(ValueDType, Bf16ExactSumsWithSmallIntegers) {
  for (const Aggregation aggregation : {Aggregation::each, Aggregation::sum}) {
    Model m(sgd_model("bf16", 0.0f));
    Records r;
    ApplyEngine engine(m.segment, m.arena);
    std::vector<double> want(1000, 0.0);
    for (std::uint64_t round = 0; round < 20; ++round) {
      RoundPlan plan;
      plan.ranks.resize(4);
      for (std::uint32_t rank = 0; rank < 3; ++rank) {
        const std::uint64_t offset = (round * 97 + rank * 131) % 700, count = 300;
        std::vector<float> g(count);
        for (std::uint64_t j = 0; j < count; ++j) {
          g[j] = static_cast<float>(static_cast<int>((rank * 31 + round * 17 + (offset + j) * 7) % 9) - 4);
          want[offset + j] -= g[j];
        }
        ASSERT_TRUE(server::add_contributions(m.segment, rank, r.push(0, offset, g, round + 1), plan.contributions,
                                              plan.row_refs));
      }
      engine.apply(plan.contributions, aggregation);
    }
    const std::vector<float> got = m.values();
    std::size_t nonzero = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(static_cast<double>(got[i]), want[i]) << "element " << i;
      nonzero += want[i] != 0.0;
    }
    EXPECT_GT(nonzero, 500u);  // the check can fail
    for (std::size_t i = 0; i < got.size(); ++i) ASSERT_EQ(m.stored()[i], to_bf16(static_cast<float>(want[i])));
  }
}

// The copy-in of a redo entry writes the slice's 2-byte values from the entry's float32 ones: a
// replay (a restarted server's) writes the same bytes again.
TEST(ValueDType, ARedoCopyOfA2ByteSliceIsIdempotent) {
  Model m(sgd_model("bf16", 3.0f));
  Records r;
  std::vector<float> g(1000);
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = 0.001f * static_cast<float>(i);  // values that need rounding
  RoundPlan plan = plan_of(m, {{0, &r.push(0, 0, g, 1)}});
  ApplyEngine engine(m.segment, m.arena);
  engine.apply(plan.contributions, Aggregation::each);
  const std::vector<std::uint16_t> after = m.stored();
  for (std::size_t i = 0; i < after.size(); ++i) ASSERT_EQ(after[i], to_bf16(3.0f - g[i])) << i;
  // Find the entry that applied slice 3 (the last one written by each thread stays in its entry),
  // replay it as a restarted server would, and compare.
  bool replayed = false;
  for (std::uint32_t e = 0; e < m.segment.header().redo_count; ++e) {
    RedoEntry& entry = m.segment.redo(e);
    if (entry.count == 0 || entry.target != RedoTarget::values) continue;
    const std::uint64_t version = load_acquire(m.segment.slice(entry.slice).version);
    store_release(m.segment.slice(entry.slice).version, version - 1);  // as a killed copy leaves it: odd
    server::copy_in(m.segment, entry);
    EXPECT_EQ(load_acquire(m.segment.slice(entry.slice).version), version);
    replayed = true;
  }
  EXPECT_TRUE(replayed);
  EXPECT_EQ(m.stored(), after);
}

// A checkpoint stores a bf16 parameter as a BF16 tensor of its stored bits (fp16: F16), and a
// restore gives back the same bytes; a spec of another dtype refuses it, saying so.
TEST(ValueDType, ACheckpointStoresBF16AndF16TensorsAndRestoresTheSameBytes) {
  const std::string body =
      "max_workers = 4\nslice_bytes = 1024\n[optimizer]\nkind = \"momentum\"\nlr = 0.5\n"
      "[[param]]\nname = \"a\"\nshape = [10, 100]\ndtype = \"bf16\"\ninit = { kind = \"u24\", stream = 3 }\n"
      "[[param]]\nname = \"b\"\nshape = [300]\ndtype = \"fp16\"\ninit = { kind = \"u24\", stream = 4 }\n"
      "[[param]]\nname = \"c\"\nshape = [7]\ninit = { kind = \"u24\", stream = 5 }\n";
  Model m(body);
  Records r;
  std::vector<float> g(1000, 0.37f);
  RoundPlan plan = plan_of(m, {{0, &r.push(0, 0, g, 1)}, {1, &r.push(1, 0, std::vector<float>(300, -0.21f), 1)}});
  ApplyEngine(m.segment, m.arena).apply(plan.contributions, Aggregation::each);

  const std::filesystem::path dir = std::filesystem::temp_directory_path() / ("shmps-dtype-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto file = dir / "c.safetensors";
  server::Snapshot snap;
  server::take_snapshot(m.segment, m.arena, snap);
  server::write_checkpoint(snap, file);
  {
    const auto f = server::safetensors::File::read(file);
    EXPECT_EQ(f.tensors().at("a").dtype, "BF16");
    EXPECT_EQ(f.tensors().at("b").dtype, "F16");
    EXPECT_EQ(f.tensors().at("c").dtype, "F32");
    EXPECT_EQ(f.tensors().at("a/momentum.v").dtype, "F32");
    const auto bytes = f.data(f.tensors().at("a"));
    ASSERT_EQ(bytes.size(), 2000u);
    EXPECT_EQ(std::memcmp(bytes.data(), m.segment.values16(m.param(0)), 2000), 0);
  }
  const server::Snapshot back = server::read_checkpoint(file);
  EXPECT_EQ(back.params[0].dtype, DType::bf16);
  EXPECT_EQ(back.params[1].dtype, DType::fp16);
  server::check_restorable(back, file, m.spec, shmps::shm::plan_of(m.segment));
  Model restored(body);
  server::restore_into(restored.segment, back);
  EXPECT_EQ(restored.stored(0), m.stored(0));
  EXPECT_EQ(restored.stored(1), m.stored(1));
  EXPECT_EQ(restored.values(2), m.values(2));
  // Another dtype in the spec: refused, naming the tensor, both dtypes and what to do.
  Model f32(std::string(body).replace(body.find("dtype = \"bf16\""), 14, "dtype = \"f32\" "));
  try {
    server::check_restorable(back, file, f32.spec, shmps::shm::plan_of(f32.segment));
    ADD_FAILURE() << "a BF16 checkpoint restored into a float32 parameter";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor \"a\" holds BF16 values (dtype bf16), but <test spec> says dtype = "
                                         "\"f32\""),
              std::string::npos)
        << e.what();
  }
  std::filesystem::remove_all(dir);
}
