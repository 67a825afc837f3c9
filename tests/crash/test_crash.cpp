// Crash safety with kill -9: a server or a worker stopped at a named point (SHMPS_KILL_AT, see
// shm/include/shmps/shm/killpoint.hpp), then restarted; and a chaos run that SIGKILLs random
// workers and, less often, the server. Every check is the exact sum: SGD with learning rate 1 and
// small-integer gradients, so the final values must equal minus the sum of every committed push.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <algorithm>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/harness.hpp"
#include "../support/chaos.hpp"
#include "../support/exact.hpp"
#include "../support/pattern.hpp"

using namespace std::chrono_literals;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Watchdog;
namespace shm = shmps::shm;
using shmps::test::expect_exact_sum;
using shmps::test::pattern_spec;

namespace {

// The job's pushes as they are (each fits one ring record), or bigger than the ring: with
// ring_bytes = 256 KiB a record carries at most 32752 floats, so a push of "w" (120000 floats)
// streams through the ring in chunks of one 16384-float slice (Worker::push), and a pusher
// started with --chunk-floats knows how its pushes map to sequence numbers.
struct Pushes {
  std::string spec_extra;
  std::vector<std::string> pusher_args;
  std::string dtype;  // the values' dtype ("": float32)
};
const Pushes kWhole{};
const Pushes kStreamed{"ring_bytes = 262144\n", {"--chunk-floats", "16384"}, ""};
// Values in bf16 (dtype = "bf16" on "w" and "b"): small integers are exact in bf16 up to 256, and
// the pattern's sums stay below that (at most 223 in magnitude for 300 pushes of each of 3
// workers, in any order: the sum of each rank's largest partial sum), so the exact sum holds.
const Pushes kBf16{"", {}, "bf16"};

// pattern_spec with every parameter's values in `dtype` ("": as it is).
std::string spec_of(const Pushes& how) {
  std::string spec = shmps::test::pattern_spec(8, how.spec_extra);
  if (how.dtype.empty()) return spec;
  for (const std::string shape : {"shape = [3, 40000]\n", "shape = [7]\n"})
    spec.replace(spec.find(shape), shape.size(), shape + "dtype = \"" + how.dtype + "\"\n");
  return spec;
}

Process& start_pusher(Job& job, int rank, std::uint64_t pushes, std::vector<std::pair<std::string, std::string>> env = {},
                      const Pushes& how = kWhole) {
  env.emplace_back("SHMPS_RANK", std::to_string(rank));
  std::vector<std::string> args{"shmps-test-pusher", "exact", "--pushes", std::to_string(pushes)};
  args.insert(args.end(), how.pusher_args.begin(), how.pusher_args.end());
  return job.start(args, env);
}

// Kills the server at `point`, checks the crash left what it should, restarts the server, lets
// the pushers finish, and checks the exact sum.
void kill_server_at(const std::string& point, const std::function<void(const shm::Segment&)>& check_crash_state,
                    const std::string& expect_in_restart_log, const Pushes& how = kWhole) {
  Watchdog watchdog(90s);
  Job job("kill-server", spec_of(how));
  auto& first = job.start_server({}, {{"SHMPS_KILL_AT", point}});
  job.wait_ready();
  std::vector<Process*> pushers;
  for (int r = 0; r < 3; ++r) pushers.push_back(&start_pusher(job, r, 300, {}, how));
  EXPECT_EQ(first.wait(30s), 128 + SIGKILL) << "the kill point was not reached:\n" << first.output();
  {
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    check_crash_state(seg);
    if (!how.dtype.empty()) {  // the job's values are 2 bytes an element, as asked
      for (std::uint32_t i = 0; i < seg.header().param_count; ++i) EXPECT_NE(seg.param(i).dtype, shm::DType::f32);
    }
  }
  auto& second = job.start_server();
  job.wait_ready();
  for (auto* p : pushers) EXPECT_EQ(p->wait(60s), 0) << p->output();
  expect_exact_sum(job.name(), {300, 300, 300});
  {
    // What the crash left is gone, in the segment: no slice with its version word odd (torn),
    // no redo entry still marked valid.
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    for (std::uint64_t i = 0; i < seg.header().slice_count; ++i)
      EXPECT_EQ(shm::load_acquire(seg.slice(i).version) & 1U, 0u) << "slice " << i;
    for (std::uint32_t e = 0; e < seg.header().redo_count; ++e)
      EXPECT_EQ(shm::load_acquire(seg.redo(e).valid), 0u) << "redo entry " << e;
  }
  // Which repair the restarted server made (e.g. a redo) is said only in its log: the segment
  // keeps no count of it, so that part is still read from there.
  if (!expect_in_restart_log.empty()) {
    EXPECT_NE(second.output().find(expect_in_restart_log), std::string::npos) << second.output();
  }
}

}  // namespace

// Every slice with its version word odd is named by a valid redo entry (one per apply thread that
// was copying when the server died).
void expect_torn_slices_covered_by_redo(const shm::Segment& seg) {
  auto& s = const_cast<shm::Segment&>(seg);
  std::uint64_t odd = 0, covered = 0;
  for (std::uint64_t i = 0; i < seg.header().slice_count; ++i) {
    if ((shm::load_acquire(seg.slice(i).version) & 1U) == 0) continue;
    ++odd;
    for (std::uint32_t e = 0; e < seg.header().redo_count; ++e)
      if (shm::load_acquire(s.redo(e).valid) != 0 && s.redo(e).slice == i) {
        ++covered;
        break;
      }
  }
  EXPECT_GE(odd, 1u);
  EXPECT_EQ(covered, odd);
}

TEST(ServerCrash, KilledInTheMiddleOfCopyingASliceInTheNextServerRedoesItOnce) {
  kill_server_at(
      "apply.mid_copy:40",
      // The crash state: slices with their version word odd, each with a valid redo entry naming it.
      expect_torn_slices_covered_by_redo,
      "event=redo");
}

TEST(ServerCrash, KilledBetweenTheChunksOfASliceTheNextServerFinishesItFromItsInputsOnce) {
  // Half of a slice holds its new values, half its old ones; the redo entry names the pushes,
  // which the next server finds in the rings and applies to the rest (apply_chunks.hpp).
  kill_server_at("apply.mid_chunks:40", expect_torn_slices_covered_by_redo, "event=redo");
}

TEST(StreamedPush, ServerKilledBetweenTheChunksOfASliceFinishesItOnce) {
  kill_server_at("apply.mid_chunks:40", expect_torn_slices_covered_by_redo, "event=redo", kStreamed);
}

// bf16 values: the redo entry holds the slice's new values as float32, the copy narrows them into
// the slice's 2-byte elements, and the next server's replay writes the same bytes (the exact sum).
TEST(ServerCrash, Bf16ValuesKilledInTheMiddleOfCopyingASliceAreRedoneOnce) {
  kill_server_at("apply.mid_copy:40", expect_torn_slices_covered_by_redo, "event=redo", kBf16);
}

// bf16 values chunk by chunk: chunks below the kill hold their new values (narrowed), the entry
// names the pushes, and the next server widens the rest from the slice and finishes it once.
TEST(ServerCrash, Bf16ValuesKilledBetweenTheChunksOfASliceAreFinishedFromTheirInputsOnce) {
  kill_server_at("apply.mid_chunks:40", expect_torn_slices_covered_by_redo, "event=redo", kBf16);
}

TEST(ServerCrash, Bf16ValuesKilledBetweenApplyAndCursorAdvanceApplyNothingTwice) {
  kill_server_at(
      "apply.before_release:25",
      [](const shm::Segment& seg) {
        std::uint64_t pending = 0;
        for (std::uint32_t r = 0; r < 3; ++r)
          pending += shm::load_acquire(seg.ring(r).tail) - shm::load_acquire(seg.ring(r).head);
        EXPECT_GT(pending, 0u);
      },
      "", kBf16);
}

TEST(ServerCrash, KilledBetweenApplyAndCursorAdvanceAppliesNothingTwice) {
  kill_server_at(
      "apply.before_release:25",
      [](const shm::Segment& seg) {
        // The crash state: slices applied, yet the records are still in the rings.
        std::uint64_t pending = 0;
        for (std::uint32_t r = 0; r < 3; ++r)
          pending += shm::load_acquire(seg.ring(r).tail) - shm::load_acquire(seg.ring(r).head);
        EXPECT_GT(pending, 0u);
      },
      "");
}

TEST(WorkerCrash, KilledAfterWritingARecordButBeforeItsCommitLeavesNothingAndResumes) {
  Watchdog watchdog(90s);
  Job job("kill-worker", pattern_spec());
  job.start_server();
  job.wait_ready();
  auto& victim = start_pusher(job, 0, 200, {{"SHMPS_KILL_AT", "push.before_commit:50"}});
  auto& other = start_pusher(job, 1, 200);
  EXPECT_EQ(victim.wait(30s), 128 + SIGKILL) << victim.output();
  {
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    // Push 50 was written in full but never committed: the slot has published 49.
    EXPECT_EQ(shm::load_acquire(seg.slot(0).published), 49u);
  }
  auto& restarted = start_pusher(job, 0, 200);  // continues from push 50
  EXPECT_EQ(restarted.wait(60s), 0) << restarted.output();
  EXPECT_EQ(other.wait(60s), 0) << other.output();
  expect_exact_sum(job.name(), {200, 200});
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  EXPECT_EQ(shm::load_acquire(seg.slot(0).generation), 2u);
}

// ---- Pushes bigger than the ring: streamed in chunks, each exactly once ----------------------

TEST(StreamedPush, ServerKilledMidCopyRedoesTheChunkOnce) {
  kill_server_at("apply.mid_copy:40", expect_torn_slices_covered_by_redo, "event=redo", kStreamed);
}

TEST(StreamedPush, ServerKilledBetweenApplyAndCursorAdvanceAppliesNoChunkTwice) {
  kill_server_at(
      "apply.before_release:25",
      [](const shm::Segment& seg) {
        std::uint64_t pending = 0;
        for (std::uint32_t r = 0; r < 3; ++r)
          pending += shm::load_acquire(seg.ring(r).tail) - shm::load_acquire(seg.ring(r).head);
        EXPECT_GT(pending, 0u);
        EXPECT_LE(pending, 3u * 262144u);  // the rings hold less than one push each
      },
      "", kStreamed);
}

// A worker killed between two chunks of a push leaves the chunks it committed applied; its
// successor is told (unfinished_push(), checked by the pusher), pushes the same gradient again,
// and only the rest is sent: every push counts exactly once.
TEST(StreamedPush, WorkerKilledBetweenChunksIsFinishedByItsSuccessor) {
  Watchdog watchdog(90s);
  Job job("kill-stream", pattern_spec(8, kStreamed.spec_extra));
  job.start_server();
  job.wait_ready();
  auto& victim = start_pusher(job, 0, 60, {{"SHMPS_KILL_AT", "push.mid_stream:10"}}, kStreamed);
  auto& other = start_pusher(job, 1, 60, {}, kStreamed);
  EXPECT_EQ(victim.wait(30s), 128 + SIGKILL) << victim.output();
  // The 10th pass between two chunks: 7 in push 0 (8 chunks of "w"), 2 in push 1 (a range of 3
  // chunks), none in push 2 ("b", one record), then after the first chunk of push 3.
  std::uint64_t seq = 0;
  for (std::uint64_t k = 0; k < 3; ++k) {
    const auto plan = shmps::test::plan_push(0, k, shmps::test::kPatternW, shmps::test::kPatternB);
    seq += shmps::test::stream_chunks(plan.offset, plan.count, 16384);
  }
  {
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    EXPECT_EQ(shm::load_acquire(seg.slot(0).published), seq + 1);
  }
  auto& restarted = start_pusher(job, 0, 60, {}, kStreamed);
  EXPECT_EQ(restarted.wait(60s), 0) << restarted.output();
  EXPECT_NE(restarted.output().find("finishing push 3 after 16384 elements"), std::string::npos) << restarted.output();
  EXPECT_EQ(other.wait(60s), 0) << other.output();
  expect_exact_sum(job.name(), {60, 60});
}

// A push with a NaN in its last chunk is refused before its first chunk is written.
TEST(StreamedPush, ARejectedPushPublishesNoChunk) {
  Watchdog watchdog(60s);
  Job job("stream-nan", pattern_spec(8, kStreamed.spec_extra));
  job.start_server();
  job.wait_ready();
  shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 0});
  std::vector<float> grad(shmps::test::kPatternW, 1.0f);
  grad.back() = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(w.push("w", grad), shmps::Error);
  EXPECT_EQ(w.published(), 0u);
  grad.back() = 1.0f;
  const std::uint64_t last = w.push("w", grad);
  EXPECT_EQ(last, shmps::test::stream_chunks(0, shmps::test::kPatternW, 16384));
  w.wait_applied(last);
  std::vector<float> values(shmps::test::kPatternW);
  w.pull("w", values);
  for (float v : values) ASSERT_EQ(v, -1.0f);
}

// The chaos run: workers push toward a target while a driver SIGKILLs random workers and, less
// often, the server, and restarts them. SHMPS_CHAOS_SECONDS sets how long the killing goes on
// (default 20 s: the suite's version; the long version runs for minutes, see RELIABILITY.md).
void chaos(const Pushes& how, int default_seconds, std::uint64_t pushes, std::uint64_t sanitized_pushes) {
  const char* env = std::getenv("SHMPS_CHAOS_SECONDS");
  if (!how.pusher_args.empty()) env = nullptr;  // the long version is the whole-push one
  const int chaos_seconds = env ? std::atoi(env) : default_seconds;
#if defined(SHMPS_SANITIZER_BUILD)
  const std::uint64_t kTarget = sanitized_pushes;  // sanitized processes are several times slower
  (void)pushes;
#else
  const std::uint64_t kTarget = pushes;
  (void)sanitized_pushes;
#endif
  const std::uint64_t target = env ? 1'000'000'000ULL : kTarget;  // long runs: kill until the time is up
  Watchdog watchdog(std::chrono::seconds(chaos_seconds + 120));
  constexpr int kWorkers = 4;
  Job job("chaos", pattern_spec(8, how.spec_extra));
  job.start_server();
  job.wait_ready();
  const unsigned seed = std::random_device{}();
  std::cout << "chaos seed " << seed << ", " << chaos_seconds << " s\n";
  std::mt19937 rng(seed);
  std::vector<Process*> pushers(kWorkers);
  for (int r = 0; r < kWorkers; ++r) pushers[r] = &start_pusher(job, r, target, {}, how);
  // The first server kill early: a run may be short.
  const shmps::test::ChaosKills kills = shmps::test::kill_at_random(
      job, pushers, chaos_seconds, rng, [&](int r) -> Process& { return start_pusher(job, r, target, {}, how); }, 400ms,
      1000ms);
  const std::vector<bool>& done = kills.done;
  const std::uint64_t worker_kills = kills.workers, server_kills = kills.server;
  // No more killing: in the long version the workers stop at what they have; here they finish.
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  std::vector<std::uint64_t> final_target(kWorkers, target);
  for (int r = 0; r < kWorkers; ++r) {
    if (done[r]) continue;
    if (target > 100000) {  // the long version: stop it, and finish up to what its slot committed
      pushers[r]->kill(SIGKILL);
      pushers[r]->wait(10s);
      final_target[r] = shm::load_acquire(seg.slot(r).published);
      pushers[r] = &start_pusher(job, r, final_target[r]);
    } else if (!pushers[r]->running() && pushers[r]->wait(1s) != 0) {
      pushers[r] = &start_pusher(job, r, final_target[r], {}, how);  // killed last and not restarted yet
    }
    // A pusher still running simply goes on to its target.
  }
  for (int r = 0; r < kWorkers; ++r) EXPECT_EQ(pushers[r]->wait(120s), 0) << pushers[r]->output();
  for (int r = 0; r < kWorkers; ++r) {
    // Each push takes one sequence number, or, streamed, one per chunk.
    std::uint64_t seqs = final_target[r];
    if (!how.pusher_args.empty()) {
      seqs = 0;
      for (std::uint64_t k = 0; k < final_target[r]; ++k) {
        const auto plan = shmps::test::plan_push(r, k, shmps::test::kPatternW, shmps::test::kPatternB);
        seqs += shmps::test::stream_chunks(plan.offset, plan.count, 16384);
      }
    }
    EXPECT_EQ(shm::load_acquire(seg.slot(r).published), seqs) << r;
  }
  expect_exact_sum(job.name(), final_target);
  std::cout << "chaos: " << worker_kills << " worker kills, " << server_kills << " server kills, "
            << shm::load_counter(seg.header().records_skipped) << " slice updates skipped as already applied, pushes";
  for (auto t : final_target) std::cout << " " << t;
  std::cout << ", exact\n";
  EXPECT_GT(worker_kills, 0u);
  EXPECT_GT(server_kills, 0u);
}

TEST(Chaos, RandomKillsOfWorkersAndServerLoseNothingAndDoubleNothing) { chaos(kWhole, 20, 25000, 3000); }

// The same with every push of "w" bigger than the ring: workers die between chunks too.
TEST(Chaos, StreamedPushesThroughRandomKillsLoseNothingAndDoubleNothing) { chaos(kStreamed, 10, 10000, 1500); }

TEST(ServerCrash, ASegmentLeftHalfCreatedIsDetectedAndRecreated) {
  Watchdog watchdog(60s);
  Job job("half", pattern_spec());
  {
    // What a server killed during creation leaves: the file, still all zeros ("creating").
    shm::Segment::create(job.name(), 1 << 20);
  }
  auto& server = job.start_server();
  job.wait_ready();
  {
    // Made anew, not recovered: a whole, valid segment (open() validates it) of the spec's size,
    // at the first epoch of its first server.
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    EXPECT_EQ(seg.header().total_bytes, seg.size());
    EXPECT_GT(seg.header().total_bytes, std::uint64_t{1} << 20);
    EXPECT_EQ(shm::load_acquire(seg.header().server_epoch), 1u);
  }
  // That the server found a half-created segment (rather than none) is said only in its log.
  EXPECT_NE(server.output().find("event=recreate"), std::string::npos) << server.output();
  auto& pusher = start_pusher(job, 0, 30);
  EXPECT_EQ(pusher.wait(30s), 0) << pusher.output();
  expect_exact_sum(job.name(), {30});
}
