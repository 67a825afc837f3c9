// Zero-copy pushes (Worker::borrow_push, PushBuffer) against a real shmps-server: a borrowed
// gradient is applied bit for bit as the same push() would be; a NaN, a dropped buffer, misuse,
// a full ring and a BSP step behave as push() does; and a process SIGKILLed while it holds a
// filled buffer, or at the kill point before its commit, leaves nothing behind (exact sums).
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/ring.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/exact.hpp"
#include "../support/expect.hpp"
#include "../support/harness.hpp"
#include "../support/pattern.hpp"

using namespace std::chrono_literals;
using shmps::PushBuffer;
using shmps::Worker;
using shmps::WorkerOptions;
using shmps::test::error_of;
using shmps::test::expect_exact_sum;
using shmps::test::Job;
using shmps::test::kPatternB;
using shmps::test::kPatternW;
using shmps::test::pattern;
using shmps::test::pattern_spec;
using shmps::test::Process;
using shmps::test::Watchdog;
namespace shm = shmps::shm;

namespace {

std::vector<float> pull_all(Worker& w, const char* name) {
  std::vector<float> v(w.param(name).size);
  w.pull(name, v);
  return v;
}

std::uint64_t ring_tail(const shm::Segment& seg, unsigned rank) { return shm::load_acquire(seg.ring(rank).tail); }

// Waits until the server has consumed everything in the ring of `rank` (bounded).
void wait_drained(const shm::Segment& seg, unsigned rank) {
  const auto until = std::chrono::steady_clock::now() + 10s;
  while (shm::load_acquire(seg.ring(rank).head) != shm::load_acquire(seg.ring(rank).tail) &&
         std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(1ms);
  EXPECT_EQ(shm::load_acquire(seg.ring(rank).head), shm::load_acquire(seg.ring(rank).tail));
}

// Waits until `text` shows up in the process's output (bounded); false if it does not.
bool wait_for_output(Process& p, const std::string& text, std::chrono::milliseconds limit = 20s) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < until) {
    if (shmps::test::has(p.output(), text)) return true;
    if (!p.running()) return false;
    std::this_thread::sleep_for(5ms);
  }
  return false;
}

// ---- Bit for bit against push() ------------------------------------------------------------------

// Adam with weight decay and clipping by norm (so the squared norm commit() computes matters), on
// non-integer gradients; "big" records are over 1 MiB, where push() copies with streaming stores.
const std::string kAdamSpec = R"(
slice_bytes = 65536
max_workers = 4
[optimizer]
kind = "adam"
lr = 0.01
weight_decay = 0.001
clip_norm = 50.0
[[param]]
name = "w"
shape = [3, 40000]
init = { kind = "u24", stream = 3, scale_divisor = 10 }
[[param]]
name = "big"
shape = [300000]
init = { kind = "u24", stream = 4, scale_divisor = 10 }
[[param]]
name = "b"
shape = [7]
)";

struct Model {
  std::vector<float> w, big, b;
};

// One job, one worker, the same pushes (each applied before the next, so every apply round holds
// exactly one record); `zero_copy` makes each of them a borrowed buffer filled in place.
Model run_adam_job(bool zero_copy, Model* initial) {
  Job job(zero_copy ? "zc-bits-borrow" : "zc-bits-push", kAdamSpec);
  job.start_server();
  job.wait_ready();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0});
  if (initial != nullptr) *initial = Model{pull_all(w, "w"), pull_all(w, "big"), pull_all(w, "b")};
  struct Piece {
    const char* param;
    std::size_t offset, count;
  };
  for (std::uint64_t k = 0; k < 3; ++k) {
    const Piece pieces[] = {{"w", 0, kPatternW},
                            {"w", 1000 + 7 * k, 50000},
                            {"big", 0, 300000},
                            {"big", 12345 + k, 262149},  // 1 MiB and a bit: streaming stores in push()
                            {"b", 0, kPatternB}};
    for (const Piece& p : pieces) {
      std::vector<float> g(p.count);
      for (std::size_t j = 0; j < p.count; ++j)
        g[j] = 3.0f * std::sin(0.001f * static_cast<float>(j) * static_cast<float>(k + 1)) + 0.25f;
      std::uint64_t seq = 0;
      if (zero_copy) {
        PushBuffer buf = w.borrow_push(p.param, p.offset, p.count);
        EXPECT_EQ(buf.size(), p.count);
        EXPECT_EQ(buf.offset(), p.offset);
        EXPECT_EQ(reinterpret_cast<std::uintptr_t>(buf.data()) % 64, 0u);
        std::copy(g.begin(), g.end(), buf.span().begin());
        seq = buf.commit();
        EXPECT_FALSE(buf.active());
      } else {
        seq = w.push(p.param, p.offset, g);
      }
      w.wait_applied(seq);
    }
  }
  EXPECT_EQ(w.published(), 15u);
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  EXPECT_EQ(shm::load_counter(seg.header().records_applied), 15u);
  EXPECT_EQ(shm::load_counter(seg.slot(0).push_bytes),
            3 * (kPatternW + 50000 + 300000 + 262149 + kPatternB) * sizeof(float));
  return Model{pull_all(w, "w"), pull_all(w, "big"), pull_all(w, "b")};
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::size_t changed(const std::vector<float>& a, const std::vector<float>& b) {
  std::size_t n = 0;
  for (std::size_t i = 0; i < a.size(); ++i) n += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
  return n;
}

}  // namespace

TEST(ZeroCopy, ABorrowedPushIsAppliedBitForBitAsThePushOfTheSameGradient) {
  Watchdog wd(120s);
  Model initial;
  const Model pushed = run_adam_job(false, &initial);
  const Model borrowed = run_adam_job(true, nullptr);
  EXPECT_TRUE(same_bits(pushed.w, borrowed.w)) << changed(pushed.w, borrowed.w) << " elements of w differ";
  EXPECT_TRUE(same_bits(pushed.big, borrowed.big)) << changed(pushed.big, borrowed.big) << " elements of big differ";
  EXPECT_TRUE(same_bits(pushed.b, borrowed.b)) << changed(pushed.b, borrowed.b) << " elements of b differ";
  // The comparison can fail: the pushes moved (nearly) every value away from its initial one.
  EXPECT_GT(changed(initial.w, pushed.w), kPatternW * 9 / 10);
  EXPECT_GT(changed(initial.big, pushed.big), 300000u * 9 / 10);
  EXPECT_EQ(changed(initial.b, pushed.b), kPatternB);
}

// ---- NaN and Inf ------------------------------------------------------------------------------

TEST(ZeroCopy, ANonFiniteValueMakesCommitThrowCountsItPublishesNothingAndGivesTheRoomBack) {
  Watchdog wd(60s);
  Job job("zc-nan", pattern_spec(4));
  job.start_server();
  job.wait_ready();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 2});
  std::vector<float> g(kPatternW);
  for (std::size_t i = 0; i < kPatternW; ++i) g[i] = static_cast<float>(static_cast<int>(i % 5) - 2);
  w.wait_applied(w.push("w", g));
  const auto before = pull_all(w, "w");
  ASSERT_EQ(before[1], 1.0f);
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const std::uint64_t tail = ring_tail(seg, 2);

  PushBuffer buf = w.borrow_push("w");
  float* const room = buf.data();
  std::fill(buf.span().begin(), buf.span().end(), 1.0f);
  buf.data()[5] = std::numeric_limits<float>::quiet_NaN();
  std::string msg = error_of([&] { buf.commit(); });
  EXPECT_HAS(msg, "borrowed push to 'w' rejected: element 5 is NaN");
  EXPECT_HAS(msg, "nothing was pushed");
  EXPECT_FALSE(buf.active());  // given back: the worker may push again
  EXPECT_EQ(buf.data(), nullptr);

  // In a range: the index is the parameter's element. The room is the same as before.
  PushBuffer part = w.borrow_push("w", 1000, 3000);
  EXPECT_EQ(part.data(), room);
  std::fill(part.span().begin(), part.span().end(), 1.0f);
  part.data()[2003] = -std::numeric_limits<float>::infinity();
  msg = error_of([&] { part.commit(); });
  EXPECT_HAS(msg, "element 3003 is infinite");

  EXPECT_EQ(w.published(), 1u);
  EXPECT_EQ(ring_tail(seg, 2), tail);  // nothing was committed
  EXPECT_EQ(shm::load_counter(seg.slot(2).pushes_rejected), 2u);
  EXPECT_EQ(shm::load_counter(seg.rejected(2, 0)), 2u);  // counted against "w", as push() counts
  EXPECT_EQ(shm::load_acquire(seg.slot(2).published), 1u);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(shm::load_counter(seg.header().records_applied), 1u);
  EXPECT_EQ(pull_all(w, "w"), before);

  // The next push takes the same room and is applied alone, exactly.
  std::vector<float> ones(kPatternW, 1.0f);
  EXPECT_EQ(w.push("w", ones), 2u);
  w.wait_applied(2);
  const auto after = pull_all(w, "w");
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < kPatternW; ++i) wrong += after[i] != before[i] - 1.0f;
  EXPECT_EQ(wrong, 0u);
  EXPECT_EQ(shm::load_counter(seg.header().records_applied), 2u);
}

// ---- Dropped without commit -----------------------------------------------------------------------

TEST(ZeroCopy, ADroppedBufferPublishesNothingAndTheNextPushFollowsOnInSequence) {
  Watchdog wd(60s);
  Job job("zc-drop", pattern_spec(4));
  job.start_server();
  job.wait_ready();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 1});
  std::vector<float> b(kPatternB, 2.0f);
  w.wait_applied(w.push("b", b));
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const std::uint64_t tail = ring_tail(seg, 1);

  {  // dropped by its destructor
    PushBuffer buf = w.borrow_push("w");
    std::fill(buf.span().begin(), buf.span().end(), 1.0f);
  }
  {  // dropped explicitly; a second drop does nothing
    PushBuffer buf = w.borrow_push("w", 10, 100);
    std::fill(buf.span().begin(), buf.span().end(), 1.0f);
    buf.drop();
    EXPECT_FALSE(buf.active());
    buf.drop();
    EXPECT_HAS(error_of([&] { buf.commit(); }), "holds nothing");
  }
  {  // dropped by a move-assignment over it
    PushBuffer buf = w.borrow_push("b");
    std::fill(buf.span().begin(), buf.span().end(), 1.0f);
    buf = PushBuffer();
    EXPECT_FALSE(buf.active());
  }
  EXPECT_EQ(w.published(), 1u);
  EXPECT_EQ(shm::load_acquire(seg.slot(1).published), 1u);
  EXPECT_EQ(ring_tail(seg, 1), tail);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(shm::load_counter(seg.header().records_applied), 1u);
  EXPECT_EQ(shm::load_counter(seg.slot(1).pushes_rejected), 0u);

  // The next push and the next borrowed push follow on in sequence; only they are applied.
  EXPECT_EQ(w.push("b", b), 2u);
  PushBuffer buf = w.borrow_push("b");
  std::fill(buf.span().begin(), buf.span().end(), 3.0f);
  EXPECT_EQ(buf.commit(), 3u);
  w.wait_applied(3);
  for (float x : pull_all(w, "b")) EXPECT_EQ(x, -7.0f);  // 2 + 2 + 3
  for (float x : pull_all(w, "w")) ASSERT_EQ(x, 0.0f);
  EXPECT_EQ(shm::load_counter(seg.header().records_applied), 3u);
}

// ---- Misuse -----------------------------------------------------------------------------------

TEST(ZeroCopy, MisuseIsRefusedWithAClearErrorAndChangesNothing) {
  Watchdog wd(60s);
  Job job("zc-misuse", pattern_spec(4));
  job.start_server();
  job.wait_ready();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0});
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  std::vector<float> g(kPatternW, 1.0f);

  // Bad ranges and names: refused as push() refuses them, nothing borrowed.
  EXPECT_HAS(error_of([&] { w.borrow_push("w", 119990, 20); }), "[119990, 120010)");
  EXPECT_HAS(error_of([&] { w.borrow_push("w", 119990, 20); }), "outside the parameter, which has 120000 elements");
  EXPECT_HAS(error_of([&] { w.borrow_push("b", std::numeric_limits<std::size_t>::max(), 2); }), "outside the parameter");
  EXPECT_HAS(error_of([&] { w.borrow_push("b", 0, 0); }), "the range is empty");
  EXPECT_HAS(error_of([&] { w.borrow_push("nope"); }), "unknown parameter 'nope'");
  EXPECT_EQ(w.push("b", std::span<const float>(g.data(), kPatternB)), 1u);  // no buffer was left outstanding

  // While a buffer is outstanding, everything that would write the ring is refused.
  PushBuffer buf = w.borrow_push("w", 5, 100);
  const std::uint64_t tail = ring_tail(seg, 0), clock = w.current_clock();
  std::string msg = error_of([&] { w.push("b", std::span<const float>(g.data(), kPatternB)); });
  EXPECT_HAS(msg, "push to 'b': a borrowed push buffer (for 'w' elements [5, 105)) is outstanding");
  EXPECT_HAS(msg, "commit() it or drop it first");
  EXPECT_HAS(msg, "nothing was pushed");
  msg = error_of([&] { w.push("w", 0, std::span<const float>(g.data(), 10)); });
  EXPECT_HAS(msg, "is outstanding");
  msg = error_of([&] { w.borrow_push("b"); });
  EXPECT_HAS(msg, "borrowed push to 'b': a borrowed push buffer (for 'w' elements [5, 105)) is outstanding");
  msg = error_of([&] { w.clock(); });
  EXPECT_HAS(msg, "clock(): a borrowed push buffer");
  EXPECT_HAS(msg, "the step was not ended");
  msg = error_of([&] { w.leave(); });
  EXPECT_HAS(msg, "leave(): a borrowed push buffer");
  EXPECT_HAS(msg, "the worker is still attached");
  EXPECT_EQ(w.published(), 1u);
  EXPECT_EQ(w.current_clock(), clock);
  EXPECT_EQ(ring_tail(seg, 0), tail);
  EXPECT_EQ(shm::load_acquire(seg.slot(0).state), static_cast<std::uint32_t>(shm::SlotState::attached));
  // Waiting and reading are fine meanwhile.
  w.wait_applied(1);
  EXPECT_EQ(pull_all(w, "b")[0], -1.0f);

  // The buffer itself is untouched by all that: it still commits, moved or not.
  std::fill(buf.span().begin(), buf.span().end(), 1.0f);
  PushBuffer moved = std::move(buf);
  EXPECT_FALSE(buf.active());  // NOLINT(bugprone-use-after-move): a moved-from buffer is empty
  EXPECT_HAS(error_of([&] { buf.commit(); }), "holds nothing");
  EXPECT_HAS(error_of([&] { w.push("b", std::span<const float>(g.data(), kPatternB)); }), "is outstanding");
  EXPECT_EQ(moved.commit(), 2u);
  EXPECT_HAS(error_of([&] { moved.commit(); }), "committed or dropped already");
  w.wait_applied(2);
  const auto values = pull_all(w, "w");
  EXPECT_EQ(values[4], 0.0f);
  EXPECT_EQ(values[5], -1.0f);
  EXPECT_EQ(values[104], -1.0f);
  EXPECT_EQ(values[105], 0.0f);

  // A buffer that outlives its Worker is emptied, not left pointing into an unmapped ring; a
  // moved Worker keeps its buffer valid.
  PushBuffer orphan;
  {
    Worker gone(WorkerOptions{.segment = job.name(), .rank = 3});
    orphan = gone.borrow_push("b");
    EXPECT_TRUE(orphan.active());
  }
  EXPECT_FALSE(orphan.active());
  EXPECT_EQ(orphan.data(), nullptr);
  EXPECT_EQ(orphan.size(), 0u);
  EXPECT_HAS(error_of([&] { orphan.commit(); }), "its Worker is gone");
  EXPECT_EQ(shm::load_acquire(seg.slot(3).published), 0u);
  EXPECT_EQ(ring_tail(seg, 3), 0u);
  {
    Worker first(WorkerOptions{.segment = job.name(), .rank = 3});
    PushBuffer kept = first.borrow_push("b");
    Worker second = std::move(first);
    std::fill(kept.span().begin(), kept.span().end(), 1.0f);
    EXPECT_EQ(kept.commit(), 1u);
    second.wait_applied(1);
  }
  EXPECT_EQ(pull_all(w, "b")[0], -2.0f);
}

// ---- A full ring: the same errors as push() -------------------------------------------------------

namespace {
std::string small_ring_spec(const char* consistency) {
  return std::string("consistency = \"") + consistency + R"("
max_workers = 2
ring_bytes = 65536
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "p"
shape = [4096]
[[param]]
name = "big"
shape = [10000]
)";
}
}  // namespace

TEST(ZeroCopy, ARecordTooBigOrARingThatStaysFullFailsAsPushDoesWithNothingPushed) {
  Watchdog wd(60s);
  Job job("zc-full", small_ring_spec("asp"));
  job.start_server();
  job.wait_ready();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 300ms});
  std::string msg = error_of([&] { w.borrow_push("big"); });
  EXPECT_HAS(msg, "borrowed push to 'big': 10000 elements do not fit one ring record (at most");
  EXPECT_HAS(msg, "borrow ranges (offset, count), or use push(), which streams");
  EXPECT_HAS(msg, "nothing was pushed");
  PushBuffer part = w.borrow_push("big", 0, 4096);  // a range fits
  part.drop();

  // A stopped server: the ring fills up, and a borrow waits for the timeout, then fails.
  job.server().kill(SIGSTOP);
  std::vector<float> g(4096, 1.0f);
  for (int i = 0; i < 3; ++i) w.push("p", g);  // 3 records of 16 KiB + 64 B fill 64 KiB
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const std::uint64_t tail = ring_tail(seg, 0);
  const auto started = std::chrono::steady_clock::now();
  msg = error_of([&] { w.borrow_push("p"); });
  const auto waited = std::chrono::steady_clock::now() - started;
  job.server().kill(SIGCONT);
  EXPECT_HAS(msg, "borrowed push to 'p': the ring of worker 0 has been full for 300 ms");
  EXPECT_HAS(msg, "the server is alive but busy");
  EXPECT_HAS(msg, "nothing was pushed");
  EXPECT_GE(waited, 300ms);
  EXPECT_EQ(w.published(), 3u);
  EXPECT_EQ(ring_tail(seg, 0), tail);
  // The server is back: the borrow waits for room and gets it (back-pressure, not a drop).
  PushBuffer buf = w.borrow_push("p");
  std::fill(buf.span().begin(), buf.span().end(), 1.0f);
  EXPECT_EQ(buf.commit(), 4u);
  w.wait_applied(4);
  for (float x : pull_all(w, "p")) ASSERT_EQ(x, -4.0f);
  EXPECT_GT(shm::load_counter(seg.slot(0).backpressure_ns), 0u);
}

// ---- BSP ----------------------------------------------------------------------------------------

// A BSP job whose rings hold less than a step streams its steps (the server sums the pushes as
// they come): four borrowed pushes of 16 KiB go through a 64 KiB ring in one step.
TEST(ZeroCopy, ABspStepOfBorrowedPushesBiggerThanTheRingStreams) {
  Watchdog wd(60s);
  Job job("zc-bsp-stream", small_ring_spec("bsp"));
  job.start_server();
  job.wait_ready();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 30s});
  for (int i = 0; i < 4; ++i) {
    PushBuffer buf = w.borrow_push("p");
    std::fill(buf.span().begin(), buf.span().end(), 1.0f);
    EXPECT_EQ(buf.commit(), static_cast<std::uint64_t>(i + 1));
  }
  w.clock();
  w.wait_applied(4);
  for (float x : pull_all(w, "p")) ASSERT_EQ(x, -4.0f);  // one step of the sum of the four
}

// A job made for ASP has no step sums: switched to BSP live, a step must fit its ring, and one
// that fills it fails at once with what to do (not after the timeout).
TEST(ZeroCopy, ABspStepOfBorrowedPushesFillingTheRingFailsAtOnceAsPushDoes) {
  Watchdog wd(60s);
  Job job("zc-bsp-full", small_ring_spec("asp"));
  job.start_server();
  job.wait_ready();
  Process ctl({"shmps-ctl", "set", job.name(), "consistency=bsp"});
  ASSERT_EQ(ctl.wait(20s), 0) << ctl.output();
  Worker w(WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 30s});
  for (int i = 0; i < 3; ++i) {
    PushBuffer buf = w.borrow_push("p");
    std::fill(buf.span().begin(), buf.span().end(), 1.0f);
    buf.commit();
  }
  const auto started = std::chrono::steady_clock::now();
  const std::string msg = error_of([&] { w.borrow_push("p"); });
  EXPECT_HAS(msg, "borrowed push to 'p': the pushes of this BSP step");
  EXPECT_HAS(msg, "fill the whole ring");
  EXPECT_HAS(msg, "raise ring_bytes");
  EXPECT_LT(std::chrono::steady_clock::now() - started, 5s);  // not the 30 s timeout
  EXPECT_EQ(w.published(), 3u);
  // Ending the step lets the server take it; then there is room again.
  w.clock();
  PushBuffer buf = w.borrow_push("p");
  std::fill(buf.span().begin(), buf.span().end(), 1.0f);
  EXPECT_EQ(buf.commit(), 4u);
  w.clock();
  w.wait_applied(4);
  for (float x : pull_all(w, "p")) ASSERT_EQ(x, -4.0f);
}

TEST(ZeroCopy, ABorrowedPushCountsInItsBspStepLikeAPush) {
  Watchdog wd(60s);
  Job job("zc-bsp", R"(
consistency = "bsp"
slice_bytes = 65536
max_workers = 8
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "w"
shape = [40000]
[[param]]
name = "b"
shape = [7]
)");
  job.start_server();
  job.wait_ready();
  constexpr std::size_t kW = 40000, kB = 7;
  Worker w0(WorkerOptions{.segment = job.name(), .rank = 0});
  Worker w1(WorkerOptions{.segment = job.name(), .rank = 1});
  std::vector<double> want_w(kW, 0.0), want_b(kB, 0.0);
  std::vector<float> gw(kW), gb(kB), pw(kW), pb(kB);
  auto expect_exact = [&](Worker& w, std::uint64_t step) {
    w.pull("w", pw);
    w.pull("b", pb);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < kW; ++i) wrong += static_cast<double>(pw[i]) != want_w[i];
    for (std::size_t i = 0; i < kB; ++i) wrong += static_cast<double>(pb[i]) != want_b[i];
    EXPECT_EQ(wrong, 0u) << "rank " << w.rank() << " before step " << step;
  };
  for (std::uint64_t k = 0; k < 4; ++k) {
    // Both pull first (which also waits until the server admitted both to the group).
    expect_exact(w0, k);
    expect_exact(w1, k);
    // Rank 0: "w" computed straight into a borrowed buffer, "b" pushed; rank 1: both pushed.
    PushBuffer buf = w0.borrow_push("w");
    for (std::size_t i = 0; i < kW; ++i) buf.data()[i] = pattern(0, k, i);
    EXPECT_EQ(buf.commit(), 2 * k + 1);
    for (std::size_t i = 0; i < kB; ++i) gb[i] = pattern(0, k, i);
    w0.push("b", gb);
    EXPECT_EQ(w0.clock(), k + 1);
    for (std::size_t i = 0; i < kW; ++i) gw[i] = pattern(1, k, i);
    for (std::size_t i = 0; i < kB; ++i) gb[i] = pattern(1, k, i);
    w1.push("w", gw);
    w1.push("b", gb);
    // The step is not complete until rank 1 ends it too: nothing of it is applied yet.
    std::this_thread::sleep_for(50ms);
    EXPECT_EQ(w0.applied(), 2 * k);
    EXPECT_EQ(w1.applied(), 2 * k);
    w1.clock();
    for (std::uint64_t r = 0; r < 2; ++r) {
      for (std::size_t i = 0; i < kW; ++i) want_w[i] -= pattern(r, k, i);
      for (std::size_t i = 0; i < kB; ++i) want_b[i] -= pattern(r, k, i);
    }
  }
  expect_exact(w0, 4);
  EXPECT_EQ(w0.applied(), 8u);
  // The check can fail: the sums are far from the initial zeros.
  EXPECT_GT(std::count_if(want_w.begin(), want_w.end(), [](double x) { return x != 0.0; }), static_cast<long>(kW / 4));
}

// ---- Killed while holding a buffer ---------------------------------------------------------------

TEST(ZeroCopyCrash, AProcessKilledWhileHoldingAFilledBufferLeavesNothingBehind) {
  Watchdog wd(90s);
  Job job("zc-kill", pattern_spec());
  job.start_server();
  job.wait_ready();
  constexpr std::uint64_t kBefore = 40, kTotal = 80;
  // 40 zero-copy pushes committed and applied, then push 41 borrowed, filled, held: SIGKILL.
  auto& victim = job.start({"shmps-test-pusher", "exact", "--pushes", std::to_string(kBefore), "--zero-copy", "--hold"},
                           {{"SHMPS_RANK", "0"}});
  auto& other = job.start({"shmps-test-pusher", "exact", "--pushes", std::to_string(kTotal)}, {{"SHMPS_RANK", "1"}});
  ASSERT_TRUE(wait_for_output(victim, "holding push 41")) << victim.output();
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  const std::uint64_t tail = ring_tail(seg, 0);
  EXPECT_EQ(shm::load_acquire(seg.slot(0).published), kBefore);

  // The held record is really there, filled, just past the committed tail.
  {
    const std::uint64_t capacity = seg.ring(0).capacity;
    std::uint64_t pos = tail;
    auto at = [&](std::uint64_t p) { return reinterpret_cast<const shm::PushRecord*>(seg.ring_data(0) + p % capacity); };
    if (at(pos)->kind == shm::RecordKind::padding) pos += at(pos)->record_bytes;
    const auto plan = shmps::test::plan_push(0, kBefore, kPatternW, kPatternB);
    ASSERT_EQ(at(pos)->kind, shm::RecordKind::push);
    ASSERT_EQ(at(pos)->record_bytes, shm::record_bytes_for(plan.count));
    const float* payload = shm::record_payload(at(pos));
    std::size_t filled = 0;
    for (std::uint64_t j = 0; j < plan.count; ++j) filled += payload[j] == pattern(0, kBefore, plan.offset + j);
    EXPECT_EQ(filled, plan.count);
  }

  victim.kill(SIGKILL);
  EXPECT_EQ(victim.wait(10s), 128 + SIGKILL);
  const auto killed_at = std::chrono::steady_clock::now();
  while (shm::load_acquire(seg.slot(0).dead_generation) != shm::load_acquire(seg.slot(0).generation) &&
         std::chrono::steady_clock::now() - killed_at < 5s)
    std::this_thread::sleep_for(5ms);
  EXPECT_EQ(shm::load_acquire(seg.slot(0).dead_generation), shm::load_acquire(seg.slot(0).generation));
  // Nothing of the held buffer became visible, and the server applied nothing more from rank 0.
  EXPECT_EQ(ring_tail(seg, 0), tail);
  wait_drained(seg, 0);
  EXPECT_EQ(shm::load_acquire(seg.slot(0).applied), kBefore);
  EXPECT_EQ(shm::load_acquire(seg.slot(0).published), kBefore);
  {
    // The next holder of the slot sees no record of it.
    Worker restarted(WorkerOptions{.segment = job.name(), .rank = 0});
    EXPECT_EQ(restarted.published(), kBefore);
    EXPECT_EQ(restarted.applied(), kBefore);
    EXPECT_EQ(restarted.generation(), 2u);
  }
  // A restarted pusher continues at push 41, zero-copy, to the end: exactly the sum of 80 pushes.
  auto& again = job.start({"shmps-test-pusher", "exact", "--pushes", std::to_string(kTotal), "--zero-copy"},
                          {{"SHMPS_RANK", "0"}});
  EXPECT_EQ(again.wait(60s), 0) << again.output();
  EXPECT_EQ(other.wait(60s), 0) << other.output();
  EXPECT_EQ(shm::load_acquire(seg.slot(0).published), kTotal);
  expect_exact_sum(job.name(), {kTotal, kTotal});
}

TEST(ZeroCopyCrash, KilledAtTheKillPointBeforeItsCommitLeavesNothingAndResumes) {
  Watchdog wd(90s);
  Job job("zc-killpoint", pattern_spec());
  job.start_server();
  job.wait_ready();
  auto& victim = job.start({"shmps-test-pusher", "exact", "--pushes", "200", "--zero-copy"},
                           {{"SHMPS_RANK", "0"}, {"SHMPS_KILL_AT", "push.before_commit:50"}});
  EXPECT_EQ(victim.wait(30s), 128 + SIGKILL) << victim.output();
  {
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    // Push 50 was checked and its header written, but never committed: the slot has published 49.
    EXPECT_EQ(shm::load_acquire(seg.slot(0).published), 49u);
  }
  auto& restarted = job.start({"shmps-test-pusher", "exact", "--pushes", "200", "--zero-copy"}, {{"SHMPS_RANK", "0"}});
  EXPECT_EQ(restarted.wait(60s), 0) << restarted.output();
  expect_exact_sum(job.name(), {200});
}
