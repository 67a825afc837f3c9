// Tables with open-ended keys ([[table]] keys = "u64"): any 64-bit key reads as its init until
// it is admitted, gets a slot at its first push (or its admit_after-th), and the least recently
// updated key is evicted when every slot is taken. With real server and worker processes: the
// policy by hand, lookups during constant eviction (never another key's row, never a torn one),
// exact sums through server SIGKILLs in the middle of admitting keys and through random kills of
// workers and server, and a checkpoint holding the keys beside the rows.
//
// SGD with learning rate 1 and small-integer gradients, as in test_tables.cpp: every value is
// exact, so a key's row must equal its init minus the sum of every committed push of the key.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/safetensors.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/key_index.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/splitmix.hpp>
#include <shmps/worker.hpp>

#include "../support/chaos.hpp"
#include "../support/expect.hpp"
#include "../support/harness.hpp"
#include "../support/pattern.hpp"

using namespace std::chrono_literals;
using namespace shmps;
using shmps::test::error_of;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Watchdog;

namespace {

constexpr std::uint64_t kDim = 8;
// How long the churn tests churn: sanitized processes are several times slower.
#if defined(SHMPS_SANITIZER_BUILD)
constexpr int kChurnMillis = 5000;
#else
constexpr int kChurnMillis = 1500;
#endif

// "t": `slots` slots of 8 (8 rows a 256-byte slice), keys = "u64", with `extra` table lines; a
// dense "h" beside it.
std::string keyed_spec(std::uint64_t slots, const std::string& extra = "", const std::string& job_extra = "") {
  return "max_workers = 8\nslice_bytes = 256\n" + job_extra + "[optimizer]\nkind = \"sgd\"\nlr = 1.0\n" +
         "[[param]]\nname = \"h\"\nshape = [4]\n[[table]]\nname = \"t\"\nrows = " + std::to_string(slots) +
         "\ndim = 8\nkeys = \"u64\"\n" + extra;
}

const shm::ParamEntry& table_entry(const shm::Segment& seg) {
  return seg.param(static_cast<std::uint32_t>(seg.find_param("t")));
}

// The rows of `keys` as worker `rank` pulls them.
std::vector<float> pull_keys(const std::string& segment, int rank, const std::vector<std::uint64_t>& keys) {
  Worker w(WorkerOptions{.segment = segment, .rank = rank, .timeout = 20s});
  std::vector<float> rows(keys.size() * kDim);
  w.pull_rows("t", keys, rows);
  w.leave();
  return rows;
}

std::vector<float> init_row(const shm::Segment& seg, std::uint64_t key) {
  std::vector<float> row(kDim);
  shm::keyed_init_row(table_entry(seg).keyed_init, key, row);
  return row;
}

std::uint64_t stat(const std::atomic<std::uint64_t>& counter) { return shm::load_acquire(counter); }

Process& start_keyed_pusher(Job& job, int rank, std::uint64_t pushes, std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"shmps-test-pusher", "rows", "--keys", "--pushes", std::to_string(pushes)};
  args.insert(args.end(), extra.begin(), extra.end());
  return job.start(args, {{"SHMPS_RANK", std::to_string(rank)}});
}

// The pattern's rows pushes (test_tables.cpp) sent as keys, with a zero init and at least as
// many slots as the pattern has ids (512): each key's row must be minus the sum of its rows.
constexpr std::uint64_t kPatternIds = 512;
void expect_exact_keyed(const std::string& segment, const std::vector<std::uint64_t>& pushes, int reader_rank = 7) {
  std::vector<double> want(kPatternIds * kDim, 0.0);
  for (std::uint64_t r = 0; r < pushes.size(); ++r)
    for (std::uint64_t k = 0; k < pushes[r]; ++k)
      for (std::uint64_t j = 0; j < test::kRowsPerPush; ++j) {
        const std::uint64_t id = test::rows_push_id(r, k, j, kPatternIds);
        for (std::uint64_t d = 0; d < kDim; ++d) want[id * kDim + d] -= test::pattern(r, k, j * kDim + d);
      }
  std::vector<std::uint64_t> keys(kPatternIds);
  for (std::uint64_t id = 0; id < kPatternIds; ++id) keys[id] = test::key_of_id(id);
  const std::vector<float> rows = pull_keys(segment, reader_rank, keys);
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < rows.size(); ++i)
    if (rows[i] != static_cast<float>(want[i]) && ++wrong <= 5)
      ADD_FAILURE() << "id " << i / kDim << " (key " << keys[i / kDim] << ") element " << i % kDim << ": " << rows[i]
                    << ", want " << want[i];
  EXPECT_EQ(wrong, 0u);
}

}  // namespace

// Keys anywhere in 64 bits read as their init (a key below the slots as that row of a table of
// row numbers would start); pushed, repeated keys summed, each holds exactly init minus its sum.
TEST(KeyedTables, AKeyReadsAsItsInitUntilPushedAndThenHoldsItsSum) {
  Watchdog watchdog(60s);
  Job job("keyed-basic", keyed_spec(16, "init = { kind = \"u24\", stream = 7, scale_divisor = 4 }\n"));
  job.start_server();
  job.wait_ready();
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const std::vector<std::uint64_t> keys{3, std::uint64_t{1} << 63, std::numeric_limits<std::uint64_t>::max(), 0};
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  EXPECT_TRUE(w.param("t").keyed);
  std::vector<float> rows(keys.size() * kDim);
  w.pull_rows("t", keys, rows);
  for (std::size_t k = 0; k < keys.size(); ++k)
    for (std::uint64_t d = 0; d < kDim; ++d) {
      ASSERT_EQ(rows[k * kDim + d], init_row(seg, keys[k])[d]) << "key " << keys[k];
      if (keys[k] == 3) {  // the u24 init of element 3 * 8 + d, as a table of row numbers has it
        EXPECT_EQ(rows[k * kDim + d], u24(splitmix_draw(7, 3 * kDim + d)) / 4.0f);
      }
    }
  EXPECT_NE(init_row(seg, keys[1]), init_row(seg, keys[2]));
  // Key 1 << 63 twice in one push, and again in a second push: its gradients summed.
  const std::vector<std::uint64_t> push{keys[1], keys[2], keys[1]};
  std::vector<float> grads(push.size() * kDim);
  for (std::size_t i = 0; i < grads.size(); ++i) grads[i] = static_cast<float>(i % 5) - 2.0f;
  w.push_rows("t", push, grads);
  w.wait_applied(w.push_rows("t", std::vector<std::uint64_t>{keys[1]}, std::vector<float>(kDim, 1.0f)));
  w.pull_rows("t", keys, rows);
  for (std::uint64_t d = 0; d < kDim; ++d) {
    EXPECT_EQ(rows[0 * kDim + d], init_row(seg, keys[0])[d]) << "key 3 was never pushed";
    // (u24 inits are not whole numbers: how the pushes fall into rounds moves the last bit)
    EXPECT_FLOAT_EQ(rows[1 * kDim + d], init_row(seg, keys[1])[d] - grads[d] - grads[2 * kDim + d] - 1.0f);
    EXPECT_FLOAT_EQ(rows[2 * kDim + d], init_row(seg, keys[2])[d] - grads[kDim + d]);
    EXPECT_EQ(rows[3 * kDim + d], init_row(seg, keys[3])[d]);
  }
  const shm::ParamStats& stats = seg.param_stats(static_cast<std::uint32_t>(seg.find_param("t")));
  EXPECT_EQ(stat(stats.keys_admitted), 2u);
  EXPECT_EQ(stat(stats.keys_held), 2u);
  EXPECT_EQ(stat(stats.keys_evicted), 0u);
}

// admit_after = 3: a key's first two pushes are dropped (and counted), the third gives it a slot.
TEST(KeyedTables, AdmitAfterDropsAKeysFirstPushes) {
  Watchdog watchdog(60s);
  Job job("keyed-admit", keyed_spec(16, "init = { kind = \"constant\", value = 0.5 }\nadmit_after = 3\n"));
  job.start_server();
  job.wait_ready();
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const shm::ParamStats& stats = seg.param_stats(static_cast<std::uint32_t>(seg.find_param("t")));
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  const std::vector<std::uint64_t> key{424242};
  std::vector<float> row(kDim);
  for (int push = 1; push <= 3; ++push) {
    w.wait_applied(w.push_rows("t", key, std::vector<float>(kDim, static_cast<float>(push))));
    w.pull_rows("t", key, row);
    const float want = push < 3 ? 0.5f : 0.5f - 3.0f;
    for (float v : row) ASSERT_EQ(v, want) << "after push " << push;
  }
  EXPECT_EQ(stat(stats.keys_refused_rows), 2u);
  EXPECT_EQ(stat(stats.keys_admitted), 1u);
}

// Eight slots: keys 100..107 fill them in order; 100 is pushed again (now the most recent), so
// key 108 evicts 101, the least recently updated; 101 reads as its init again, and when pushed
// again it is a new key (it evicts 102) that starts from its init.
TEST(KeyedTables, AFullTableEvictsTheLeastRecentlyUpdatedKey) {
  Watchdog watchdog(60s);
  Job job("keyed-evict", keyed_spec(8, "init = { kind = \"constant\", value = 0.25 }\n"));
  job.start_server();
  job.wait_ready();
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const shm::ParamStats& stats = seg.param_stats(static_cast<std::uint32_t>(seg.find_param("t")));
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  const auto push = [&](std::uint64_t key) {
    w.wait_applied(w.push_rows("t", std::vector<std::uint64_t>{key}, std::vector<float>(kDim, 1.0f)));
  };
  const auto value = [&](std::uint64_t key) {
    std::vector<float> row(kDim);
    w.pull_rows("t", std::vector<std::uint64_t>{key}, row);
    for (float v : row) EXPECT_EQ(v, row[0]) << "key " << key;
    return row[0];
  };
  for (std::uint64_t key = 100; key < 108; ++key) push(key);
  push(100);
  EXPECT_EQ(stat(stats.keys_evicted), 0u);
  push(108);
  EXPECT_EQ(stat(stats.keys_evicted), 1u);
  EXPECT_EQ(value(101), 0.25f) << "the least recently updated key was evicted: it reads as its init";
  EXPECT_EQ(value(100), 0.25f - 2.0f);
  EXPECT_EQ(value(102), 0.25f - 1.0f);
  EXPECT_EQ(value(108), 0.25f - 1.0f);
  push(101);
  EXPECT_EQ(value(101), 0.25f - 1.0f) << "admitted again: from its init";
  EXPECT_EQ(value(102), 0.25f) << "the next least recently updated was evicted for it";
  EXPECT_EQ(stat(stats.keys_evicted), 2u);
  EXPECT_EQ(stat(stats.keys_admitted), 10u);
  EXPECT_EQ(stat(stats.keys_held), 8u);
}

// Two pushers churn 600 keys through 64 slots (evictions all the time) while this process pulls
// keys: every row read must be its key's init minus a whole number m >= 0 of the key's churn
// gradient, the same m for every element: never a row of another key, never a torn row. (The
// u24 inits are not whole numbers, so m steps of float subtraction round: allowed for up to
// 1e-4 per step, against a difference of at least 1 for a wrong m in some element.)
TEST(KeyedTables, LookupsDuringEvictionNeverSeeAnotherKeysRowOrATornOne) {
  Watchdog watchdog(90s);
  Job job("keyed-churn", keyed_spec(64, "init = { kind = \"u24\", stream = 3, scale_divisor = 8 }\n"));
  job.start_server();
  job.wait_ready();
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  constexpr std::uint64_t kKeys = 600;
  std::vector<Process*> pushers;
  for (int r = 0; r < 2; ++r)
    pushers.push_back(&job.start({"shmps-test-pusher", "keyed-churn", "--pushes", std::to_string(kKeys), "--millis",
                                  std::to_string(kChurnMillis)},
                                 {{"SHMPS_RANK", std::to_string(r)}}));
  Worker reader(WorkerOptions{.segment = job.name(), .rank = 5, .timeout = 20s});
  std::vector<std::uint64_t> keys(32);
  std::vector<float> rows(keys.size() * kDim);
  std::uint64_t reads = 0, trained = 0, n = 0;
  std::size_t wrong = 0;
  // Until the pushers are done (at least 20 pushes each: evictions however slow they are).
  const auto pushing = [&] { return std::any_of(pushers.begin(), pushers.end(), [](Process* p) { return p->running(); }); };
  while (pushing()) {
    for (auto& key : keys) key = test::key_of_id((n++ * 7) % kKeys);
    reader.pull_rows("t", keys, rows);
    for (std::size_t k = 0; k < keys.size(); ++k, ++reads) {
      const std::vector<float> init = init_row(seg, keys[k]);
      const double m = std::round((init[0] - rows[k * kDim]) / test::churn_grad(keys[k], 0));
      const double tolerance = 1e-4 * (1 + m);
      bool ok = m >= 0;
      for (std::uint64_t d = 0; d < kDim; ++d)
        ok = ok && std::fabs(rows[k * kDim + d] - (init[d] - m * test::churn_grad(keys[k], d))) <= tolerance;
      if (m > 0) ++trained;
      if (!ok && ++wrong <= 5) ADD_FAILURE() << "key " << keys[k] << ": element 0 " << rows[k * kDim] << ", m " << m;
    }
  }
  for (auto* p : pushers) EXPECT_EQ(p->wait(30s), 0) << p->output();
  EXPECT_EQ(wrong, 0u);
  const shm::ParamStats& stats = seg.param_stats(static_cast<std::uint32_t>(seg.find_param("t")));
  std::cout << reads << " rows read, " << trained << " of them trained; " << stat(stats.keys_evicted)
            << " evictions\n";
  EXPECT_GT(stat(stats.keys_evicted), 10u) << "the churn must evict keys while this process reads";
  EXPECT_GT(trained, 0u) << "some reads must find trained rows";
  EXPECT_EQ(stat(stats.keys_held), 64u);
}

// The server SIGKILLed while it admits keys: in the middle of copying a slice's touched rows
// with their KeySlots (mid_rows), of a whole slice's copy (mid_copy), or after the apply but
// before the rings' heads moved (before_release: the next server takes the same records again,
// finds the keys its predecessor admitted, and skips what was applied), or in the middle of
// changing the key index (mid_index: evicted keys out, admitted ones not yet in). The next server
// rebuilds the index from the KeySlots; every key's row is the exact sum of its pushes.
class KeyedTableServerKill : public ::testing::TestWithParam<const char*> {};

TEST_P(KeyedTableServerKill, TheNextServerAdmitsNoKeyTwiceAndLosesNoRow) {
  Watchdog watchdog(90s);
  Job job("keyed-kill", keyed_spec(kPatternIds));
  auto& first = job.start_server({}, {{"SHMPS_KILL_AT", GetParam()}});
  job.wait_ready();
  std::vector<Process*> pushers;
  for (int r = 0; r < 3; ++r) pushers.push_back(&start_keyed_pusher(job, r, 300, {"--pause-us", "200"}));
  EXPECT_EQ(first.wait(30s), 128 + SIGKILL) << "the kill point was not reached:\n" << first.output();
  job.start_server();
  job.wait_ready();
  for (auto* p : pushers) EXPECT_EQ(p->wait(60s), 0) << p->output();
  expect_exact_keyed(job.name(), {300, 300, 300});
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const shm::ParamStats& stats = seg.param_stats(static_cast<std::uint32_t>(seg.find_param("t")));
  EXPECT_EQ(stat(stats.keys_evicted), 0u);
  EXPECT_EQ(stat(stats.keys_held), kPatternIds) << "every id of the pattern is pushed";
}

INSTANTIATE_TEST_SUITE_P(KillPoints, KeyedTableServerKill,
                         ::testing::Values("apply.mid_rows:2", "apply.mid_copy:2", "apply.before_release:2",
                                           "keys.mid_index:2"),
                         [](const ::testing::TestParamInfo<const char*>& p) {
                           const std::string point = p.param;
                           return point.find("mid_rows") != std::string::npos   ? std::string("MidRows")
                                  : point.find("mid_copy") != std::string::npos ? std::string("MidCopy")
                                  : point.find("mid_index") != std::string::npos ? std::string("MidIndex")
                                                                                  : std::string("BeforeRelease");
                         });

// Chaos: keyed rows pushers while workers and the server are SIGKILLed and restarted at random;
// every committed push counts exactly once.
TEST(KeyedTables, ExactSumsThroughRandomKillsOfWorkersAndServer) {
  constexpr int kSeconds = 8, kWorkers = 3;
#if defined(SHMPS_SANITIZER_BUILD)
  constexpr std::uint64_t kTarget = 3000;
#else
  constexpr std::uint64_t kTarget = 20000;
#endif
  Watchdog watchdog(std::chrono::seconds(kSeconds + 120));
  Job job("keyed-chaos", keyed_spec(kPatternIds));
  job.start_server();
  job.wait_ready();
  const unsigned seed = std::random_device{}();
  std::cout << "chaos seed " << seed << "\n";
  std::mt19937 rng(seed);
  std::vector<Process*> pushers(kWorkers);
  const auto paced = [&](int r) -> Process& { return start_keyed_pusher(job, r, kTarget, {"--pause-us", "100"}); };
  for (int r = 0; r < kWorkers; ++r) pushers[r] = &paced(r);
  const test::ChaosKills kills = test::kill_at_random(job, pushers, kSeconds, rng, paced, 300ms, 800ms);
  const std::vector<bool>& done = kills.done;
  const std::uint64_t worker_kills = kills.workers, server_kills = kills.server;
  for (int r = 0; r < kWorkers; ++r)
    if (!done[r] && !pushers[r]->running() && pushers[r]->wait(1s) != 0) pushers[r] = &start_keyed_pusher(job, r, kTarget);
  for (int r = 0; r < kWorkers; ++r) EXPECT_EQ(pushers[r]->wait(120s), 0) << pushers[r]->output();
  expect_exact_keyed(job.name(), std::vector<std::uint64_t>(kWorkers, kTarget));
  std::cout << "keyed table chaos: " << worker_kills << " worker kills, " << server_kills << " server kills, exact\n";
  EXPECT_GT(worker_kills, 0u);
  EXPECT_GT(server_kills, 0u);
}

// What a keyed table refuses, each with its message, changing nothing: a put, a view, and specs
// that cannot work.
TEST(KeyedTables, WhatCannotWorkIsRefusedWithAMessage) {
  Watchdog watchdog(60s);
  Job job("keyed-bad", keyed_spec(16));
  job.start_server();
  job.wait_ready();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  EXPECT_NE(error_of([&] { w.put("t", std::vector<float>(16 * kDim, 1.0f)); }).find("keys = \"u64\""), std::string::npos);
  EXPECT_NE(error_of([&] { (void)w.view("t"); }).find("use pull_rows() with the keys"), std::string::npos);
  // A wrong row width is refused as for any table, and nothing was pushed.
  EXPECT_NE(error_of([&] { w.push_rows("t", std::vector<std::uint64_t>{9}, std::vector<float>(3, 1.0f)); })
                .find("the gradient has 3"),
            std::string::npos);
  EXPECT_EQ(w.published(), 0u);
}

namespace {
// Tensor `name` of `file`: I64 [n], as int64 values.
std::vector<std::int64_t> i64_tensor(const server::safetensors::File& file, const std::string& name, std::uint64_t n) {
  const auto& t = file.tensors().at(name);
  EXPECT_EQ(t.dtype, "I64") << name;
  EXPECT_EQ(t.shape, std::vector<std::uint64_t>{n}) << name;
  std::vector<std::int64_t> out(n);
  std::memcpy(out.data(), file.data(t).data(), n * sizeof(std::int64_t));
  return out;
}
}  // namespace

// A checkpoint holds each slot's key and stamp beside its row ("t/keys", "t/key_stamps", I64);
// restored into a new segment (the old one lost), every key reads as before and the recency
// order goes on: the next new key evicts the key that was least recently updated before the
// checkpoint. shmps-ctl export writes the same tensors from the live job; a restore with a spec
// whose table has no keys is refused, naming the table.
TEST(KeyedTables, ACheckpointHoldsTheKeysBesideTheRowsAndRestoresThem) {
  Watchdog watchdog(90s);
  namespace fs = std::filesystem;
  namespace st = shmps::server::safetensors;
  const test::TempDir temp("keyed-ckpt");
  constexpr std::uint64_t kSlots = 16;
  Job job("keyed-ckpt", keyed_spec(kSlots, "init = { kind = \"constant\", value = 0.5 }\n"));
  auto& server = job.start_server();
  job.wait_ready();
  // 20 keys into 16 slots, one push each (keys 1000..1019; 1000..1003 evicted), then 1005 again.
  std::vector<std::uint64_t> keys;
  for (std::uint64_t k = 0; k < 20; ++k) keys.push_back(1000 + k);
  {
    Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
    for (const std::uint64_t key : keys)
      w.wait_applied(w.push_rows("t", std::vector<std::uint64_t>{key},
                                 std::vector<float>(kDim, static_cast<float>(key % 5 + 1))));
    w.wait_applied(w.push_rows("t", std::vector<std::uint64_t>{1005}, std::vector<float>(kDim, 1.0f)));
    w.leave();
  }
  const std::vector<float> before = pull_keys(job.name(), 1, keys);
  EXPECT_EQ(before[0], 0.5f) << "key 1000 was evicted";
  EXPECT_EQ(before[5 * kDim], 0.5f - 1.0f - 1.0f) << "key 1005: pushed twice";

  const fs::path file = temp.path() / "keyed.safetensors";
  const test::Ran made = test::run({"shmps-ctl", "checkpoint", job.name(), file.string()});
  ASSERT_EQ(made.code, 0) << made.out << server.output();
  const fs::path exported = temp.path() / "keyed-export.safetensors";
  const test::Ran exp = test::run({"shmps-ctl", "export", job.name(), exported.string()});
  ASSERT_EQ(exp.code, 0) << exp.out;
  for (const fs::path& path : {file, exported}) {
    const auto f = st::File::read(path);
    const std::vector<float> rows = f.f32("t", {kSlots, kDim});
    const std::vector<std::int64_t> held = i64_tensor(f, "t/keys", kSlots), stamps = i64_tensor(f, "t/key_stamps", kSlots);
    std::vector<std::uint64_t> in_file;
    for (std::uint64_t s = 0; s < kSlots; ++s) {
      ASSERT_NE(stamps[s], 0) << path << ": every slot is taken";
      const auto key = static_cast<std::uint64_t>(held[s]);
      in_file.push_back(key);
      const auto at = static_cast<std::size_t>(std::find(keys.begin(), keys.end(), key) - keys.begin());
      ASSERT_LT(at, keys.size()) << path << ": slot " << s << " holds key " << key;
      for (std::uint64_t d = 0; d < kDim; ++d) EXPECT_EQ(rows[s * kDim + d], before[at * kDim + d]) << path << " key " << key;
    }
    std::sort(in_file.begin(), in_file.end());
    EXPECT_EQ(in_file, std::vector<std::uint64_t>(keys.begin() + 4, keys.end())) << path;
  }

  server.kill(SIGKILL);
  server.wait(10s);
  test::remove_segment(job.name());
  {
    Job plain("keyed-ckpt-plain", "max_workers = 8\nslice_bytes = 256\n[optimizer]\nkind = \"sgd\"\nlr = 1.0\n"
                                  "[[param]]\nname = \"h\"\nshape = [4]\n[[table]]\nname = \"t\"\nrows = 16\ndim = 8\n");
    auto& refused = plain.start_server({"--restore", file.string()});
    EXPECT_NE(refused.wait(20s), 0);
    EXPECT_NE(refused.output().find("holds the keys of \"t\""), std::string::npos) << refused.output();
  }
  job.start_server({"--restore", file.string()});
  job.wait_ready();
  EXPECT_EQ(pull_keys(job.name(), 2, keys), before);
  {
    Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
    w.wait_applied(w.push_rows("t", std::vector<std::uint64_t>{5000}, std::vector<float>(kDim, 1.0f)));
    w.leave();
  }
  // The least recently updated before the checkpoint: 1004 (1005 was pushed again after it).
  const std::vector<float> after = pull_keys(job.name(), 3, {1004, 1006, 5000});
  EXPECT_EQ(after[0], 0.5f) << "key 1004 was the least recently updated, and is evicted";
  EXPECT_EQ(after[kDim], before[6 * kDim]);
  EXPECT_EQ(after[2 * kDim], 0.5f - 1.0f);
}

// The tools show a keyed table's keys: shmps-top --json (table.keys), --prometheus, and
// shmps-ctl inspect, after 12 keys through 8 slots with admit_after = 2 (each key pushed twice:
// its first row dropped).
TEST(KeyedTables, TopAndInspectShowTheKeys) {
  Watchdog watchdog(60s);
  Job job("keyed-top", keyed_spec(8, "admit_after = 2\n"));
  job.start_server();
  job.wait_ready();
  {
    Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
    for (std::uint64_t key = 0; key < 12; ++key)
      for (int twice = 0; twice < 2; ++twice)
        w.wait_applied(w.push_rows("t", std::vector<std::uint64_t>{key << 40}, std::vector<float>(kDim, 1.0f)));
    w.leave();
  }
  const test::Ran r = test::run({"shmps-top", job.name(), "--json"});
  ASSERT_EQ(r.code, 0) << r.out;
  const auto j = nlohmann::json::parse(r.out);
  for (const auto& p : j.at("params")) {
    if (p.at("name") != "t") {
      EXPECT_FALSE(p.contains("table"));
      continue;
    }
    const auto& keys = p.at("table").at("keys");
    EXPECT_EQ(keys.at("kind"), "u64");
    EXPECT_EQ(keys.at("admit_after"), 2u);
    EXPECT_EQ(keys.at("held"), 8u);
    EXPECT_EQ(keys.at("admitted"), 12u);
    EXPECT_EQ(keys.at("evicted"), 4u);
    EXPECT_EQ(keys.at("refused_rows"), 12u);
  }
  const test::Ran prom = test::run({"shmps-top", job.name(), "--prometheus"});
  EXPECT_NE(prom.out.find("shmps_table_keys_evicted_total{segment=\"" + job.name() + "\",param=\"t\"} 4"),
            std::string::npos)
      << prom.out;
  const test::Ran inspect = test::run({"shmps-ctl", "inspect", job.name()});
  EXPECT_NE(inspect.out.find("keys u64: 8 of 8 slots held, 12 admitted, 4 evicted, 12 rows dropped"),
            std::string::npos)
      << inspect.out;
}

// The click-through model (docs/workloads.md §4) trained by one C++ worker through a table with
// keys = "u64" holding every key: the ids are the keys, a key below the slots starts from that
// row's init, and one worker that pulls once its own steps are applied ends bit for bit where
// the local trainer does (the same weights hash), so keys cost nothing in what is learnt.
TEST(KeyedTables, TheClickThroughModelTrainsThroughKeysExactlyAsLocally) {
  Watchdog watchdog(120s);
  const std::string spec =
      "slice_bytes = 65536\nmax_workers = 2\nring_bytes = 4194304\n[optimizer]\nkind = \"sgd\"\nlr = 1.0\n"
      "[[param]]\nname = \"head.weight\"\nshape = [1, 16]\ninit = { kind = \"u24\", stream = 25, scale_divisor = 4 }\n"
      "[[param]]\nname = \"head.bias\"\nshape = [1]\ninit = \"zeros\"\n"
      "[[table]]\nname = \"emb\"\nrows = 1048576\ndim = 16\nkeys = \"u64\"\n"
      "init = { kind = \"u24\", stream = 24, scale_divisor = 64 }\n";
  const auto hash_of = [](const std::string& out) {
    const auto at = out.find("weights-hash ");
    return at == std::string::npos ? std::string("(none)") : out.substr(at, 31);
  };
  Process local({"shmps-worker", "--model", "ctr", "--local", "--samples", "204800"});
  ASSERT_EQ(local.wait(60s), 0) << local.output();
  Job job("keyed-ctr", spec);
  job.start_server();
  job.wait_ready();
  auto& worker = job.start({"shmps-worker", "--model", "ctr", "--samples", "204800"}, {{"SHMPS_RANK", "0"}});
  ASSERT_EQ(worker.wait(90s), 0) << worker.output();
  EXPECT_NE(hash_of(local.output()), "(none)") << local.output();
  EXPECT_EQ(hash_of(worker.output()), hash_of(local.output())) << worker.output();
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  EXPECT_GT(stat(seg.param_stats(static_cast<std::uint32_t>(seg.find_param("emb"))).keys_held), 10000u);
}

// Eviction through crashes: two pushers churn 600 keys through 64 slots while the server is
// SIGKILLed again and again at kill points in the middle of admitting and evicting keys (a
// slice's rows and KeySlots half copied in, the index half changed, a round applied but not
// released). Afterwards the table must be whole: no key in two slots, the index finding every
// slot's key at that slot, the held count the slots taken, and every row read its key's init
// minus a whole number of its churn gradients (never another key's row).
TEST(KeyedTables, EvictionThroughServerKillsLeavesTheTableWhole) {
  Watchdog watchdog(180s);
  Job job("keyed-evict-kill", keyed_spec(64, "init = { kind = \"constant\", value = 0.5 }\n"));
  job.start_server();
  job.wait_ready();
  constexpr std::uint64_t kKeys = 600;
  std::vector<Process*> pushers;
  for (int r = 0; r < 2; ++r)
    pushers.push_back(&job.start({"shmps-test-pusher", "keyed-churn", "--pushes", std::to_string(kKeys), "--millis",
                                  std::to_string(4 * kChurnMillis + 8000)},
                                 {{"SHMPS_RANK", std::to_string(r)}}));
  {
    // The pushers under way (started, attached, admitting keys) before the killing starts.
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    const auto& admitted = seg.param_stats(static_cast<std::uint32_t>(seg.find_param("t"))).keys_admitted;
    const auto until = std::chrono::steady_clock::now() + 30s;
    while (stat(admitted) < 64 && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(10ms);
    ASSERT_GE(stat(admitted), 64u) << "the pushers did not start";
  }
  const char* points[] = {"apply.mid_rows", "keys.mid_index", "apply.before_release", "apply.mid_copy"};
  int kills = 0;
  for (int round = 0; round < 8; ++round) {
    std::this_thread::sleep_for(200ms);
    job.server().kill(SIGKILL);
    job.server().wait(10s);
    const std::string point = std::string(points[round % 4]) + ":" + std::to_string(2 + round);
    auto& server = job.start_server({}, {{"SHMPS_KILL_AT", point}});
    job.wait_ready();
    // Reached its kill point within a few seconds, or killed at the top of the next round.
    const auto until = std::chrono::steady_clock::now() + 5s;
    while (server.running() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(10ms);
    if (!server.running() && server.wait(1s) == 128 + SIGKILL) ++kills;
  }
  job.server().kill(SIGKILL);
  job.server().wait(10s);
  job.start_server();
  job.wait_ready();
  for (auto* p : pushers) EXPECT_EQ(p->wait(60s), 0) << p->output();
  std::cout << kills << " servers killed at their kill point\n";
  EXPECT_GT(kills, 0);

  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const shm::ParamEntry& t = table_entry(seg);
  const shm::KeySlot* slots = seg.key_slots(t);
  std::vector<std::uint64_t> keys;
  std::vector<std::uint64_t> taken;
  for (std::uint64_t s = 0; s < 64; ++s)
    if (slots[s].stamp != 0) {
      keys.push_back(slots[s].key);
      taken.push_back(s);
    }
  std::vector<std::uint64_t> sorted = keys;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end()) << "a key in two slots";
  std::vector<std::uint64_t> found(keys.size());
  ASSERT_TRUE(shm::find_key_slots(seg, t, keys, found, 5s));
  EXPECT_EQ(found, taken) << "the index must find every slot's key at that slot";
  EXPECT_EQ(stat(seg.param_stats(static_cast<std::uint32_t>(seg.find_param("t"))).keys_held), taken.size());
  EXPECT_EQ(taken.size(), 64u) << "600 keys through 64 slots fill them";
  std::vector<std::uint64_t> all(kKeys);
  for (std::uint64_t id = 0; id < kKeys; ++id) all[id] = test::key_of_id(id);
  const std::vector<float> rows = pull_keys(job.name(), 5, all);
  std::size_t wrong = 0;
  for (std::uint64_t k = 0; k < kKeys; ++k) {
    const double m = (0.5 - rows[k * kDim]) / test::churn_grad(all[k], 0);
    bool ok = m >= 0 && m == std::round(m);
    for (std::uint64_t d = 0; d < kDim; ++d)
      ok = ok && rows[k * kDim + d] == 0.5f - static_cast<float>(m) * test::churn_grad(all[k], d);
    if (!ok && ++wrong <= 5) ADD_FAILURE() << "key " << all[k] << ": element 0 " << rows[k * kDim];
  }
  EXPECT_EQ(wrong, 0u);
}
