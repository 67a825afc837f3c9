// The optimizers of tables, with real server and worker processes: a round steps only the rows
// it touches (per-element AdaGrad's state, lazy Adam's per-row step counts, row-wise AdaGrad's
// per-row accumulator) against hand-computed values; a table's own optimizer beside the job's;
// their checkpoints and restores; and a server SIGKILLed mid-copy ending bit for bit as one never
// killed (the redo entry carries the rows' words with their values).
#include <gtest/gtest.h>
#include <signal.h>

#include <bit>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/optimizer.hpp>
#include <shmps/server/safetensors.hpp>
#include <shmps/shm/memory.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/harness.hpp"
#include "../support/pattern.hpp"
#include "../support/table_job.hpp"

using namespace std::chrono_literals;
using namespace shmps;
using shmps::test::Job;
using shmps::test::kDim;
using shmps::test::kRows;
using shmps::test::pull_table;
using shmps::test::rows_spec;
using shmps::test::Watchdog;

namespace {

// The row-wise AdaGrad optimizer of table "t" in the tests below: its own, beside the job's Adam.
const std::string kRowwise = "optimizer = { kind = \"rowwise_adagrad\", lr = 0.5, eps = 1e-6 }\n";

// Table "t"'s slice 0 and 1 rows, pushed 12 times by one worker that waits for each push to be
// applied (so every round holds one push and the run is deterministic), the server started with
// SHMPS_KILL_AT=`kill` (none: nullptr) and restarted once it dies. Even pushes: every row of one
// slice (8 rows of 8: the slice goes in whole); odd ones: three rows of slice 0 and one of slice
// 1, one of them twice (packed rows). Returns the table and its row words.
std::pair<std::vector<float>, std::vector<std::uint64_t>> rows_run_killed_at(const std::string& spec, const char* kill) {
  Job job("rows-opt-kill", spec);
  auto& first = kill != nullptr ? job.start_server({}, {{"SHMPS_KILL_AT", kill}}) : job.start_server();
  job.wait_ready();
  // The pushes from a thread of their own; the servers from this one (a child dies with the
  // thread that started it: PR_SET_PDEATHSIG in the harness).
  std::string pusher_error;
  std::jthread pusher([&] {
    try {
      Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 60s});
      for (std::uint64_t k = 0; k < 12; ++k) {
        std::vector<std::uint64_t> ids;
        if (k % 2 == 0)
          for (std::uint64_t r = 0; r < 8; ++r) ids.push_back((k / 2 % 4) * 8 + r);
        else
          ids = {1, 2, 3, 9, 2};
        std::vector<float> grads(ids.size() * kDim);
        for (std::size_t i = 0; i < grads.size(); ++i) grads[i] = test::pattern(0, k, i);
        w.wait_applied(w.push_rows("t", ids, grads));
      }
      w.leave();
    } catch (const std::exception& e) {
      pusher_error = e.what();
    }
  });
  if (kill != nullptr) {
    EXPECT_EQ(first.wait(60s), 128 + SIGKILL) << "the kill point was not reached:\n" << first.output();
    job.start_server();
    job.wait_ready();
  }
  pusher.join();
  EXPECT_EQ(pusher_error, "");
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const std::uint64_t* words = seg.row_words(seg.param(1));
  return {pull_table(job.name(), 1), std::vector<std::uint64_t>(words, words + kRows)};
}

// The row-wise AdaGrad step, in double as the reference (the server's factor is a double rounded
// to float once per row, as here).
void rowwise_reference(std::vector<float>& row, const std::vector<float>& g, double& acc, double lr, double eps) {
  double sq = 0;
  for (const float x : g) sq += double{x} * x;
  acc += sq / static_cast<double>(g.size());
  const auto f = static_cast<float>(lr / (std::sqrt(acc) + eps));
  for (std::size_t i = 0; i < row.size(); ++i) row[i] -= f * g[i];
}

// A run of `spec` killed at each of apply.mid_rows and apply.mid_copy ends as `reference`, the run
// nobody killed, bit for bit: the table and every row's word.
void expect_kills_end_as(const std::string& spec, const std::pair<std::vector<float>, std::vector<std::uint64_t>>& reference) {
  for (const char* kill : {"apply.mid_rows:3", "apply.mid_copy:3"}) {
    const auto killed = rows_run_killed_at(spec, kill);
    EXPECT_EQ(killed.first, reference.first) << kill;
    EXPECT_EQ(killed.second, reference.second) << kill;
  }
}

const shm::ParamEntry& param_named(const shm::Segment& seg, const std::string& name) {
  for (std::uint32_t i = 0; i < seg.header().param_count; ++i)
    if (std::string(seg.param(i).name) == name) return seg.param(i);
  throw Error("no parameter " + name);
}

}  // namespace

TEST(TableOptimizers, ARoundUpdatesOnlyTheTouchedRowsWithTheirOwnAdagradState) {
  Watchdog watchdog(60s);
  Job job("rows-adagrad", rows_spec("kind = \"adagrad\"\nlr = 0.5\neps = 1e-8\n"));
  job.start_server();
  job.wait_ready();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  // Row 9 gets gradient 2 (every element) twice, in two rounds; row 10 once; the rest never.
  const std::vector<std::uint64_t> row9{9}, rows9and10{9, 10};
  const std::vector<float> g2(kDim, 2.0f), g2x2(2 * kDim, 2.0f);
  w.wait_applied(w.push_rows("t", row9, g2));
  w.wait_applied(w.push_rows("t", rows9and10, g2x2));
  // By hand (float32, as the server computes): s = g^2, p -= lr g / (sqrt(s) + eps).
  float p9 = 0, s9 = 0, p10 = 0, s10 = 0;
  s9 += 4.0f;
  p9 -= 0.5f * 2.0f / (std::sqrt(s9) + 1e-8f);
  s9 += 4.0f;
  p9 -= 0.5f * 2.0f / (std::sqrt(s9) + 1e-8f);
  s10 += 4.0f;
  p10 -= 0.5f * 2.0f / (std::sqrt(s10) + 1e-8f);
  const std::vector<std::uint64_t> ids{9, 10, 11, 0};
  std::vector<float> out(ids.size() * kDim);
  w.pull_rows("t", ids, out);
  for (std::uint64_t d = 0; d < kDim; ++d) {
    EXPECT_FLOAT_EQ(out[d], p9);
    EXPECT_FLOAT_EQ(out[kDim + d], p10);
    EXPECT_EQ(out[2 * kDim + d], 0.0f) << "untouched";
    EXPECT_EQ(out[3 * kDim + d], 0.0f) << "untouched";
  }
  // Lazy: the state of an untouched row stays zero (it would not be after a dense step).
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const shm::ParamEntry* t = nullptr;
  for (std::uint32_t i = 0; i < seg.header().param_count; ++i)
    if (std::string(seg.param(i).name) == "t") t = &seg.param(i);
  ASSERT_NE(t, nullptr);
  const float* s = reinterpret_cast<const float*>(seg.state_bytes(*t, 0));
  EXPECT_EQ(s[9 * kDim], 8.0f);
  EXPECT_EQ(s[10 * kDim], 4.0f);
  EXPECT_EQ(s[11 * kDim], 0.0f);
}

// Lazy Adam: a round steps only the rows it touches, each as its own step count (the bias
// correction counts the rounds that touched that row, not the slice's). Row 9 gets a gradient in
// two rounds, row 10 in the second only: row 10's one step is a first step (|update| = lr for
// Adam's first step), where the slice's count would have made it a second (about 0.74 lr). The
// reference is the optimizer's own kernel with those step counts; a checkpoint holds them as
// "t/adam.step", and a restore into a new segment continues them.
TEST(TableOptimizers, LazyAdamStepsEachTouchedRowWithItsOwnStepCount) {
  Watchdog watchdog(90s);
  const test::TempDir temp("rows-adam");
  Job job("rows-adam", rows_spec("kind = \"adam\"\nlr = 0.01\n"));
  auto& server = job.start_server();
  job.wait_ready();
  const std::vector<std::uint64_t> row9{9}, rows9and10{9, 10}, row10{10};
  const std::vector<float> g9a(kDim, 2.0f), g9b_10{1, 2, 3, 4, 5, 6, 7, 8, -1, -2, -3, -4, -5, -6, -7, -8};
  {
    Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
    w.wait_applied(w.push_rows("t", row9, g9a));
    w.wait_applied(w.push_rows("t", rows9and10, g9b_10));
    w.leave();
  }
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const OptimizerSettings settings = seg.header().optimizer;
  std::vector<float> p9(kDim, 0.0f), m9(kDim, 0.0f), v9(kDim, 0.0f), p10(kDim, 0.0f), m10(kDim, 0.0f), v10(kDim, 0.0f);
  server::apply_update(settings, p9, g9a, m9, v9, 1, 1.0f);
  server::apply_update(settings, p9, std::span<const float>(g9b_10.data(), kDim), m9, v9, 2, 1.0f);
  server::apply_update(settings, p10, std::span<const float>(g9b_10.data() + kDim, kDim), m10, v10, 1, 1.0f);
  std::vector<float> table = pull_table(job.name(), 1);
  for (std::uint64_t d = 0; d < kDim; ++d) {
    EXPECT_FLOAT_EQ(table[9 * kDim + d], p9[d]) << d;
    EXPECT_FLOAT_EQ(table[10 * kDim + d], p10[d]) << d;
    EXPECT_NEAR(std::fabs(table[10 * kDim + d]), 0.01f, 1e-6f) << "a first step moves by lr";
    EXPECT_EQ(table[11 * kDim + d], 0.0f) << "untouched";
  }
  const shm::ParamEntry& t = seg.param(1);
  ASSERT_EQ(std::string(t.name), "t");
  ASSERT_NE(t.row_words_offset, 0u);
  EXPECT_EQ(seg.row_words(t)[9], 2u);
  EXPECT_EQ(seg.row_words(t)[10], 1u);
  EXPECT_EQ(seg.row_words(t)[11], 0u);

  const std::filesystem::path file = temp.path() / "adam.safetensors";
  const test::Ran made = test::run({"shmps-ctl", "checkpoint", job.name(), file.string()});
  ASSERT_EQ(made.code, 0) << made.out << server.output();
  const auto f = server::safetensors::File::read(file);
  const auto& steps = f.tensors().at("t/adam.step");
  EXPECT_EQ(steps.dtype, "I64");
  EXPECT_EQ(steps.shape, (std::vector<std::uint64_t>{kRows}));
  std::vector<std::int64_t> counts(kRows);
  std::memcpy(counts.data(), f.data(steps).data(), kRows * sizeof(std::int64_t));
  EXPECT_EQ(counts[9], 2);
  EXPECT_EQ(counts[10], 1);

  server.kill(SIGKILL);
  server.wait(10s);
  test::remove_segment(job.name());
  job.start_server({"--restore", file.string()});
  job.wait_ready();
  EXPECT_EQ(pull_table(job.name(), 2), table);
  {
    Worker w(WorkerOptions{.segment = job.name(), .rank = 3, .timeout = 20s});
    w.wait_applied(w.push_rows("t", row10, std::vector<float>(kDim, 0.5f)));
    w.leave();
  }
  server::apply_update(settings, p10, std::vector<float>(kDim, 0.5f), m10, v10, 2, 1.0f);  // row 10's second step
  table = pull_table(job.name(), 4);
  for (std::uint64_t d = 0; d < kDim; ++d) EXPECT_FLOAT_EQ(table[10 * kDim + d], p10[d]) << d;
}

// Lazy Adam and row-wise AdaGrad through a kill: the server SIGKILLed while it copies a round's
// rows in (some rows in, some not: apply.mid_rows) or a slice in whole (most of its rows
// touched: apply.mid_copy), then restarted. The table and every row's word (step count,
// accumulator) must equal those of a run nobody killed, bit for bit.
TEST(TableOptimizers, LazyAdamKilledMidCopyEndsBitForBitAsIfNeverKilled) {
  Watchdog watchdog(120s);
  const std::string spec = rows_spec("kind = \"adam\"\nlr = 0.01\n");
  const auto reference = rows_run_killed_at(spec, nullptr);
  EXPECT_EQ(reference.second[2], 6u + 2u) << "row 2: in the 6 odd pushes and in the even pushes 0 and 8";
  expect_kills_end_as(spec, reference);
}

TEST(TableOptimizers, RowwiseAdagradKilledMidCopyEndsBitForBitAsIfNeverKilled) {
  Watchdog watchdog(120s);
  const std::string spec = rows_spec("kind = \"adam\"\nlr = 0.01\n", "", "f32", kRowwise);
  const auto reference = rows_run_killed_at(spec, nullptr);
  EXPECT_GT(std::bit_cast<double>(reference.second[2]), 0.0) << "row 2's accumulator";
  EXPECT_EQ(reference.second[100], 0u) << "an untouched row's accumulator";
  expect_kills_end_as(spec, reference);
}

// A table with its own optimizer (row-wise AdaGrad) in a job whose [optimizer] is Adam: the dense
// parameter takes Adam, the table row-wise AdaGrad, against hand-computed values. The table keeps
// no per-element state at all (the point of row-wise AdaGrad: 8 bytes a row, not 4 a value): its
// state arrays are absent from the segment, and the memory plan counts only the dense one's.
TEST(TableOptimizers, ATableTakesItsOwnOptimizerAndTheDenseParametersTheJobs) {
  Watchdog watchdog(60s);
  Job job("rows-own", rows_spec("kind = \"adam\"\nlr = 0.01\n", "", "f32", kRowwise));
  job.start_server();
  job.wait_ready();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  const std::vector<std::uint64_t> row9{9}, rows9and10{9, 10};
  const std::vector<float> g9a{1, 2, 3, 4, 5, 6, 7, 8}, g9b_10{-1, 0, 1, 0, -1, 0, 1, 0, 2, 2, 2, 2, 2, 2, 2, 2};
  const std::vector<float> gh{0.5f, -1.0f, 2.0f, 0.25f};
  w.wait_applied(w.push_rows("t", row9, g9a));
  w.wait_applied(w.push_rows("t", rows9and10, g9b_10));
  w.wait_applied(w.push("h", gh));

  std::vector<float> p9(kDim, 0.0f), p10(kDim, 0.0f);
  double s9 = 0, s10 = 0;
  rowwise_reference(p9, g9a, s9, 0.5, 1e-6);
  rowwise_reference(p9, std::vector<float>(g9b_10.begin(), g9b_10.begin() + kDim), s9, 0.5, 1e-6);
  rowwise_reference(p10, std::vector<float>(g9b_10.begin() + kDim, g9b_10.end()), s10, 0.5, 1e-6);
  const std::vector<float> table = pull_table(job.name(), 1);
  for (std::uint64_t d = 0; d < kDim; ++d) {
    EXPECT_FLOAT_EQ(table[9 * kDim + d], p9[d]) << d;
    EXPECT_FLOAT_EQ(table[10 * kDim + d], p10[d]) << d;
    EXPECT_EQ(table[11 * kDim + d], 0.0f) << "untouched";
  }
  // Row 10: one accumulator of mean(g^2) = 4, so every element moved by lr * 2 / sqrt(4) = lr.
  EXPECT_NEAR(table[10 * kDim], -0.5f, 1e-6f);

  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const shm::ParamEntry& t = param_named(seg, "t");
  const shm::ParamEntry& h = param_named(seg, "h");
  EXPECT_EQ(t.optimizer.kind, OptimizerKind::rowwise_adagrad);
  EXPECT_EQ(h.optimizer.kind, OptimizerKind::adam);
  EXPECT_EQ(seg.header().optimizer.kind, OptimizerKind::adam);
  EXPECT_EQ(t.state_offset[0], 0u) << "no per-element state for the table";
  EXPECT_EQ(t.state_offset[1], 0u);
  ASSERT_NE(t.row_words_offset, 0u);
  EXPECT_DOUBLE_EQ(std::bit_cast<double>(seg.row_words(t)[9]), s9);
  EXPECT_DOUBLE_EQ(std::bit_cast<double>(seg.row_words(t)[10]), s10);
  EXPECT_EQ(seg.row_words(t)[11], 0u);
  const shm::MemoryBreakdown m = shm::memory_breakdown(shm::plan_of(seg));
  EXPECT_EQ(m.bytes_of("optimizer state"), 2u * 4u * sizeof(float)) << "Adam's m and v of h's 4 values only";
  EXPECT_EQ(m.bytes_of("table row words"), kRows * 8u);

  // The dense parameter: Adam's first step, from the optimizer's own kernel.
  std::vector<float> ph(4, 0.0f), m0(4, 0.0f), v0(4, 0.0f);
  server::apply_update(seg.header().optimizer, ph, gh, m0, v0, 1, 1.0f);
  std::vector<float> pulled(4);
  w.pull("h", pulled);
  EXPECT_EQ(pulled, ph);

  // --plan says which table has which optimizer.
  const std::filesystem::path spec_file = std::filesystem::path(job.spec_path());
  const test::Ran plan = test::run({"shmps-server", "--plan", "--spec", spec_file.string()});
  EXPECT_EQ(plan.code, 0) << plan.out;
  EXPECT_NE(plan.out.find("optimizer rowwise_adagrad lr=0.5 for table t: one accumulator per row"), std::string::npos)
      << plan.out;
  w.leave();
}

// A checkpoint holds the table's own optimizer (metadata "shmps.optimizer.t") and its rows'
// accumulators ("t/rowwise_adagrad.s", F64, one per row) and no per-element state of the table;
// a restore continues them; a spec that gives the table another optimizer is refused by name.
TEST(TableOptimizers, ACheckpointHoldsATablesOwnOptimizerAndItsRowAccumulators) {
  Watchdog watchdog(90s);
  const test::TempDir temp("rows-own-ckpt");
  Job job("rows-own-ckpt", rows_spec("kind = \"adam\"\nlr = 0.01\n", "", "f32", kRowwise));
  auto& server = job.start_server();
  job.wait_ready();
  const std::vector<std::uint64_t> row10{10};
  const std::vector<float> g(kDim, 2.0f);
  {
    Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
    w.wait_applied(w.push_rows("t", row10, g));
    w.leave();
  }
  const std::vector<float> before = pull_table(job.name(), 1);
  const std::filesystem::path file = temp.path() / "own.safetensors";
  const test::Ran made = test::run({"shmps-ctl", "checkpoint", job.name(), file.string()});
  ASSERT_EQ(made.code, 0) << made.out << server.output();
  const auto f = server::safetensors::File::read(file);
  ASSERT_TRUE(f.tensors().contains("t/rowwise_adagrad.s"));
  const auto& acc = f.tensors().at("t/rowwise_adagrad.s");
  EXPECT_EQ(acc.dtype, "F64");
  EXPECT_EQ(acc.shape, (std::vector<std::uint64_t>{kRows}));
  std::vector<double> accs(kRows);
  std::memcpy(accs.data(), f.data(acc).data(), kRows * sizeof(double));
  EXPECT_EQ(accs[10], 4.0);
  EXPECT_EQ(accs[11], 0.0);
  EXPECT_FALSE(f.tensors().contains("t/adam.m")) << "the job's Adam state is the dense parameter's only";
  EXPECT_TRUE(f.tensors().contains("h/adam.m"));
  ASSERT_TRUE(f.metadata().contains("shmps.optimizer.t"));
  EXPECT_NE(f.metadata().at("shmps.optimizer.t").find("\"rowwise_adagrad\""), std::string::npos);
  EXPECT_FALSE(f.metadata().contains("shmps.optimizer.h"));

  server.kill(SIGKILL);
  server.wait(10s);
  test::remove_segment(job.name());
  // A spec that updates the table with the job's Adam instead: refused, naming the table.
  Job other("rows-own-other", rows_spec("kind = \"adam\"\nlr = 0.01\n"));
  const test::Ran refused = test::run({"shmps-server", "--spec", other.spec_path(), "--restore", file.string()});
  EXPECT_NE(refused.code, 0);
  EXPECT_NE(refused.out.find("updated \"t\" with optimizer rowwise_adagrad"), std::string::npos) << refused.out;

  job.start_server({"--restore", file.string()});
  job.wait_ready();
  EXPECT_EQ(pull_table(job.name(), 2), before);
  {
    Worker w(WorkerOptions{.segment = job.name(), .rank = 3, .timeout = 20s});
    w.wait_applied(w.push_rows("t", row10, g));
    w.leave();
  }
  // Row 10's second step: the accumulator went on from 4 to 8 (a fresh one would step by lr again).
  std::vector<float> p10(before.begin() + 10 * kDim, before.begin() + 11 * kDim);
  double s10 = 4.0;
  rowwise_reference(p10, g, s10, 0.5, 1e-6);
  const std::vector<float> after = pull_table(job.name(), 4);
  for (std::uint64_t d = 0; d < kDim; ++d) EXPECT_FLOAT_EQ(after[10 * kDim + d], p10[d]) << d;
}
