// SINGA's Get by version and Put with a real server process: pull(name, out, min_version) waits
// for the version, returns, and times out with its message; put() sets a parameter's first
// values once, all-or-nothing, and init = "put" makes pulls wait for it.
//
// SGD with learning rate 1 and small-integer values: every value is exact.
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/worker.hpp>

#include "../support/expect.hpp"
#include "../support/harness.hpp"

using namespace std::chrono_literals;
using shmps::test::Job;
using shmps::test::Watchdog;

namespace {

// Two parameters: "w" of two slices (slice_bytes 64 = 16 floats), "b" of one.
const std::string kSpec =
    "max_workers = 3\nslice_bytes = 64\n"
    "[optimizer]\nkind = \"sgd\"\nlr = 1.0\n"
    "[[param]]\nname = \"w\"\nshape = [32]\n"
    "[[param]]\nname = \"b\"\nshape = [4]\n";

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
