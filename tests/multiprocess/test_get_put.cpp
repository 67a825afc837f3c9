// SINGA's Get by version and Put with a real server process: pull(name, out, min_version) waits
// for the version, returns, and times out with its message; put() sets a parameter's first
// values once, all-or-nothing, and init = "put" makes pulls wait for it.
//
// SGD with learning rate 1 and small-integer values: every value is exact.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <span>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/expect.hpp"
#include "../support/harness.hpp"

using namespace std::chrono_literals;
using shmps::test::Job;
using shmps::test::Watchdog;

namespace {

// "w" of two slices (slice_bytes 64 = 16 floats), "b" and "c" of one.
const std::string kSpec =
    "max_workers = 3\nslice_bytes = 64\n"
    "[optimizer]\nkind = \"sgd\"\nlr = 1.0\n"
    "[[param]]\nname = \"w\"\nshape = [32]\n"
    "[[param]]\nname = \"b\"\nshape = [4]\n"
    "[[param]]\nname = \"c\"\nshape = [4]\n";

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const shmps::Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST(GetByVersion, WaitsUntilEverySliceOfTheRangeHasTheVersion) {
  Watchdog watchdog(60s);
  Job job("get-version", kSpec);
  job.start_server();
  job.wait_ready();
  shmps::Worker reader(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  std::vector<float> w(32);
  EXPECT_EQ(reader.pull("w", w, 0), 0u) << "version 0 waits for nothing";
  std::jthread writer([&] {
    shmps::Worker pusher(shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 20s});
    for (int round = 0; round < 3; ++round) {
      std::this_thread::sleep_for(100ms);
      // The first slice only, then the second: the reader must wait for the slower one.
      pusher.wait_applied(pusher.push("w", 0, std::vector<float>(16, 1.0f)));
      std::this_thread::sleep_for(100ms);
      pusher.wait_applied(pusher.push("w", 16, std::vector<float>(16, 1.0f)));
    }
  });
  const std::uint64_t seen = reader.pull("w", w, 3);
  EXPECT_GE(seen, 3u);
  for (float v : w) EXPECT_EQ(v, -3.0f) << "both slices had their 3 updates when the pull copied";
  writer.join();
  // A range waits only for its own slices: the first 16 floats are at version 3 too.
  std::vector<float> head(16);
  EXPECT_EQ(reader.pull("w", 0, head, 3), 3u);
}

TEST(GetByVersion, TimesOutNamingTheSliceBehindAndChangesNothing) {
  Watchdog watchdog(60s);
  Job job("get-version-timeout", kSpec);
  job.start_server();
  job.wait_ready();
  shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 400ms});
  w.wait_applied(w.push("w", 0, std::vector<float>(16, 1.0f)));  // slice 0 at version 1, slice 1 at 0
  std::vector<float> out(32, 7.0f);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string message = error_of([&] { w.pull("w", out, 1); });
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 400ms) << "it waits for the whole timeout";
  EXPECT_HAS(message, "pull of 'w' at version 1: slice 1 of it (elements from 16) has had 0 updates");
  EXPECT_HAS(message, "the server is alive but busy");
  for (float v : out) EXPECT_EQ(v, 7.0f) << "a failed get copies nothing";
  std::vector<float> b(4);
  EXPECT_EQ(w.pull("b", b, 0), 0u);
}

namespace {

std::vector<float> iota_values(std::size_t n, float first) {
  std::vector<float> v(n);
  for (std::size_t k = 0; k < n; ++k) v[k] = first + static_cast<float>(k % 97);
  return v;
}

// "w" with init = "put" (pulls wait for a put), and "b" as usual.
std::string put_spec(const std::string& consistency) {
  return "max_workers = 3\nslice_bytes = 64\nconsistency = \"" + consistency +
         "\"\n[optimizer]\nkind = \"sgd\"\nlr = 1.0\n"
         "[[param]]\nname = \"w\"\nshape = [32]\ninit = \"put\"\n"
         "[[param]]\nname = \"b\"\nshape = [4]\n";
}

}  // namespace

TEST(Put, SetsTheValuesOnceThenUpdatesApplyOnTopAndALaterPutIsRefused) {
  Watchdog watchdog(60s);
  Job job("put", kSpec);
  job.start_server();
  job.wait_ready();
  shmps::Worker w0(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  shmps::Worker w1(shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 20s});
  const std::vector<float> first = iota_values(32, 10.0f), second = iota_values(32, 50.0f);
  w0.put("w", first);
  std::vector<float> w(32);
  EXPECT_EQ(w1.pull("w", w), 1u) << "a put counts as one update of each slice";
  EXPECT_EQ(w, first);
  w0.put("w", second);  // the same worker, before any update: allowed
  w1.pull("w", w);
  EXPECT_EQ(w, second);
  EXPECT_HAS(error_of([&] { w1.put("w", first); }), "put of 'w' refused: worker 0 put it first");
  w1.wait_applied(w1.push("w", std::vector<float>(32, 1.0f)));
  w1.pull("w", w);
  for (std::size_t k = 0; k < 32; ++k) EXPECT_EQ(w[k], second[k] - 1.0f);
  const std::string late = error_of([&] { w0.put("w", first); });
  EXPECT_HAS(late, "put of 'w' refused: the parameter had an optimizer update before the put reached the server");
  EXPECT_HAS(late, "nothing was put");
  w1.pull("w", w);
  for (std::size_t k = 0; k < 32; ++k) EXPECT_EQ(w[k], second[k] - 1.0f) << "a refused put changes nothing";
  // A range of another parameter, and the errors that change nothing.
  w0.put("b", 2, std::vector<float>{7.0f, 8.0f});
  std::vector<float> b(4);
  w0.pull("b", b);
  EXPECT_EQ(b, (std::vector<float>{0.0f, 0.0f, 7.0f, 8.0f}));
  EXPECT_HAS(error_of([&] { w0.put("b", std::vector<float>{1.0f, NAN, 1.0f, 1.0f}); }),
             "put of 'b' refused: element 1 is NaN; nothing was put");
  EXPECT_HAS(error_of([&] { w0.put("b", std::vector<float>(3, 1.0f)); }), "the values have 3 elements but the parameter has 4");
  w0.pull("b", b);
  EXPECT_EQ(b, (std::vector<float>{0.0f, 0.0f, 7.0f, 8.0f}));
  // A parameter nobody put, updated: a put names the update (there is no owner to name).
  w1.wait_applied(w1.push("c", std::vector<float>(4, 1.0f)));
  const std::string after_update = error_of([&] { w1.put("c", std::vector<float>(4, 5.0f)); });
  EXPECT_HAS(after_update, "put of 'c' refused: the parameter had an optimizer update");
  std::vector<float> c(4);
  w0.pull("c", c);
  EXPECT_EQ(c, std::vector<float>(4, -1.0f));
}

TEST(Put, OfTwoWorkersPuttingAtOnceExactlyOneWinsEverySlice) {
  Watchdog watchdog(60s);
  for (int round = 0; round < 5; ++round) {
    Job job("put-race", kSpec);
    job.start_server();
    job.wait_ready();
    std::string errors[2];
    {
      std::vector<std::jthread> putters;
      for (int rank = 0; rank < 2; ++rank)
        putters.emplace_back([&, rank] {
          shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = rank, .timeout = 20s});
          errors[rank] = error_of([&] { w.put("w", std::vector<float>(32, static_cast<float>(rank + 1))); });
        });
    }
    const int winners = (errors[0] == "(no error)") + (errors[1] == "(no error)");
    ASSERT_EQ(winners, 1) << errors[0] << " / " << errors[1];
    const int winner = errors[0] == "(no error)" ? 0 : 1;
    EXPECT_HAS(errors[1 - winner], "put it first");
    shmps::Worker reader(shmps::WorkerOptions{.segment = job.name(), .rank = 2, .timeout = 20s});
    std::vector<float> w(32);
    EXPECT_EQ(reader.pull("w", w), 1u) << "the loser's put was applied to no slice";
    for (float v : w) EXPECT_EQ(v, static_cast<float>(winner + 1));
  }
}

TEST(Put, InitPutMakesPullsAndViewsWaitAndRefusesPushesBeforeIt) {
  Watchdog watchdog(60s);
  Job job("put-init", put_spec("asp"));
  job.start_server();
  job.wait_ready();
  shmps::Worker early(shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 300ms});
  std::vector<float> w(32);
  EXPECT_HAS(error_of([&] { early.pull("w", w); }), "its spec says init = \"put\": a worker must put it first");
  EXPECT_HAS(error_of([&] { early.view("w"); }), "view of 'w' at version 1");
  EXPECT_HAS(error_of([&] { early.push("w", std::vector<float>(32, 1.0f)); }),
             "push to 'w': slice 0 has not been put yet");
  std::vector<float> b(4);
  EXPECT_EQ(early.pull("b", b), 0u) << "a parameter without init = \"put\" does not wait";
  EXPECT_HAS(shmps::test::run({"shmps-ctl", "inspect", job.name()}).out, "waiting for a put (init = \"put\")");
  const std::vector<float> values = iota_values(32, 3.0f);
  std::jthread putter([&] {
    std::this_thread::sleep_for(200ms);
    shmps::Worker w0(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
    w0.put("w", values);
  });
  shmps::Worker waiting(shmps::WorkerOptions{.segment = job.name(), .rank = 2, .timeout = 20s});
  EXPECT_EQ(waiting.pull("w", w), 1u);
  EXPECT_EQ(w, values);
  const std::span<const float> view = waiting.view("w");
  EXPECT_TRUE(std::equal(view.begin(), view.end(), values.begin()));
  putter.join();
  EXPECT_HAS(shmps::test::run({"shmps-ctl", "inspect", job.name()}).out, "put by worker 0");
  early.wait_applied(early.push("w", std::vector<float>(32, 1.0f)));  // allowed once put
}

// The PyTorch pattern in BSP: rank 0 puts its freshly initialised model before its first push,
// the others wait for it in their first pull, and every step applies on top of it, exactly.
TEST(Put, InBspRankZeroPutsAtTheStartAndEveryStepAppliesOnTopOfIt) {
  Watchdog watchdog(60s);
  Job job("put-bsp", put_spec("bsp"));
  job.start_server();
  job.wait_ready();
  const std::vector<float> values = iota_values(32, 100.0f);
  constexpr int kSteps = 4;
  std::string errors[2];
  std::vector<float> final_w(32);
  std::uint64_t final_version = 0;
  {
    std::vector<std::jthread> workers;
    for (int rank = 0; rank < 2; ++rank)
      workers.emplace_back([&, rank] {
        errors[rank] = error_of([&] {
          shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = rank, .timeout = 20s});
          w.wait_for_workers(2);
          if (rank == 0) w.put("w", values);
          std::vector<float> mine(32);
          for (int step = 0; step < kSteps; ++step) {
            w.pull("w", mine);
            w.push("w", std::vector<float>(32, static_cast<float>(rank + 1)));
            w.clock();
          }
          // In step kSteps now: the pull waits until the last step is applied. (A worker that
          // joined now would be admitted to a step still open and hold it: BSP counts it.)
          if (rank == 0) final_version = w.pull("w", final_w);
        });
      });
  }
  EXPECT_EQ(errors[0], "(no error)");
  EXPECT_EQ(errors[1], "(no error)");
  EXPECT_EQ(final_version, 1u + kSteps) << "the put and one update per step";
  for (std::size_t k = 0; k < 32; ++k) EXPECT_EQ(final_w[k], values[k] - 3.0f * kSteps) << "element " << k;
}

TEST(Put, ServerKilledMidPutFinishesItAndAppliesNoSliceTwice) {
  Watchdog watchdog(90s);
  Job job("put-kill-server", kSpec);
  job.start_server({}, {{"SHMPS_KILL_AT", "put.mid_slice:2"}});  // killed writing the put's second slice
  job.wait_ready();
  shmps::Worker w0(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 30s});
  const std::vector<float> values = iota_values(32, 20.0f);
  std::string error;
  std::jthread putter([&] { error = error_of([&] { w0.put("w", values); }); });
  EXPECT_EQ(job.server().wait(20s), 128 + SIGKILL);
  job.start_server();
  job.wait_ready();
  putter.join();
  EXPECT_EQ(error, "(no error)");
  shmps::Worker reader(shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 20s});
  std::vector<float> w(32);
  EXPECT_EQ(reader.pull("w", w), 1u) << "each slice put exactly once (version 2 would mean twice)";
  EXPECT_EQ(w, values);
  std::vector<float> head(16);
  EXPECT_EQ(reader.pull("w", 0, head), 1u);
}

// A put bigger than one ring record goes in pieces: a worker killed between them leaves the
// pieces it committed, no other worker may put the parameter meanwhile, and its restarted
// process puts it again whole.
TEST(Put, WorkerKilledBetweenRecordsLeavesWhatItCommittedAndItsSuccessorPutsAgain) {
  Watchdog watchdog(90s);
  constexpr std::size_t kFloats = 300000;  // three records of a 1 MiB ring
  Job job("put-kill-worker",
          "max_workers = 2\nring_bytes = 1048576\n[optimizer]\nkind = \"sgd\"\nlr = 1.0\n"
          "[[param]]\nname = \"big\"\nshape = [300000]\ninit = \"put\"\n");
  job.start_server();
  job.wait_ready();
  const std::vector<float> first = iota_values(kFloats, 1.0f), second = iota_values(kFloats, 500.0f);
  auto& victim = job.start({"shmps-test-pusher", "put"}, {{"SHMPS_SEGMENT", job.name()}, {"SHMPS_RANK", "0"},
                                                         {"SHMPS_KILL_AT", "put.between_records:1"}});
  ASSERT_EQ(victim.wait(), 128 + SIGKILL) << "the worker was not killed between records: " << victim.output();
  shmps::Worker other(shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 20s});
  // The first record was committed and applied (the server runs); the rest never existed.
  std::vector<float> head(1000);
  EXPECT_EQ(other.pull("big", 0, head, 0), 1u);
  EXPECT_TRUE(std::equal(head.begin(), head.end(), first.begin()));
  EXPECT_HAS(error_of([&] { other.put("big", second); }), "refused: worker 0 put it first");
  shmps::Worker successor(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
  successor.put("big", second);
  std::vector<float> all(kFloats);
  other.pull("big", all);
  EXPECT_EQ(all, second);
}

// BSP: a worker that put, pushed in step 0 and was killed before ending it leaves that push in
// its ring, and step 0 stays open (rank 1 is in it). Its restarted process puts again before
// repeating the step: the server discards the dead push with the put (the ring would jam
// otherwise: the put could never be taken), and step 0 holds only the new pushes.
TEST(Put, InBspARestartedWorkerPutsAgainInFrontOfItsPredecessorsOpenStep) {
  Watchdog watchdog(90s);
  Job job("put-bsp-restart", put_spec("bsp"));
  job.start_server();
  job.wait_ready();
  const std::vector<float> second = iota_values(32, 60.0f);
  shmps::Worker w1(shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 20s});
  auto seg = shmps::shm::Segment::open(job.name(), shmps::shm::Access::read_only);
  const auto until = [](auto done) {
    for (const auto end = std::chrono::steady_clock::now() + 20s; !done() && std::chrono::steady_clock::now() < end;)
      std::this_thread::sleep_for(2ms);
    return done();
  };
  using shmps::shm::load_acquire;
  ASSERT_TRUE(until([&] { return load_acquire(seg.slot(1).admitted_generation) == load_acquire(seg.slot(1).generation); }))
      << "rank 1 is in step 0, so step 0 cannot end without it";
  auto& first = job.start({"shmps-test-pusher", "put-push-hold"}, {{"SHMPS_SEGMENT", job.name()}, {"SHMPS_RANK", "0"}});
  ASSERT_TRUE(until([&] { return first.output().find("holding") != std::string::npos || !first.running(); }));
  ASSERT_NE(first.output().find("holding"), std::string::npos) << first.output();
  first.kill(SIGKILL);
  first.wait();
  ASSERT_TRUE(until([&] { return load_acquire(seg.slot(0).dead_generation) == load_acquire(seg.slot(0).generation); }))
      << "the server proves the first process dead";
  std::string error;
  std::vector<float> after(32);
  {
    std::jthread successor([&] {
      error = error_of([&] {
        shmps::Worker w0(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 20s});
        w0.put("w", second);  // in front of the dead step's push
        w0.push("w", std::vector<float>(32, 1.0f));
        w0.clock();
        w0.pull("w", after);  // waits for step 0
      });
    });
    w1.wait_for_workers(2);  // the successor is in step 0 (the first process, dead, no longer counts)
    std::vector<float> mine(32);
    w1.pull("w", mine);
    w1.push("w", std::vector<float>(32, 2.0f));
    w1.clock();
  }
  EXPECT_EQ(error, "(no error)");
  for (std::size_t k = 0; k < 32; ++k) EXPECT_EQ(after[k], second[k] - 3.0f) << "element " << k;
}
