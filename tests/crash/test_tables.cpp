// Tables ([[table]], Worker::pull_rows / push_rows) with real server and worker processes:
// repeated ids summed, every bad input refused with its message and nothing changed, hot rows
// never read torn, and exact sums through SIGKILLs of workers and of the server (also in the
// middle of writing a table's slice). Their optimizers: test_table_optimizers.cpp.
//
// SGD with learning rate 1 and small-integer gradients: every value is exact, so the final table
// must equal minus the sum of every committed push, element by element.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/optimizer.hpp>
#include <shmps/server/safetensors.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/chaos.hpp"
#include "../support/expect.hpp"
#include "../support/harness.hpp"
#include "../support/pattern.hpp"
#include "../support/table_job.hpp"

using namespace std::chrono_literals;
using namespace shmps;
using shmps::test::error_of;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Watchdog;
using shmps::test::kDim;
using shmps::test::kRows;
using shmps::test::pull_table;
using shmps::test::rows_spec;

namespace {

Process& start_rows_pusher(Job& job, int rank, std::uint64_t pushes, std::vector<std::string> extra = {},
                           std::vector<std::pair<std::string, std::string>> env = {}) {
  env.emplace_back("SHMPS_RANK", std::to_string(rank));
  std::vector<std::string> args{"shmps-test-pusher", "rows", "--pushes", std::to_string(pushes)};
  args.insert(args.end(), extra.begin(), extra.end());
  return job.start(args, env);
}

// Expects the table to hold minus the sum of the first pushes[r] rows pushes of every rank r.
void expect_exact_table(const std::string& segment, const std::vector<std::uint64_t>& pushes, int reader_rank = 7) {
  std::vector<double> want(kRows * kDim, 0.0);
  for (std::uint64_t r = 0; r < pushes.size(); ++r)
    for (std::uint64_t k = 0; k < pushes[r]; ++k)
      for (std::uint64_t j = 0; j < test::kRowsPerPush; ++j) {
        const std::uint64_t id = test::rows_push_id(r, k, j, kRows);
        for (std::uint64_t d = 0; d < kDim; ++d) want[id * kDim + d] -= test::pattern(r, k, j * kDim + d);
      }
  const std::vector<float> table = pull_table(segment, reader_rank);
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < table.size(); ++i)
    if (table[i] != static_cast<float>(want[i]) && ++wrong <= 5)
      ADD_FAILURE() << "row " << i / kDim << " element " << i % kDim << ": " << table[i] << ", want " << want[i];
  EXPECT_EQ(wrong, 0u);
}

}  // namespace

TEST(Tables, PullRowsGivesTheInitialRowsAndPushRowsSumsRepeatedIds) {
  Watchdog watchdog(60s);
  Job job("rows-basic",
          "max_workers = 2\nslice_bytes = 64\n[optimizer]\nkind = \"sgd\"\nlr = 1.0\n"
          "[[param]]\nname = \"h\"\nshape = [4]\n"
          "[[table]]\nname = \"t\"\nrows = 64\ndim = 4\ninit = { kind = \"constant\", value = 0.5 }\n");
  job.start_server();
  job.wait_ready();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  const ParamInfo& t = w.param("t");
  EXPECT_TRUE(t.is_table());
  EXPECT_EQ(t.rows, 64u);
  EXPECT_EQ(t.dim, 4u);
  EXPECT_FALSE(w.param("h").is_table());

  std::vector<float> rows(3 * 4);
  const std::vector<std::uint64_t> some{5, 0, 5};
  EXPECT_EQ(w.pull_rows("t", some, rows), 0u);
  for (float v : rows) EXPECT_EQ(v, 0.5f);

  // Row 3 twice in one push and once more in another push of the same round or the next: summed.
  const std::vector<std::uint64_t> ids{3, 3, 63, 17};
  const std::vector<float> grads{1, 2, 3, 4, 10, 20, 30, 40, -1, -1, -1, -1, 2, 2, 2, 2};
  w.push_rows("t", ids, grads);
  const std::vector<std::uint64_t> again{3};
  const std::vector<float> more{100, 100, 100, 100};
  const std::uint64_t seq = w.push_rows("t", again, more);
  const std::vector<float> h_grad{1, 1, 1, 1};
  w.wait_applied(w.push("h", h_grad));
  w.wait_applied(seq);

  const std::vector<std::uint64_t> check{3, 63, 17, 4};
  std::vector<float> out(4 * 4);
  w.pull_rows("t", check, out);
  for (int d = 0; d < 4; ++d) {
    EXPECT_EQ(out[d], 0.5f - static_cast<float>(11 * (1 + d) + 100)) << d;
    EXPECT_EQ(out[4 + d], 1.5f) << d;
    EXPECT_EQ(out[8 + d], -1.5f) << d;
    EXPECT_EQ(out[12 + d], 0.5f) << "an untouched row";
  }
  std::vector<float> h(4);
  w.pull("h", h);
  for (float v : h) EXPECT_EQ(v, -1.0f);
}

// A bf16 table: a row's step is computed in float32 from the widened row and rounded to nearest
// even, by hand: 1 - 2^-9 lies halfway between 1 - 2^-8 and 1 and goes to 1 (the even one);
// 1 - 3 * 2^-10 goes to 1 - 2^-8; 1 - 0.1 (0x3F666666 as a float32) to 0x3F66 = 0.8984375. A
// second 2^-9 in a later round is a step of its own and rounds to 1 again (summed into one step,
// the two would give 1 - 2^-8). pull_rows widens exactly; a checkpoint holds the table as a BF16
// tensor of those bits, and a restore into a new segment gives them back.
TEST(Tables, ABf16TableRoundsEachRowStepAndCheckpointsItsBits) {
  Watchdog watchdog(90s);
  namespace fs = std::filesystem;
  const test::TempDir temp("rows-bf16");
  const fs::path& dir = temp.path();
  Job job("rows-bf16",
          "max_workers = 2\nslice_bytes = 64\n[optimizer]\nkind = \"sgd\"\nlr = 1.0\n"
          "[[param]]\nname = \"h\"\nshape = [4]\n"
          "[[table]]\nname = \"t\"\nrows = 64\ndim = 4\ndtype = \"bf16\"\ninit = { kind = \"constant\", value = 1.0 }\n");
  auto& server = job.start_server();
  job.wait_ready();
  std::vector<float> table(64 * 4);
  std::vector<std::uint64_t> all(64);
  for (std::uint64_t r = 0; r < 64; ++r) all[r] = r;
  {
    Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
    EXPECT_EQ(w.param("t").dtype, ValueDType::bf16);
    const float tie = std::ldexp(1.0f, -9), below = 3 * std::ldexp(1.0f, -10);
    const std::vector<std::uint64_t> ids{2, 5, 9};
    const std::vector<float> grads{tie, tie, tie, tie, below, below, below, below, 0.1f, 0.1f, 0.1f, 0.1f};
    w.wait_applied(w.push_rows("t", ids, grads));
    const std::vector<std::uint64_t> again{2};
    w.wait_applied(w.push_rows("t", again, std::vector<float>(4, tie)));
    const std::vector<std::uint64_t> check{2, 5, 9, 0};
    std::vector<float> out(4 * 4);
    w.pull_rows("t", check, out);
    for (int d = 0; d < 4; ++d) {
      EXPECT_EQ(out[d], 1.0f) << "two ties, each its own step, each rounded to even";
      EXPECT_EQ(out[4 + d], 0.99609375f) << d;
      EXPECT_EQ(out[8 + d], 0.8984375f) << d;
      EXPECT_EQ(out[12 + d], 1.0f) << "an untouched row";
    }
    // Gradient rows in the table's own type (bf16 bits, widened exactly): 1 - 1.5 = -0.5.
    const std::vector<std::uint64_t> twenty{20};
    const std::vector<std::uint16_t> one_and_a_half(4, 0x3FC0);
    w.wait_applied(w.push_rows("t", twenty, one_and_a_half));
    std::vector<float> row(4);
    w.pull_rows("t", twenty, row);
    EXPECT_EQ(row, std::vector<float>(4, -0.5f));
    // The stored bits as they are: row 5's 0x3F7F, row 9's 0x3F66.
    const std::vector<std::uint16_t> want_bits{0x3F7F, 0x3F7F, 0x3F7F, 0x3F7F, 0x3F66, 0x3F66, 0x3F66, 0x3F66};
    std::vector<std::uint16_t> raw(8);
    const std::vector<std::uint64_t> five_nine{5, 9};
    w.pull_rows("t", five_nine, std::span<std::uint16_t>(raw));
    EXPECT_EQ(raw, want_bits);
    EXPECT_HAS(error_of([&] { w.push("h", std::vector<std::uint16_t>(4, 0x3F80)); }),
               "push to 'h': 2-byte gradients are for a bf16 or fp16 parameter, and this one stores float32 values");
    w.pull_rows("t", all, table);
    w.leave();
  }
  const fs::path file = dir / "bf16.safetensors";
  const test::Ran made = test::run({"shmps-ctl", "checkpoint", job.name(), file.string()});
  ASSERT_EQ(made.code, 0) << made.out << server.output();
  namespace st = shmps::server::safetensors;
  const auto f = st::File::read(file);
  const st::Tensor& t = f.tensors().at("t");
  EXPECT_EQ(t.dtype, "BF16");
  EXPECT_EQ(t.shape, (std::vector<std::uint64_t>{64, 4}));
  const std::span<const std::byte> bits = f.data(t);
  ASSERT_EQ(bits.size(), 64u * 4 * 2);
  const auto bits_at = [&](std::uint64_t row) {
    std::uint16_t b = 0;
    std::memcpy(&b, bits.data() + row * 4 * 2, 2);
    return b;
  };
  EXPECT_EQ(bits_at(0), 0x3F80);
  EXPECT_EQ(bits_at(5), 0x3F7F);
  EXPECT_EQ(bits_at(9), 0x3F66);
  EXPECT_EQ(f.floats(t), table);

  server.kill(SIGKILL);
  server.wait(10s);
  test::remove_segment(job.name());
  job.start_server({"--restore", file.string()});
  job.wait_ready();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 20s});
  std::vector<float> restored(64 * 4);
  w.pull_rows("t", all, restored);
  EXPECT_EQ(restored, table);
}

TEST(Tables, EveryBadInputIsRefusedWithItsMessageAndChangesNothing) {
  Watchdog watchdog(60s);
  Job job("rows-bad", rows_spec());
  job.start_server();
  job.wait_ready();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  const std::vector<std::uint64_t> good{1, 2}, outside{1, 512};
  const std::vector<float> grads(2 * kDim, 1.0f), narrow(2 * (kDim - 1), 1.0f);
  std::vector<float> out(2 * kDim), dense(4);

  EXPECT_NE(error_of([&] { w.push_rows("t", outside, grads); }).find("id 512 (the 1th given) is outside the table, whose ids are 0 to 511"),
            std::string::npos);
  EXPECT_NE(error_of([&] { w.pull_rows("t", outside, out); }).find("id 512"), std::string::npos);
  EXPECT_NE(error_of([&] { w.push_rows("t", good, narrow); }).find("2 rows of 8 need 16 (row width 8)"), std::string::npos);
  EXPECT_NE(error_of([&] { w.pull_rows("t", good, dense); }).find("pass ids.size() x dim floats"), std::string::npos);
  EXPECT_NE(error_of([&] { w.push("t", std::span<const float>(grads.data(), 4)); }).find("it is a table (512 rows of 8), reached by row"),
            std::string::npos);
  EXPECT_NE(error_of([&] { w.pull("t", dense); }).find("use pull_rows() and push_rows()"), std::string::npos);
  EXPECT_NE(error_of([&] { w.push_rows("h", good, grads); }).find("it is a dense parameter [4], not a table"),
            std::string::npos);
  EXPECT_NE(error_of([&] { w.pull_rows("nope", good, out); }).find("unknown parameter 'nope'"), std::string::npos);
  std::vector<float> nan = grads;
  nan[kDim + 3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NE(error_of([&] { w.push_rows("t", good, nan); }).find("element 3 of row 1 (the 1th id given) is NaN"),
            std::string::npos);
  {
    PushBuffer b = w.borrow_push_rows("t", 2);
    b.ids()[0] = 5;
    b.ids()[1] = 9999;
    std::fill(b.span().begin(), b.span().end(), 1.0f);
    EXPECT_NE(error_of([&] { b.commit(); }).find("id 9999"), std::string::npos);
    EXPECT_FALSE(b.active());
  }
  {
    PushBuffer b = w.borrow_push_rows("t", 2);
    b.ids()[0] = 5;
    b.ids()[1] = 6;
    std::fill(b.span().begin(), b.span().end(), std::numeric_limits<float>::infinity());
    EXPECT_NE(error_of([&] { b.commit(); }).find("is infinite"), std::string::npos);
  }
  EXPECT_EQ(w.published(), 0u) << "nothing was pushed";
  // And the worker goes on: a good push after all that is applied, and the table holds only it.
  w.wait_applied(w.push_rows("t", good, grads));
  EXPECT_EQ(w.published(), 1u);
  const std::vector<float> table = pull_table(job.name(), 1);
  for (std::uint64_t i = 0; i < table.size(); ++i)
    EXPECT_EQ(table[i], (i / kDim == 1 || i / kDim == 2) ? -1.0f : 0.0f) << i;
}

TEST(Tables, ZeroCopyRowsPushesEqualCopiedOnes) {
  Watchdog watchdog(90s);
  Job job("rows-zero-copy", rows_spec());
  job.start_server();
  job.wait_ready();
  auto& a = start_rows_pusher(job, 0, 200, {"--zero-copy"});
  auto& b = start_rows_pusher(job, 1, 200);
  EXPECT_EQ(a.wait(60s), 0) << a.output();
  EXPECT_EQ(b.wait(60s), 0) << b.output();
  expect_exact_table(job.name(), {200, 200});
}

TEST(Tables, HotRowsAreNeverReadTorn) {
  Watchdog watchdog(60s);
  Job job("rows-torn", rows_spec());
  job.start_server();
  job.wait_ready();
  std::vector<Process*> pushers;
  for (int r = 0; r < 2; ++r)
    pushers.push_back(&job.start({"shmps-test-pusher", "hot-rows", "--millis", "1500"}, {{"SHMPS_RANK", std::to_string(r)}}));
  Worker reader(WorkerOptions{.segment = job.name(), .rank = 5, .timeout = 20s});
  const std::vector<std::uint64_t> hot{0, 1, 2, 3, 4, 5, 6, 7};
  std::vector<float> rows(hot.size() * kDim);
  std::uint64_t reads = 0, torn = 0;
  float lowest = 0;
  while (pushers[0]->running() || pushers[1]->running()) {
    reader.pull_rows("t", hot, rows);
    for (std::size_t k = 0; k < hot.size(); ++k)
      for (std::uint64_t d = 1; d < kDim; ++d)
        if (rows[k * kDim + d] != rows[k * kDim]) ++torn;
    lowest = std::min(lowest, rows[0]);
    ++reads;
  }
  for (auto* p : pushers) EXPECT_EQ(p->wait(30s), 0) << p->output();
  std::cout << reads << " reads of 8 hot rows, lowest value seen " << lowest << "\n";
  EXPECT_EQ(torn, 0u);
  EXPECT_LT(lowest, -10.0f) << "the rows were being updated while read";
}

// The server SIGKILLed while it copies a table's slice in (apply.mid_copy: the redo entry's
// whole copy), or once it has applied a round's rows but not yet moved the rings' heads
// (apply.before_release: the next server reads those records again): the next server finishes
// the copy from the entry and applies no rows record twice.
// The same for a bf16 table: its rows are widened into the entry, stepped, rounded there, and
// narrowed in by the copy (every partial sum of the pattern stays within bf16's exact integers).
struct TableKill {
  const char* point;
  const char* dtype;
};

class TableServerKill : public ::testing::TestWithParam<TableKill> {};

TEST_P(TableServerKill, TheNextServerFinishesTheSliceAndAppliesNoRowsTwice) {
  Watchdog watchdog(90s);
  Job job("rows-kill", rows_spec("kind = \"sgd\"\nlr = 1.0\n", "", GetParam().dtype));
  auto& first = job.start_server({}, {{"SHMPS_KILL_AT", GetParam().point}});
  job.wait_ready();
  std::vector<Process*> pushers;
  for (int r = 0; r < 3; ++r) pushers.push_back(&start_rows_pusher(job, r, 300, {"--pause-us", "200"}));
  EXPECT_EQ(first.wait(30s), 128 + SIGKILL) << "the kill point was not reached:\n" << first.output();
  job.start_server();
  job.wait_ready();
  for (auto* p : pushers) EXPECT_EQ(p->wait(60s), 0) << p->output();
  expect_exact_table(job.name(), {300, 300, 300});
}

// mid_rows: some of a slice's touched rows copied in, the others not; mid_copy: a slice copied in
// whole (most of its rows touched), or the first of one touched row's copy.
INSTANTIATE_TEST_SUITE_P(KillPoints, TableServerKill,
                         // Early passes: under TSan the pushers are slow and a round takes many
                         // records, so a later pass may never come before they finish.
                         ::testing::Values(TableKill{"apply.mid_rows:3", "f32"}, TableKill{"apply.mid_copy:10", "f32"},
                                           TableKill{"apply.before_release:3", "f32"},
                                           TableKill{"apply.mid_rows:3", "bf16"}, TableKill{"apply.mid_copy:10", "bf16"}),
                         [](const ::testing::TestParamInfo<TableKill>& kill) {
                           const std::string p = kill.param.point;
                           const std::string name = p.find("mid_rows") != std::string::npos   ? "MidRows"
                                                    : p.find("mid_copy") != std::string::npos ? "MidCopy"
                                                                                               : "BeforeRelease";
                           return name + (std::string(kill.param.dtype) == "f32" ? "" : "Bf16");
                         });

// Chaos: rows pushers with hot rows while workers and the server are SIGKILLed and restarted at
// random for `seconds`; every committed push counts exactly once.
static void rows_chaos(const std::string& dtype, std::uint64_t target, int seconds) {
  const int kSeconds = seconds;
  constexpr int kWorkers = 4;
  Watchdog watchdog(std::chrono::seconds(kSeconds + 120));
  Job job("rows-chaos", rows_spec("kind = \"sgd\"\nlr = 1.0\n", "", dtype));
  job.start_server();
  job.wait_ready();
  const unsigned seed = std::random_device{}();
  std::cout << "chaos seed " << seed << "\n";
  std::mt19937 rng(seed);
  std::vector<Process*> pushers(kWorkers);
  const auto paced = [&](int r) -> Process& { return start_rows_pusher(job, r, target, {"--pause-us", "100"}); };
  for (int r = 0; r < kWorkers; ++r) pushers[r] = &paced(r);
  const test::ChaosKills kills = test::kill_at_random(job, pushers, kSeconds, rng, paced, 300ms, 800ms);
  const std::vector<bool>& done = kills.done;
  const std::uint64_t worker_kills = kills.workers, server_kills = kills.server;
  for (int r = 0; r < kWorkers; ++r)
    if (!done[r] && !pushers[r]->running() && pushers[r]->wait(1s) != 0) pushers[r] = &start_rows_pusher(job, r, target);
  for (int r = 0; r < kWorkers; ++r) EXPECT_EQ(pushers[r]->wait(120s), 0) << pushers[r]->output();
  {
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    for (int r = 0; r < kWorkers; ++r) EXPECT_EQ(shm::load_acquire(seg.slot(r).published), target) << r;
  }
  expect_exact_table(job.name(), std::vector<std::uint64_t>(kWorkers, target));
  std::cout << dtype << " table chaos: " << worker_kills << " worker kills, " << server_kills << " server kills, exact\n";
  EXPECT_GT(worker_kills, 0u);
  EXPECT_GT(server_kills, 0u);
}

TEST(Tables, ExactSumsWithHotRowsThroughRandomKillsOfWorkersAndServer) {
#if defined(SHMPS_SANITIZER_BUILD)
  rows_chaos("f32", 8000, 10);
#else
  rows_chaos("f32", 40000, 10);
#endif
}

// A bf16 table: each row's step is computed in float32 and rounded; the pattern's partial sums
// stay within 117 in magnitude (4 ranks of up to 40000 pushes, at most 31 each), which bf16
// holds exactly (integers up to 256), so the sums must be exact here too.
TEST(Tables, ExactSumsInABf16TableThroughRandomKillsOfWorkersAndServer) {
#if defined(SHMPS_SANITIZER_BUILD)
  rows_chaos("bf16", 4000, 6);
#else
  rows_chaos("bf16", 20000, 6);
#endif
}

// A checkpoint holds the table as the tensor "t" [rows, dim] and its row-wise state as
// "t/adagrad.s"; restored into a new segment (the old one lost), it gives back every row and the
// state, and training goes on from there.
TEST(Tables, ACheckpointHoldsTheTableAndItsStateAndRestoresThem) {
  Watchdog watchdog(90s);
  namespace fs = std::filesystem;
  const test::TempDir temp("rows-ckpt");
  const fs::path& dir = temp.path();
  Job job("rows-ckpt", rows_spec("kind = \"adagrad\"\nlr = 0.25\n"));
  auto& server = job.start_server();
  job.wait_ready();
  auto& pusher = start_rows_pusher(job, 0, 50);
  ASSERT_EQ(pusher.wait(60s), 0) << pusher.output();
  const std::vector<float> before = pull_table(job.name(), 1);
  const fs::path file = dir / "rows.safetensors";
  const test::Ran made = test::run({"shmps-ctl", "checkpoint", job.name(), file.string()});
  ASSERT_EQ(made.code, 0) << made.out << server.output();

  namespace st = shmps::server::safetensors;
  const auto f = st::File::read(file);
  EXPECT_EQ(f.f32("t", {kRows, kDim}), before);
  const std::vector<float> state = f.f32("t/adagrad.s", {kRows, kDim});
  EXPECT_GT(state[0], 0.0f) << "the hot row's accumulator";
  std::vector<bool> touched(kRows, false);
  for (std::uint64_t k = 0; k < 50; ++k)
    for (std::uint64_t j = 0; j < test::kRowsPerPush; ++j) touched[test::rows_push_id(0, k, j, kRows)] = true;
  const auto untouched = static_cast<std::uint64_t>(std::find(touched.begin(), touched.end(), false) - touched.begin());
  ASSERT_LT(untouched, kRows);
  for (std::uint64_t d = 0; d < kDim; ++d)
    EXPECT_EQ(state[kDim * untouched + d], 0.0f) << "row " << untouched << ", which no push touched, keeps a zero state";

  server.kill(SIGKILL);
  server.wait(10s);
  test::remove_segment(job.name());
  job.start_server({"--restore", file.string()});
  job.wait_ready();
  EXPECT_EQ(pull_table(job.name(), 2), before);
  auto& more = start_rows_pusher(job, 0, 60);  // its slot says 50 were committed: pushes 50..59
  ASSERT_EQ(more.wait(60s), 0) << more.output();
  const std::vector<float> after = pull_table(job.name(), 3);
  EXPECT_NE(after, before);
}

// BSP: a step's rows of every worker are summed (or averaged over the ranks that pushed the row's
// slice, with bsp_aggregate = "mean") and applied once the step has ended; a pull of the next
// step sees exactly that.
TEST(Tables, BspAppliesAStepsRowsOfEveryWorkerTogether) {
  Watchdog watchdog(60s);
  for (const std::string aggregate : {"sum", "mean"}) {
    Job job("rows-bsp", rows_spec("kind = \"sgd\"\nlr = 1.0\n", "consistency = \"bsp\"\nbsp_aggregate = \"" + aggregate + "\"\n"));
    job.start_server();
    job.wait_ready();
    Worker w0(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
    Worker w1(WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 20s});
    w0.wait_for_workers(2);
    w1.wait_for_workers(2);
    const std::vector<std::uint64_t> row3{3}, rows3and4{3, 4};
    const std::vector<float> ones(kDim, 1.0f), twos(2 * kDim, 2.0f);
    w0.push_rows("t", row3, ones);
    w0.clock();
    std::vector<float> out(2 * kDim);
    w1.pull_rows("t", rows3and4, out);  // w1 is still in step 0: nothing of it applied yet
    EXPECT_EQ(out[0], 0.0f);
    w1.push_rows("t", rows3and4, twos);
    w1.clock();
    w0.pull_rows("t", rows3and4, out);  // waits for step 0
    const float row3_value = aggregate == "sum" ? -3.0f : -1.5f;
    const float row4_value = aggregate == "sum" ? -2.0f : -1.0f;  // both ranks pushed to its slice
    for (std::uint64_t d = 0; d < kDim; ++d) {
      EXPECT_EQ(out[d], row3_value) << aggregate;
      EXPECT_EQ(out[kDim + d], row4_value) << aggregate;
    }
    w0.leave();
    w1.leave();
  }
}

// shmps-top shows per table the rows updated, the distinct rows of the newest round, and the
// most updated slices (as row ranges): the hot row 0 of the rows pushers is in the first.
TEST(Tables, TopShowsRowsUpdatedAndTheHottestRows) {
  Watchdog watchdog(60s);
  Job job("rows-top", rows_spec());
  job.start_server();
  job.wait_ready();
  auto& pusher = start_rows_pusher(job, 0, 100);
  ASSERT_EQ(pusher.wait(60s), 0) << pusher.output();
  const test::Ran r = test::run({"shmps-top", job.name(), "--json"});
  ASSERT_EQ(r.code, 0) << r.out;
  const auto j = nlohmann::json::parse(r.out);
  const nlohmann::json* t = nullptr;
  for (const auto& p : j.at("params"))
    if (p.at("name") == "t") t = &p;
  ASSERT_NE(t, nullptr) << r.out;
  const auto& table = t->at("table");
  EXPECT_EQ(table.at("rows"), kRows);
  EXPECT_EQ(table.at("dim"), kDim);
  EXPECT_GT(table.at("rows_updated").get<std::uint64_t>(), 100u);
  EXPECT_GT(table.at("round_rows").get<std::uint64_t>(), 0u);
  ASSERT_FALSE(table.at("hottest_slices").empty());
  EXPECT_EQ(table.at("hottest_slices")[0].at("first_row"), 0u) << "row 0 is in every push";
  EXPECT_EQ(table.at("hottest_slices")[0].at("last_row"), 7u) << "8 rows per slice";
  EXPECT_EQ(table.at("optimizer").at("kind"), "sgd") << "the job's, the table having none of its own";
  for (const auto& p : j.at("params")) {
    if (p.at("name") == "h") {
      EXPECT_FALSE(p.contains("table"));
    }
  }
  const test::Ran prom = test::run({"shmps-top", job.name(), "--prometheus"});
  EXPECT_NE(prom.out.find("shmps_table_rows_updated_total{segment=\"" + job.name() + "\",param=\"t\"}"), std::string::npos)
      << prom.out;
}
