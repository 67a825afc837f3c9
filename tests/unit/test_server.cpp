// The server and a worker in one process, the server driven one apply round at a time, so
// that crash states can be built by hand (a cursor not advanced, a version word left odd).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cstring>

#include <cmath>
#include <thread>
#include <vector>

#include <shmps/server/model_spec.hpp>
#include <shmps/server/server.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/worker.hpp>

#include "../support/expect.hpp"
#include "../support/harness.hpp"

using namespace std::chrono_literals;
using namespace shmps;

using shmps::test::error_of;

namespace {

std::unique_ptr<server::Server> start_server(const std::string& name, const std::string& body) {
  server::ServerOptions options;
  options.spec = server::parse_model_spec("name = \"" + name + "\"\n" + body, "<test spec>");
  options.threads = 2;
  auto s = std::make_unique<server::Server>(std::move(options));
  s->start();
  return s;
}

struct Fixture : ::testing::Test {
  std::string name = test::unique_segment("server");
  ~Fixture() override { test::remove_segment(name); }
};

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


}  // namespace

using ServerRounds = Fixture;

TEST_F(ServerRounds, APushIsInvisibleUntilAppliedThenWhole) {
  auto server = start_server(name, kSgd);
  Worker w(WorkerOptions{.segment = name, .rank = 0});
  std::vector<float> grad(1000, 2.0f), values(1000);
  const auto seq = w.push("p", grad);
  EXPECT_EQ(seq, 1u);
  EXPECT_EQ(w.pull("p", values), 0u);
  EXPECT_EQ(values[0], 10.0f);
  EXPECT_EQ(server->apply_round(), 1u);
  w.wait_applied(seq);
  EXPECT_EQ(w.pull("p", values), 1u);
  for (float v : values) ASSERT_EQ(v, 8.0f);
  // A range push touches only its range, across a slice boundary (256 floats per slice).
  std::vector<float> part(100, 1.0f);
  w.push("p", 200, part);
  server->apply_round();
  w.pull("p", values);
  EXPECT_EQ(values[199], 8.0f);
  EXPECT_EQ(values[200], 7.0f);
  EXPECT_EQ(values[299], 7.0f);
  EXPECT_EQ(values[300], 8.0f);
  std::vector<float> slice1(256);
  EXPECT_EQ(w.pull("p", 256, slice1), 2u);  // slice 1 saw both updates
  std::vector<float> slice3(256);
  EXPECT_EQ(w.pull("p", 768, std::span<float>(slice3.data(), 232)), 1u);  // slice 3 only the first
}

TEST_F(ServerRounds, RecordsReplayedAfterACrashBeforeTheCursorAdvancedAreAppliedOnce) {
  auto server = start_server(name, kSgd);
  Worker w(WorkerOptions{.segment = name, .rank = 1});
  std::vector<float> grad(1000, 1.0f);
  w.push("p", grad);
  w.push("p", 0, std::span<const float>(grad.data(), 10));
  auto& seg = const_cast<shm::Segment&>(server->segment());
  const std::uint64_t head_before = shm::load_acquire(seg.ring(1).head);
  EXPECT_EQ(server->apply_round(), 2u);
  // The crash state: values applied, but the ring cursor and the applied count not yet moved.
  shm::store_release(seg.ring(1).head, head_before);
  shm::store_release(seg.slot(1).applied, std::uint64_t{0});
  EXPECT_EQ(server->apply_round(), 2u);  // the records are read again...
  std::vector<float> values(1000);
  w.pull("p", values);
  EXPECT_EQ(values[0], 8.0f);  // ...but applied once: 10 - 1 - 1
  EXPECT_EQ(values[999], 9.0f);
  // 4 slices of 256 floats: the first record touched all 4, the second 1; all 5 skipped.
  EXPECT_EQ(shm::load_counter(seg.header().records_skipped), 5u);
  EXPECT_EQ(w.applied(), 2u);
}

TEST_F(ServerRounds, AVersionWordLeftOddIsRepairedByTheNextServer) {
  {
    auto server = start_server(name, kSgd);
    auto& seg = const_cast<shm::Segment&>(server->segment());
    shm::store_release(seg.slice(2).version, std::uint64_t{7});  // a server "died" mid-write
    Worker w(WorkerOptions{.segment = name, .rank = 0, .timeout = 200ms});
    std::vector<float> values(1000);
    const std::string msg = error_of([&] { w.pull("p", values); });
    EXPECT_NE(msg.find("mid-update"), std::string::npos) << msg;
    std::vector<float> first(256);
    EXPECT_EQ(w.pull("p", 0, first), 0u);  // other slices still read fine
  }
  auto server = start_server(name, kSgd);
  EXPECT_TRUE(server->recovered());
  Worker w(WorkerOptions{.segment = name, .rank = 0, .timeout = 200ms});
  std::vector<float> values(1000);
  EXPECT_EQ(w.pull("p", values), 0u);
  EXPECT_EQ(shm::load_acquire(server->segment().slice(2).version) % 2, 0u);
  EXPECT_EQ(shm::load_acquire(server->segment().header().server_epoch), 2u);
}

TEST_F(ServerRounds, AFullRingMakesThePusherWaitThenFailClearlyWithNothingPushed) {
  auto server = start_server(name, R"(
max_workers = 2
ring_bytes = 65536
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "p"
shape = [4096]
)");
  Worker w(WorkerOptions{.segment = name, .rank = 0, .timeout = 300ms});
  std::vector<float> grad(4096, 1.0f);
  int pushed = 0;
  std::string msg;
  for (int i = 0; i < 10 && msg.empty(); ++i) {
    msg = error_of([&] { w.push("p", grad); });
    if (msg == "(no error)") {
      msg.clear();
      ++pushed;
    }
  }
  EXPECT_EQ(pushed, 3);  // 3 records of 16 KiB + 64 B fit in 64 KiB
  EXPECT_NE(msg.find("has been full"), std::string::npos) << msg;
  EXPECT_NE(msg.find("nothing was pushed"), std::string::npos) << msg;
  EXPECT_EQ(w.published(), 3u);
  server->apply_round();
  EXPECT_EQ(w.push("p", grad), 4u);  // room again after the server consumed
}

TEST_F(ServerRounds, ClipByNormUsesTheWholePushsNorm) {
  auto server = start_server(name, R"(
max_workers = 2
slice_bytes = 64
[optimizer]
kind = "sgd"
lr = 1.0
clip_norm = 1.0
[[param]]
name = "p"
shape = [32]
)");
  Worker w(WorkerOptions{.segment = name, .rank = 0});
  // Norm 5 over two slices (16 floats each): scaled to norm 1 as a whole, not per slice.
  std::vector<float> grad(32, 0.0f), values(32);
  grad[0] = 3.0f;
  grad[31] = 4.0f;
  w.push("p", grad);
  server->apply_round();
  w.pull("p", values);
  EXPECT_FLOAT_EQ(values[0], -0.6f);
  EXPECT_FLOAT_EQ(values[31], -0.8f);
}

TEST_F(ServerRounds, AdamKeepsItsStateInTheSegment) {
  auto server = start_server(name, R"(
max_workers = 2
[optimizer]
kind = "adam"
lr = 0.1
[[param]]
name = "p"
shape = [4]
)");
  Worker w(WorkerOptions{.segment = name, .rank = 0});
  std::vector<float> grad{1.0f, -2.0f, 0.5f, 0.0f}, values(4);
  w.push("p", grad);
  server->apply_round();
  w.pull("p", values);
  // Adam's first step moves each weight by lr * sign(g) (bias-corrected m / sqrt(v) = g / |g|).
  EXPECT_NEAR(values[0], -0.1f, 1e-6);
  EXPECT_NEAR(values[1], 0.1f, 1e-6);
  EXPECT_NEAR(values[2], -0.1f, 1e-6);
  EXPECT_EQ(values[3], 0.0f);
  const auto& seg = server->segment();
  const auto& p = seg.param(0);
  ASSERT_NE(p.state_offset[0], 0u);
  ASSERT_NE(p.state_offset[1], 0u);
  const float* m = shm::at<float>(seg.base(), p.state_offset[0]);
  EXPECT_NEAR(m[1], -0.2f, 1e-6);  // (1 - beta1) * g
}

TEST_F(ServerRounds, NonFiniteGradientsAreRejectedCountedAndChangeNothing) {
  auto server = start_server(name, kSgd);
  Worker w(WorkerOptions{.segment = name, .rank = 0});
  std::vector<float> grad(1000, 1.0f), values(1000);
  grad[777] = std::nanf("");
  std::string msg = error_of([&] { w.push("p", grad); });
  EXPECT_NE(msg.find("element 777 is NaN"), std::string::npos) << msg;
  grad[777] = INFINITY;
  msg = error_of([&] { w.push("p", grad); });
  EXPECT_NE(msg.find("element 777 is infinite"), std::string::npos) << msg;
  EXPECT_EQ(w.published(), 0u);
  EXPECT_EQ(server->apply_round(), 0u);
  w.pull("p", values);
  for (float v : values) ASSERT_EQ(v, 10.0f);
  EXPECT_EQ(shm::load_counter(server->segment().slot(0).pushes_rejected), 2u);
}

TEST_F(ServerRounds, ASecondServerForTheSameSegmentFailsFast) {
  auto server = start_server(name, kSgd);
  const std::string msg = error_of([&] { start_server(name, kSgd); });
  EXPECT_NE(msg.find("already served by a live server (pid " + std::to_string(getpid()) + ")"), std::string::npos) << msg;
}

// BSP, a 64 KiB ring, and a parameter of 4096 floats: a whole push is 16 KiB + a 64-byte header.
constexpr const char* kBspInA64KiBRing = R"(
max_workers = 2
ring_bytes = 65536
consistency = "bsp"
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "p"
shape = [4096]
)";

TEST_F(ServerRounds, ABspStepLargerThanTheRingFailsAtOnceInsteadOfWaitingForever) {
  auto server = start_server(name, kBspInA64KiBRing);
  Worker w(WorkerOptions{.segment = name, .rank = 0, .timeout = 30s});
  server->apply_round();  // admits the worker to the BSP group
  std::vector<float> grad(4096, 1.0f);
  for (int i = 0; i < 3; ++i) w.push("p", grad);  // 3 x 16 KiB in one open step
  const auto started = std::chrono::steady_clock::now();
  const std::string msg = error_of([&] { w.push("p", grad); });
  EXPECT_NE(msg.find("fill the whole ring"), std::string::npos) << msg;
  EXPECT_NE(msg.find("raise ring_bytes"), std::string::npos) << msg;
  EXPECT_LT(std::chrono::steady_clock::now() - started, 5s);  // not the 30 s timeout
  EXPECT_EQ(w.published(), 3u);
  // Ending the step lets the server take it; then there is room again.
  w.clock();
  server->apply_round();
  EXPECT_EQ(w.push("p", grad), 4u);
}

TEST_F(ServerRounds, ABspStepThatStartsOverAtTheRingsBeginningStillHasTheWholeRing) {
  auto server = start_server(name, kBspInA64KiBRing);
  Worker w(WorkerOptions{.segment = name, .rank = 0, .timeout = 30s});
  server->apply_round();  // admits the worker to the BSP group
  std::vector<float> grad(4096, 1.0f);  // 16 KiB + a 64-byte header per record
  w.push("p", grad);
  w.push("p", grad);
  w.clock();
  server->apply_round();  // the ring is empty, its tail half way round
  // The next step starts over at the ring's beginning behind a padding record; the server gives
  // the padding back while the step is still open, so the step has the ring's room as before:
  // three records fit, the fourth is refused at once.
  std::atomic<bool> stop{false};
  std::thread rounds([&] {
    while (!stop.load()) {
      server->apply_round();
      std::this_thread::sleep_for(1ms);
    }
  });
  EXPECT_EQ(w.push("p", grad), 3u);
  EXPECT_EQ(w.push("p", grad), 4u);
  EXPECT_EQ(w.push("p", grad), 5u);
  const std::string msg = error_of([&] { w.push("p", grad); });
  EXPECT_NE(msg.find("fill the whole ring"), std::string::npos) << msg;
  w.clock();
  const auto until = std::chrono::steady_clock::now() + 10s;
  while (w.applied() < 5 && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
  stop = true;
  rounds.join();
  EXPECT_EQ(w.applied(), 5u);
  std::vector<float> values(4096);
  w.pull("p", values);
  for (float v : values) ASSERT_EQ(v, -5.0f);
}

namespace {
std::vector<std::byte> bytes_of(const std::string& text) {
  std::vector<std::byte> out(text.size());
  std::memcpy(out.data(), text.data(), text.size());
  return out;
}
std::string text_of(const std::vector<std::byte>& bytes) { return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size()); }
}  // namespace

TEST_F(ServerRounds, ResumeStateIsCommittedWithItsStepAndFoundByTheNextProcess) {
  auto server = start_server(name, kSgd);
  std::vector<float> grad(1000, 1.0f);
  {
    Worker w(WorkerOptions{.segment = name, .rank = 2});
    EXPECT_TRUE(w.load_state().empty());
    w.save_state(bytes_of("batch=1"));
    EXPECT_TRUE(w.load_state().empty());  // staged, not committed
    w.push("p", grad);
    w.clock();
    EXPECT_EQ(text_of(w.load_state()), "batch=1");
    const std::string big(2000, 'x');
    EXPECT_NE(error_of([&] { w.save_state(bytes_of(big)); }).find("more than the 1024"), std::string::npos);
  }
  // Not consumed yet: the next process finds it in the ring.
  {
    Worker w(WorkerOptions{.segment = name, .rank = 2});
    EXPECT_EQ(w.generation(), 2u);
    EXPECT_EQ(text_of(w.load_state()), "batch=1");
  }
  server->apply_round();
  // Consumed: the server kept it in the slot.
  {
    Worker w(WorkerOptions{.segment = name, .rank = 2});
    EXPECT_EQ(text_of(w.load_state()), "batch=1");
    EXPECT_EQ(shm::load_acquire(server->segment().slot(2).resume_bytes), 7u);
  }
}

TEST_F(ServerRounds, AStepThatNeverEndedDoesNotMoveTheResumeState) {
  auto server = start_server(name, std::string("consistency = \"bsp\"\n") + kSgd);
  // A child process ends step 0 with state "batch=1", starts step 1 with state "batch=2" staged
  // and a push committed, and dies before clock(): the kernel drops its slot lock.
  const pid_t child = fork();
  if (child == 0) {
    Worker w(WorkerOptions{.segment = name, .rank = 0});
    std::vector<float> grad(1000, 1.0f);
    w.save_state(bytes_of("batch=1"));
    w.push("p", grad);
    w.clock();
    w.save_state(bytes_of("batch=2"));
    w.push("p", grad);
    _exit(0);  // no leave(), no destructor: as if killed
  }
  // This process plays the server meanwhile: it admits the child and applies its step 0.
  int status = 0;
  while (waitpid(child, &status, WNOHANG) == 0) {
    server->apply_round();
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  Worker w(WorkerOptions{.segment = name, .rank = 0});
  EXPECT_EQ(text_of(w.load_state()), "batch=1");
  EXPECT_EQ(w.published(), 2u);  // both pushes were committed...
  server->apply_round();         // (admits the new generation)
  std::vector<float> values(1000);
  w.pull("p", values);
  EXPECT_EQ(values[0], 9.0f);  // ...but only step 0 counted: 10 - 1
  w.clock();                   // the new generation ends step 1: the dead one's open step is discarded whole
  server->apply_round();
  w.pull("p", values);
  EXPECT_EQ(values[0], 9.0f);
  EXPECT_EQ(shm::load_counter(server->segment().header().records_discarded), 1u);
}

// The monitor's metrics, written as the server applies: per parameter (pushes, slice updates,
// the newest gradient's norm, a sampled value norm per slice), per worker (rejected gradients by
// parameter, the commit time of its newest push) and the server's latency histogram.
TEST_F(ServerRounds, MetricsForTheMonitorFollowWhatWasApplied) {
  auto server = start_server(name, kSgd);
  Worker w(WorkerOptions{.segment = name, .rank = 1});
  const auto& seg = server->segment();
  std::vector<float> grad(1000, 0.5f);
  w.push("p", grad);
  std::vector<float> part(300, 2.0f);
  w.push("p", 100, part);  // slices 0 and 1 (256 floats each)
  EXPECT_EQ(server->apply_round(), 2u);

  const auto& stats = seg.param_stats(0);
  EXPECT_EQ(shm::load_acquire(stats.pushes), 2u);
  EXPECT_EQ(shm::load_acquire(stats.slice_updates), 4u + 2u);  // 4 slices, then 2
  EXPECT_EQ(shm::load_acquire(stats.floats_applied), 1300u);
  EXPECT_EQ(std::bit_cast<double>(shm::load_acquire(stats.last_grad_sq_norm)), 300 * 4.0);
  EXPECT_EQ(shm::load_acquire(stats.last_grad_floats), 300u);
  // Slice 3 (elements 768..999) was updated once, from 10 to 9.5: its norm was sampled then.
  EXPECT_EQ(std::bit_cast<double>(shm::load_acquire(seg.slice(3).value_sq_norm)), 232 * 9.5 * 9.5);
  // Both pushes were applied in one round: the newer one's latency was sampled.
  EXPECT_EQ(shm::load_acquire(seg.header().latency_samples), 1u);
  std::uint64_t in_buckets = 0;
  for (const auto& b : seg.header().latency_buckets) in_buckets += shm::load_acquire(b);
  EXPECT_EQ(in_buckets, 1u);
  EXPECT_GT(shm::load_acquire(seg.header().apply_busy_ns), 0u);
  // A NaN gradient is refused by the worker and counted in its row, for that parameter.
  grad[7] = std::nanf("");
  EXPECT_HAS(error_of([&] { w.push("p", grad); }), "NaN");
  EXPECT_EQ(shm::load_acquire(seg.rejected(1, 0)), 1u);
  EXPECT_EQ(shm::load_acquire(seg.rejected(0, 0)), 0u);
  EXPECT_EQ(shm::load_acquire(seg.slot(1).last_commit_seq), 2u);
}
