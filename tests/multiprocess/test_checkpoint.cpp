// Checkpoints with real processes: shmps-server writes them (on demand through shmps-ctl,
// periodically, at a graceful stop), is SIGKILLed in the middle of one, and restores from them;
// restarted shmps-test-pusher workers continue their schedules from the restored resume state.
#include <gtest/gtest.h>

#include <shmps/shm/bf16.hpp>
#include <signal.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <shmps/server/checkpoint.hpp>
#include <shmps/server/safetensors.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/bf16.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/exact.hpp"
#include "../support/expect.hpp"
#include "../support/harness.hpp"

using namespace std::chrono_literals;
using shmps::test::expect_exact_sum;
using shmps::test::Job;
using shmps::test::pattern_spec;
using shmps::test::Process;
using shmps::test::Ran;
using shmps::test::run;
using shmps::test::Watchdog;
namespace shm = shmps::shm;
namespace fs = std::filesystem;
namespace st = shmps::server::safetensors;

namespace {

// Adam (so the optimizer state and the per-slice step counts matter), small slices (many of them),
// BSP whose barriers wait for a dead worker's slot to be taken again (so restarted workers rejoin
// the step they left, as the uninterrupted run had them).
std::string adam_spec(const std::string& consistency = "bsp", const std::string& state_dtype = "") {
  return "slice_bytes = 16384\nmax_workers = 4\nconsistency = \"" + consistency +
         "\"\non_worker_death = \"wait\"\n"
         "[optimizer]\nkind = \"adam\"\nlr = 0.01\n" +
         (state_dtype.empty() ? std::string() : "state_dtype = \"" + state_dtype + "\"\n") +
         "[[param]]\nname = \"w\"\nshape = [3, 40000]\ninit = { kind = \"u24\", stream = 7, scale = 0.001 }\n"
         "[[param]]\nname = \"b\"\nshape = [7]\n";
}

// A directory of its own for every test, removed at the end (also when the test fails).
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag) {
    path = fs::temp_directory_path() / shmps::test::unique_segment("ckpt-" + tag);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// Everything a checkpoint must bring back, read from the live segment (read-only).
struct JobState {
  std::vector<std::vector<float>> values, state0, state1;
  std::vector<std::uint64_t> slice_version, slice_clock, slice_step, last_applied;
  struct Slot {
    std::uint64_t generation, applied, consumed_clock, resume_clock;
    std::vector<std::uint8_t> resume;
    bool operator==(const Slot&) const = default;
  };
  std::vector<Slot> slots;
  std::uint64_t model_clock = 0, epoch = 0, steps = 0, records_applied = 0;
  std::uint32_t consistency = 0;
};

JobState capture(const std::string& name) {
  auto seg = shm::Segment::open(name, shm::Access::read_only);
  const auto& h = seg.header();
  JobState s;
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const auto& p = seg.param(i);
    s.values.emplace_back(seg.values(p), seg.values(p) + p.size);
    auto array = [&](int a) {
      if (a >= shm::state_arrays_of(p)) return std::vector<float>();
      if (h.optimizer.state_dtype == shmps::StateDType::bf16) {  // widened (exact)
        const auto* b = shm::at<std::uint16_t>(seg.base(), p.state_offset[a]);
        std::vector<float> out(p.size);
        shm::from_bf16(b, out.data(), p.size);
        return out;
      }
      const float* f = shm::at<float>(seg.base(), p.state_offset[a]);
      return std::vector<float>(f, f + p.size);
    };
    s.state0.push_back(array(0));
    s.state1.push_back(array(1));
  }
  const auto* table = shm::at<std::uint64_t>(seg.base(), h.applied_offset);
  s.last_applied.assign(table, table + h.slice_count * h.max_workers);
  for (std::uint64_t i = 0; i < h.slice_count; ++i) {
    s.slice_version.push_back(shm::load_acquire(seg.slice(i).version));
    s.slice_clock.push_back(shm::load_acquire(seg.slice(i).clock));
    s.slice_step.push_back(seg.slice(i).step);
  }
  for (std::uint32_t r = 0; r < h.max_workers; ++r) {
    const auto& slot = seg.slot(r);
    const auto* blob = reinterpret_cast<const std::uint8_t*>(slot.resume);
    s.slots.push_back({shm::load_acquire(slot.generation), shm::load_acquire(slot.applied),
                       shm::load_acquire(slot.consumed_clock), shm::load_acquire(slot.resume_clock),
                       std::vector<std::uint8_t>(blob, blob + shm::load_acquire(slot.resume_bytes))});
  }
  s.model_clock = shm::load_acquire(seg.group(0).clock);
  s.epoch = shm::load_acquire(h.server_epoch);
  s.steps = shm::load_acquire(h.steps);
  s.records_applied = shm::load_acquire(h.records_applied);
  s.consistency = shm::load_acquire(h.consistency);
  return s;
}

std::uint64_t model_clock(const std::string& name) {
  auto seg = shm::Segment::open(name, shm::Access::read_only);
  return shm::load_acquire(seg.group(0).clock);
}

// The model's bytes (values, optimizer state, slice versions and steps) must be equal.
void expect_same_model(const JobState& a, const JobState& b) {
  ASSERT_EQ(a.values.size(), b.values.size());
  for (std::size_t i = 0; i < a.values.size(); ++i) {
    EXPECT_EQ(0, std::memcmp(a.values[i].data(), b.values[i].data(), a.values[i].size() * sizeof(float)))
        << "values of parameter " << i;
    EXPECT_TRUE(a.state0[i] == b.state0[i]) << "optimizer state 0 of parameter " << i;
    EXPECT_TRUE(a.state1[i] == b.state1[i]) << "optimizer state 1 of parameter " << i;
  }
  EXPECT_EQ(a.slice_version, b.slice_version);
  EXPECT_EQ(a.slice_step, b.slice_step);
  EXPECT_EQ(a.slice_clock, b.slice_clock);
}

Process& start_steps(Job& job, int rank, int steps, std::vector<std::string> extra = {}) {
  std::vector<std::string> argv{"shmps-test-pusher", "steps", "--workers", "2", "--steps", std::to_string(steps), "--resume"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return job.start(argv, {{"SHMPS_RANK", std::to_string(rank)}});
}

void run_steps(Job& job, int steps, std::vector<std::string> extra = {}) {
  auto& a = start_steps(job, 0, steps, extra);
  auto& b = start_steps(job, 1, steps, extra);
  ASSERT_EQ(a.wait(60s), 0) << a.output();
  ASSERT_EQ(b.wait(60s), 0) << b.output();
}

void stop_gracefully(Process& server) {
  server.kill(SIGTERM);
  ASSERT_EQ(server.wait(30s), 0) << server.output();
}

std::vector<char> read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_bytes(const fs::path& p, const std::vector<char>& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

TEST(Checkpoint, RoundTripRestoresEveryByteOfTheJob) {
  Watchdog wd(90s);
  TempDir dir("roundtrip");
  Job job("ckpt-rt", adam_spec());
  auto& server = job.start_server();
  job.wait_ready();
  run_steps(job, 12);
  const fs::path file = dir.path / "by-hand.safetensors";
  const Ran made = run({"shmps-ctl", "checkpoint", job.name(), file.string()});
  ASSERT_EQ(made.code, 0) << made.out << server.output();
  EXPECT_HAS(made.out, "written to " + file.string());
  const JobState before = capture(job.name());
  ASSERT_EQ(before.model_clock, 12u);

  // The file holds the parameters under their names, the optimizer state, and the job's metadata.
  const auto f = st::File::read(file);
  EXPECT_EQ(f.f32("w", {3, 40000}), before.values[0]);
  EXPECT_EQ(f.f32("b", {7}), before.values[1]);
  EXPECT_EQ(f.f32("w/adam.m", {3, 40000}), before.state0[0]);
  EXPECT_EQ(f.f32("b/adam.v", {7}), before.state1[1]);
  EXPECT_EQ(f.metadata().at("shmps.format"), "shmps-checkpoint-1");
  EXPECT_EQ(f.metadata().at("shmps.model_clock"), "12");
  EXPECT_EQ(f.metadata().at("shmps.consistency"), "bsp");
  EXPECT_HAS(f.metadata().at("shmps.optimizer"), "\"kind\":\"adam\"");
  EXPECT_EQ(f.metadata().at("shmps.version.b"), "12..12");

  // A crash of the whole box: server gone, shared memory gone.
  server.kill(SIGKILL);
  server.wait(10s);
  shmps::test::remove_segment(job.name());
  auto& restored = job.start_server({"--restore", file.string()});
  job.wait_ready();
  // The checks below read what came back from the segment itself; which file the server
  // restored from is said only in its log.
  EXPECT_HAS(restored.output(), "event=restored");
  const JobState after = capture(job.name());
  expect_same_model(before, after);
  EXPECT_EQ(before.last_applied, after.last_applied);
  EXPECT_TRUE(before.slots == after.slots);
  EXPECT_EQ(after.model_clock, 12u);
  EXPECT_EQ(after.steps, before.steps);
  EXPECT_EQ(after.records_applied, before.records_applied);
  EXPECT_EQ(after.epoch, before.epoch + 1);
  // The workers' resume state came back: restarted, they find their schedule done.
  run_steps(job, 12, {"--no-wait-for-peers"});
  for (std::uint32_t r = 0; r < 2; ++r) EXPECT_EQ(after.slots[r].resume.size(), 8u);
  EXPECT_EQ(model_clock(job.name()), 12u);
  expect_same_model(before, capture(job.name()));
}

shmps::StateDType state_dtype_of(const std::string& name) {
  auto seg = shm::Segment::open(name, shm::Access::read_only);
  return seg.header().optimizer.state_dtype;
}

// bf16 optimizer state (optimizer.state_dtype = "bf16"): a checkpoint holds it widened to F32
// tensors, exactly, and says the dtype in its metadata; it restores into a bf16 segment byte for
// byte, and into a float32 one exactly (every bf16 is a float32); a float32 checkpoint restores
// into a bf16 segment rounded to nearest even. A server restarted on the segment with the other
// dtype refuses it and says what to do.
TEST(Checkpoint, Bf16StateRoundTripsAndConvertsBetweenDtypes) {
  Watchdog wd(120s);
  TempDir dir("bf16");
  Job job("ckpt-bf16", adam_spec("bsp", "bf16"));
  auto& server = job.start_server();
  job.wait_ready();
  ASSERT_EQ(state_dtype_of(job.name()), shmps::StateDType::bf16);
  run_steps(job, 12);
  const fs::path file = dir.path / "bf16.safetensors";
  const Ran made = run({"shmps-ctl", "checkpoint", job.name(), file.string()});
  ASSERT_EQ(made.code, 0) << made.out << server.output();
  const JobState before = capture(job.name());
  const auto f = st::File::read(file);
  EXPECT_EQ(f.f32("w/adam.m", {3, 40000}), before.state0[0]);
  EXPECT_EQ(f.f32("w/adam.v", {3, 40000}), before.state1[0]);
  EXPECT_HAS(f.metadata().at("shmps.optimizer"), "\"state_dtype\":\"bf16\"");
  bool moved = false;
  for (float m : before.state0[0]) moved = moved || m != 0.0f;
  ASSERT_TRUE(moved) << "the state must have been trained, or the round trip proves nothing";

  // Restarted with the other dtype on the live segment: refused, by name.
  server.kill(SIGKILL);
  server.wait(10s);
  {
    std::ifstream in(job.spec_path());
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto at = text.find("state_dtype = \"bf16\"");
    ASSERT_NE(at, std::string::npos) << text;
    text.replace(at, std::string("state_dtype = \"bf16\"").size(), "state_dtype = \"f32\"");
    std::ofstream(job.spec_path(), std::ios::trunc) << text;
    auto& refused = job.start_server();
    EXPECT_NE(refused.wait(20s), 0);
    EXPECT_HAS(refused.output(), "keeps its optimizer state in bf16");
    EXPECT_HAS(refused.output(), "set state_dtype = \"bf16\"");
  }

  // Into a bf16 segment: byte for byte.
  shmps::test::remove_segment(job.name());
  {
    Job again("ckpt-bf16-again", adam_spec("bsp", "bf16"));
    again.start_server({"--restore", file.string()});
    again.wait_ready();
    expect_same_model(before, capture(again.name()));
  }
  // Into a float32 segment: the same numbers, now float32.
  fs::path f32_file = dir.path / "f32.safetensors";
  JobState as_f32;
  {
    Job wide("ckpt-bf16-wide", adam_spec());
    auto& s = wide.start_server({"--restore", file.string()});
    wide.wait_ready();
    ASSERT_EQ(state_dtype_of(wide.name()), shmps::StateDType::f32);
    as_f32 = capture(wide.name());
    expect_same_model(before, as_f32);
    // Train on in float32, so the state holds values bf16 cannot, and checkpoint that.
    run_steps(wide, 16, {"--no-wait-for-peers"});
    const Ran made2 = run({"shmps-ctl", "checkpoint", wide.name(), f32_file.string()});
    ASSERT_EQ(made2.code, 0) << made2.out << s.output();
    as_f32 = capture(wide.name());
  }
  // A float32 checkpoint into a bf16 segment: the state rounded to nearest even, values exact.
  {
    Job narrow("ckpt-bf16-narrow", adam_spec("bsp", "bf16"));
    narrow.start_server({"--restore", f32_file.string()});
    narrow.wait_ready();
    const JobState got = capture(narrow.name());
    ASSERT_EQ(got.values, as_f32.values);
    bool any_rounded = false;
    for (std::size_t p = 0; p < got.state0.size(); ++p)
      for (std::size_t i = 0; i < got.state0[p].size(); ++i) {
        ASSERT_EQ(got.state0[p][i], shm::from_bf16(shm::to_bf16(as_f32.state0[p][i])));
        ASSERT_EQ(got.state1[p][i], shm::from_bf16(shm::to_bf16(as_f32.state1[p][i])));
        any_rounded = any_rounded || got.state1[p][i] != as_f32.state1[p][i];
      }
    EXPECT_TRUE(any_rounded) << "float32 training must have left state that bf16 rounds";
  }
}

// Crash safety with bf16 state (the redo entry holds bf16 state arrays): a server SIGKILLed while
// copying a slice in (kill point apply.mid_copy), restarted, ends with the same model bytes,
// values and bf16 state, as a run that was never interrupted. (Here, not in tests/crash, for the
// helpers that compare whole models.)
TEST(Checkpoint, Bf16ServerKilledMidCopyEndsAsUninterrupted) {
  Watchdog wd(120s);
  constexpr int kSteps = 12;
  JobState uninterrupted;
  {
    Job job("bf16-straight", adam_spec("bsp", "bf16"));
    job.start_server();
    job.wait_ready();
    run_steps(job, kSteps);
    uninterrupted = capture(job.name());
  }
  Job job("bf16-killed", adam_spec("bsp", "bf16"));
  auto& first = job.start_server({}, {{"SHMPS_KILL_AT", "apply.mid_copy:100"}});
  job.wait_ready();
  auto& a = start_steps(job, 0, kSteps);
  auto& b = start_steps(job, 1, kSteps);
  ASSERT_EQ(first.wait(30s), 128 + SIGKILL) << "the kill point was not reached:\n" << first.output();
  auto& second = job.start_server();
  job.wait_ready();
  ASSERT_EQ(a.wait(60s), 0) << a.output();
  ASSERT_EQ(b.wait(60s), 0) << b.output();
  EXPECT_HAS(second.output(), "event=redo");
  const JobState after = capture(job.name());
  EXPECT_EQ(after.model_clock, static_cast<std::uint64_t>(kSteps));
  expect_same_model(uninterrupted, after);
}

TEST(Checkpoint, RestoreThenContinueEqualsUninterruptedInBsp) {
  Watchdog wd(120s);
  constexpr int kSteps = 40;
  // The uninterrupted run.
  JobState uninterrupted;
  {
    Job job("ckpt-straight", adam_spec());
    job.start_server();
    job.wait_ready();
    run_steps(job, kSteps);
    uninterrupted = capture(job.name());
  }
  ASSERT_EQ(uninterrupted.model_clock, static_cast<std::uint64_t>(kSteps));

  // The same run, checkpointed in the middle, then everything SIGKILLed and the shared memory
  // lost; a new server restores the newest checkpoint of its directory and restarted workers
  // finish their schedules.
  TempDir dir("continue");
  Job job("ckpt-cont", adam_spec());
  auto& server = job.start_server({"--checkpoint-dir", dir.path.string()});
  job.wait_ready();
  auto& a = start_steps(job, 0, kSteps, {"--slow-ms", "20"});
  auto& b = start_steps(job, 1, kSteps, {"--slow-ms", "20"});
  const auto until = std::chrono::steady_clock::now() + 30s;
  while (model_clock(job.name()) < 8 && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(5ms);
  const Ran made = run({"shmps-ctl", "checkpoint", job.name()});
  ASSERT_EQ(made.code, 0) << made.out << server.output();
  a.kill(SIGKILL);
  b.kill(SIGKILL);
  server.kill(SIGKILL);
  a.wait(10s);
  b.wait(10s);
  server.wait(10s);
  const std::uint64_t at_crash = model_clock(job.name());
  shmps::test::remove_segment(job.name());
  const auto files = shmps::server::CheckpointDir(dir.path, job.name()).list();
  ASSERT_EQ(files.size(), 1u);
  const auto snapshot = shmps::server::read_checkpoint(files[0]);
  ASSERT_GE(snapshot.model_clock, 8u);
  ASSERT_LT(snapshot.model_clock, static_cast<std::uint64_t>(kSteps)) << "the checkpoint must be mid-run";

  auto& second = job.start_server({"--checkpoint-dir", dir.path.string()});
  job.wait_ready();
  // Restored from the checkpoint: the segment holds its model clock, its epoch plus one (the
  // new server's), and its model bytes. Which file it came from is said only in the log.
  const JobState restored = capture(job.name());
  EXPECT_EQ(restored.model_clock, snapshot.model_clock);
  EXPECT_EQ(restored.epoch, snapshot.epoch + 1);
  ASSERT_EQ(restored.values.size(), snapshot.params.size());
  for (std::size_t i = 0; i < snapshot.params.size(); ++i) EXPECT_TRUE(restored.values[i] == snapshot.params[i].values) << i;
  EXPECT_HAS(second.output(), "event=restored");
  EXPECT_HAS(second.output(), files[0].filename().string());
  auto& a2 = start_steps(job, 0, kSteps);
  auto& b2 = start_steps(job, 1, kSteps);
  ASSERT_EQ(a2.wait(60s), 0) << a2.output();
  ASSERT_EQ(b2.wait(60s), 0) << b2.output();
  EXPECT_HAS(a2.output(), "first_step " + std::to_string(snapshot.model_clock));
  const JobState continued = capture(job.name());
  EXPECT_EQ(continued.model_clock, static_cast<std::uint64_t>(kSteps));
  expect_same_model(uninterrupted, continued);
  // The steps between the checkpoint and the crash were done twice, and counted once.
  std::cout << "checkpoint at clock " << snapshot.model_clock << ", crash at clock " << at_crash << "\n";
}

// BSP steps that stream through rings smaller than a push (the step's pushes are summed as they
// come): a checkpoint taken after one worker's push of a step was summed, before the step ended,
// holds the values of the step's start and not the sums. Restored, both workers repeat the step:
// the summed push must count once (the repeat), not twice and not never.
TEST(Checkpoint, TakenInTheMiddleOfAStreamedStepTheRestoredJobRepeatsTheStepOnce) {
  Watchdog wd(120s);
  TempDir dir("midstep");
  const std::string spec = "consistency = \"bsp\"\nbsp_aggregate = \"sum\"\n" + pattern_spec(8, "ring_bytes = 262144\n");
  Job job("ckpt-midstep", spec);
  auto& server = job.start_server({"--checkpoint-dir", dir.path.string()});
  job.wait_ready();
  const std::size_t n = shmps::test::kPatternW;
  {
    shmps::Worker w0(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 30s});
    shmps::Worker w1(shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 30s});
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    ASSERT_TRUE(seg.streams_bsp_steps()) << "the ring must hold less than a push of w";
    w0.push("w", std::vector<float>(n, 1.0f));  // step 0: rank 0's part, summed; rank 1 has not pushed
    const auto until = std::chrono::steady_clock::now() + 30s;
    while (shm::load_acquire(seg.header().floats_applied) < n && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(2ms);
    ASSERT_GE(shm::load_acquire(seg.header().floats_applied), n) << "rank 0's push was not summed";
    ASSERT_EQ(shm::load_acquire(seg.group(0).clock), 0u);
    const Ran made = run({"shmps-ctl", "checkpoint", job.name()});
    ASSERT_EQ(made.code, 0) << made.out << server.output();
    server.kill(SIGKILL);
    server.wait(10s);
  }
  shmps::test::remove_segment(job.name());
  const auto files = shmps::server::CheckpointDir(dir.path, job.name()).list();
  ASSERT_EQ(files.size(), 1u);
  EXPECT_EQ(shmps::server::read_checkpoint(files[0]).model_clock, 0u);

  auto& second = job.start_server({"--checkpoint-dir", dir.path.string()});
  job.wait_ready();
  EXPECT_HAS(second.output(), "event=restored");
  shmps::Worker w0(shmps::WorkerOptions{.segment = job.name(), .rank = 0, .timeout = 30s});
  shmps::Worker w1(shmps::WorkerOptions{.segment = job.name(), .rank = 1, .timeout = 30s});
  std::vector<float> w(n);
  w0.pull("w", w);
  for (std::size_t k = 0; k < n; k += 997) ASSERT_EQ(w[k], 0.0f) << "restored: the values of step 0's start, element " << k;
  // Both repeat step 0 in full.
  w0.push("w", std::vector<float>(n, 1.0f));
  w0.clock();
  w1.push("w", std::vector<float>(n, 2.0f));
  w1.clock();
  w0.pull("w", w);  // waits for step 0
  std::size_t wrong = 0;
  for (std::size_t k = 0; k < n; ++k) wrong += w[k] != -3.0f ? 1 : 0;
  EXPECT_EQ(wrong, 0u) << "w[0] = " << w[0] << ", expected -3 (-4: the summed push counted twice; -2: the repeat skipped)";
  auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
  EXPECT_EQ(shm::load_acquire(seg.group(0).clock), 1u);
}

TEST(Checkpoint, GracefulStopAndPeriodicCheckpointsKeepTheNewestK) {
  Watchdog wd(90s);
  TempDir dir("periodic");
  Job job("ckpt-every", adam_spec());
  auto& server = job.start_server({"--checkpoint-dir", dir.path.string(), "--checkpoint-every", "5clocks", "--keep", "2"});
  job.wait_ready();
  run_steps(job, 23, {"--slow-ms", "20"});
  stop_gracefully(server);
  const std::string log = server.output();
  // One every 5 clocks (a checkpoint due while the previous one is still being written is taken
  // as soon as that one is durable), and one at the stop (23): the header counts them and holds
  // the newest one's clock.
  const JobState live = capture(job.name());
  std::uint64_t written = 0;
  {
    auto seg = shm::Segment::open(job.name(), shm::Access::read_only);
    const auto& h = seg.header();
    EXPECT_EQ(shm::load_acquire(h.state), static_cast<std::uint32_t>(shm::SegmentState::stopped));
    written = shm::load_acquire(h.checkpoints);
    EXPECT_EQ(shm::load_acquire(h.checkpoint_failures), 0u) << log;
    EXPECT_EQ(shm::load_acquire(h.last_checkpoint_clock), 23u) << log;
  }
  ASSERT_GE(written, 2u) << log;
  EXPECT_LE(written, 5u) << log;
  // The model clock of each one, the deleted ones too (--keep 2), is only in the server's log:
  // the spacing is read from there, once the log is known to list every checkpoint written.
  std::vector<std::uint64_t> clocks;
  for (auto at = log.find("event=checkpoint "); at != std::string::npos; at = log.find("event=checkpoint ", at + 1))
    clocks.push_back(std::stoull(log.substr(log.find("model_clock=", at) + 12)));
  ASSERT_EQ(clocks.size(), written) << log;
  EXPECT_EQ(clocks.back(), 23u) << log;
  for (std::size_t i = 0; i + 1 < clocks.size(); ++i) {
    EXPECT_GE(clocks[i], 5 * (i + 1)) << log;
    if (i > 0) {
      EXPECT_GE(clocks[i] - clocks[i - 1], 5u) << log;
    }
  }
  // The newest two are kept.
  const auto files = shmps::server::CheckpointDir(dir.path, job.name()).list();
  ASSERT_EQ(files.size(), 2u);
  const auto older = shmps::server::read_checkpoint(files[0]);
  const auto newer = shmps::server::read_checkpoint(files[1]);
  EXPECT_EQ(older.model_clock, clocks[clocks.size() - 2]);
  EXPECT_EQ(newer.model_clock, 23u);
  EXPECT_GT(newer.taken_unix_ns, older.taken_unix_ns);
  // BSP: taken at a clock boundary, every slice at the model clock.
  for (auto c : older.slice_clock) EXPECT_EQ(c, static_cast<std::int64_t>(older.model_clock));
  for (auto c : newer.slice_clock) EXPECT_EQ(c, 23);
  // A server that finds the segment uses it (it is newer than any file), not a checkpoint: the
  // segment is the one the first server created (a restore makes a new one), one epoch on.
  const std::uint64_t created = shm::Segment::open(job.name(), shm::Access::read_only).header().created_unix_ns;
  auto& again = job.start_server({"--checkpoint-dir", dir.path.string()});
  job.wait_ready();
  EXPECT_EQ(shm::Segment::open(job.name(), shm::Access::read_only).header().created_unix_ns, created) << again.output();
  const JobState resumed = capture(job.name());
  EXPECT_EQ(resumed.epoch, live.epoch + 1);
  expect_same_model(live, resumed);
}

TEST(Checkpoint, PeriodicByTimeWhileTrainingGoesOn) {
  Watchdog wd(90s);
  TempDir dir("timed");
  Job job("ckpt-timed", adam_spec("asp"));
  auto& server = job.start_server({"--checkpoint-dir", dir.path.string(), "--checkpoint-every", "200ms", "--keep", "0"});
  job.wait_ready();
  auto& a = start_steps(job, 0, 60, {"--slow-ms", "20"});
  auto& b = start_steps(job, 1, 60, {"--slow-ms", "20"});
  ASSERT_EQ(a.wait(60s), 0) << a.output();
  ASSERT_EQ(b.wait(60s), 0) << b.output();
  stop_gracefully(server);
  const auto files = shmps::server::CheckpointDir(dir.path, job.name()).list();
  EXPECT_GE(files.size(), 3u) << server.output();
  // Each one is whole, and ASP slices carry their versions.
  std::uint64_t last_applied = 0;
  for (const auto& f : files) {
    const auto snap = shmps::server::read_checkpoint(f);
    EXPECT_GE(snap.records_applied, last_applied) << f;
    last_applied = snap.records_applied;
    EXPECT_EQ(snap.consistency, shmps::Consistency::asp);
  }
}

TEST(Checkpoint, SigkillInTheMiddleOfACheckpointLeavesThePreviousOneValid) {
  for (const std::string point : {"checkpoint.mid_write", "checkpoint.before_rename"}) {
    SCOPED_TRACE(point);
    Watchdog wd(90s);
    TempDir dir("killed");
    Job job("ckpt-kill", pattern_spec(8));
    auto& server = job.start_server({"--checkpoint-dir", dir.path.string()}, {{"SHMPS_KILL_AT", point + ":2"}});
    job.wait_ready();
    auto& p = job.start({"shmps-test-pusher", "exact", "--pushes", "60"}, {{"SHMPS_RANK", "0"}});
    ASSERT_EQ(p.wait(30s), 0) << p.output();
    const Ran first = run({"shmps-ctl", "checkpoint", job.name()});
    ASSERT_EQ(first.code, 0) << first.out;
    const JobState at_first = capture(job.name());
    auto& q = job.start({"shmps-test-pusher", "exact", "--pushes", "90"}, {{"SHMPS_RANK", "0"}});
    ASSERT_EQ(q.wait(30s), 0) << q.output();
    const Ran second = run({"shmps-ctl", "checkpoint", job.name()});
    EXPECT_NE(second.code, 0) << second.out;
    EXPECT_HAS(second.out, "stopped before answering");
    EXPECT_EQ(server.wait(10s), 128 + SIGKILL) << server.output();

    // The first file is intact and the only checkpoint; the half-written one is a temporary.
    shmps::server::CheckpointDir ckpts(dir.path, job.name());
    const auto files = ckpts.list();
    ASSERT_EQ(files.size(), 1u);
    const auto snap = shmps::server::read_checkpoint(files[0]);
    EXPECT_EQ(snap.params[0].values, at_first.values[0]);
    std::size_t temporaries = 0;
    for (const auto& e : fs::directory_iterator(dir.path)) temporaries += e.path().string().find(".tmp-") != std::string::npos;
    EXPECT_EQ(temporaries, 1u);

    // With the shared memory lost, the next server comes back from the first checkpoint, and
    // clears the temporary file.
    shmps::test::remove_segment(job.name());
    auto& next = job.start_server({"--checkpoint-dir", dir.path.string()});
    job.wait_ready();
    temporaries = 0;
    for (const auto& e : fs::directory_iterator(dir.path)) temporaries += e.path().string().find(".tmp-") != std::string::npos;
    EXPECT_EQ(temporaries, 0u) << next.output();
    EXPECT_EQ(ckpts.list(), files);
    expect_same_model(at_first, capture(job.name()));
    // That the model came from the file (the segment was gone) is said only in the log.
    EXPECT_HAS(next.output(), "event=restored");
    expect_exact_sum(job.name(), {60});
    // The pusher's slot says 60 pushes were applied: a restarted pusher continues from there.
    auto& r = job.start({"shmps-test-pusher", "exact", "--pushes", "90"}, {{"SHMPS_RANK", "0"}});
    ASSERT_EQ(r.wait(30s), 0) << r.output();
    expect_exact_sum(job.name(), {90});
  }
}

TEST(Checkpoint, ADamagedNewestCheckpointIsSkippedForTheNewestValidOne) {
  Watchdog wd(90s);
  TempDir dir("damaged-newest");
  Job job("ckpt-skip", pattern_spec(8));
  auto& server = job.start_server({"--checkpoint-dir", dir.path.string()});
  job.wait_ready();
  auto& p = job.start({"shmps-test-pusher", "exact", "--pushes", "30"}, {{"SHMPS_RANK", "0"}});
  ASSERT_EQ(p.wait(30s), 0) << p.output();
  ASSERT_EQ(run({"shmps-ctl", "checkpoint", job.name()}).code, 0);
  auto& q = job.start({"shmps-test-pusher", "exact", "--pushes", "45"}, {{"SHMPS_RANK", "0"}});
  ASSERT_EQ(q.wait(30s), 0) << q.output();
  ASSERT_EQ(run({"shmps-ctl", "checkpoint", job.name()}).code, 0);
  server.kill(SIGKILL);
  server.wait(10s);
  const auto files = shmps::server::CheckpointDir(dir.path, job.name()).list();
  ASSERT_EQ(files.size(), 2u);
  auto bytes = read_bytes(files[1]);
  bytes[bytes.size() - 100] ^= 0x40;  // one bit of the data section
  write_bytes(files[1], bytes);

  shmps::test::remove_segment(job.name());
  auto& next = job.start_server({"--checkpoint-dir", dir.path.string()});
  job.wait_ready();
  // Restored from the older file: the segment holds its model (30 pushes, not 45).
  expect_exact_sum(job.name(), {30});
  // Which file was skipped, and why, is said only in the log.
  EXPECT_HAS(next.output(), "event=checkpoint_skipped");
  EXPECT_HAS(next.output(), "checksum");
  EXPECT_HAS(next.output(), "file=" + files[0].string());
}

TEST(Checkpoint, DamagedOrForeignFilesAreRefusedAndTouchNothing) {
  Watchdog wd(90s);
  TempDir dir("bad");
  Job job("ckpt-bad", adam_spec());
  auto& server = job.start_server();
  job.wait_ready();
  run_steps(job, 5);
  const fs::path good = dir.path / "good.safetensors";
  ASSERT_EQ(run({"shmps-ctl", "checkpoint", job.name(), good.string()}).code, 0);
  const auto file = st::File::read(good);

  // Each damaged variant of the good file.
  const auto bytes = read_bytes(good);
  auto variant = [&](const std::string& name) { return (dir.path / name).string(); };
  write_bytes(variant("truncated.safetensors"), std::vector<char>(bytes.begin(), bytes.begin() + static_cast<long>(bytes.size() / 2)));
  auto flipped = bytes;
  flipped[bytes.size() - 9] ^= 0x01;
  write_bytes(variant("checksum.safetensors"), flipped);
  write_bytes(variant("text.safetensors"), {'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd', '\n'});
  // Rewritten by our writer (so the checksum is right) with one thing changed.
  auto rewrite = [&](const std::string& name, auto&& change) {
    std::vector<st::TensorView> tensors;
    std::vector<std::vector<std::byte>> keep;
    for (const auto& [tname, t] : file.tensors()) {
      auto data = file.data(t);
      tensors.push_back({tname, t.dtype, t.shape, data});
    }
    std::sort(tensors.begin(), tensors.end(), [&](const auto& x, const auto& y) {
      return file.tensors().at(x.name).begin < file.tensors().at(y.name).begin;
    });
    auto meta = file.metadata();
    change(tensors, meta, keep);
    st::write_file(variant(name), tensors, meta);
  };
  rewrite("missing.safetensors", [](auto& tensors, auto&, auto&) {
    std::erase_if(tensors, [](const st::TensorView& t) { return t.name == "b"; });
  });
  rewrite("missing-state.safetensors", [](auto& tensors, auto&, auto&) {
    std::erase_if(tensors, [](const st::TensorView& t) { return t.name == "w/adam.v"; });
  });
  rewrite("dtype.safetensors", [](auto& tensors, auto&, auto&) {
    for (auto& t : tensors)
      if (t.name == "b") t.dtype = "I32";
  });
  rewrite("shape.safetensors", [](auto& tensors, auto&, auto&) {
    for (auto& t : tensors)
      if (t.name == "w" || t.name.rfind("w/", 0) == 0) t.shape = {40000, 3};
  });
  rewrite("plain.safetensors", [](auto& tensors, auto& meta, auto&) {
    std::erase_if(tensors, [](const st::TensorView& t) { return t.name.find('/') != std::string::npos; });
    meta.clear();
  });
  const std::vector<std::pair<std::string, std::string>> cases{
      {"truncated.safetensors", "truncated"},
      {"checksum.safetensors", "checksum"},
      {"text.safetensors", "not a safetensors file"},
      {"missing.safetensors", "tensor \"b\" is missing"},
      {"missing-state.safetensors", "tensor \"w/adam.v\" is missing"},
      {"dtype.safetensors", "found I32"},
      {"shape.safetensors", "has shape [40000, 3], but"},
      {"plain.safetensors", "not a shmps checkpoint"},
  };
  const JobState live = capture(job.name());
  for (const auto& [name, problem] : cases) {
    SCOPED_TRACE(name);
    // Into a new job: refused before anything is created.
    const std::string other = shmps::test::unique_segment("ckpt-none");
    const Ran fresh = run({"shmps-server", "--spec", job.spec_path(), "--name", other, "--restore", variant(name)});
    EXPECT_EQ(fresh.code, 1) << fresh.out;
    EXPECT_HAS(fresh.out, variant(name) + ": ");
    EXPECT_HAS(fresh.out, problem);
    shmps::test::expect_no_files(other);
    // Over the live job: the same error, and the live segment is untouched.
    const Ran over = run({"shmps-server", "--spec", job.spec_path(), "--restore", variant(name)});
    EXPECT_EQ(over.code, 1) << over.out;
    EXPECT_HAS(over.out, problem);
  }
  // A good file over a live segment is refused too: its state is newer.
  const Ran refused = run({"shmps-server", "--spec", job.spec_path(), "--restore", good.string()});
  EXPECT_EQ(refused.code, 1);
  EXPECT_HAS(refused.out, "exists, and its state is newer than any checkpoint");
  // A checkpoint of another model (another optimizer) is refused with what to change.
  Job other("ckpt-other", "max_workers = 4\nslice_bytes = 16384\n[optimizer]\nkind = \"sgd\"\nlr = 0.1\n"
                          "[[param]]\nname = \"w\"\nshape = [3, 40000]\n[[param]]\nname = \"b\"\nshape = [7]\n");
  const Ran sgd = run({"shmps-server", "--spec", other.spec_path(), "--restore", good.string()});
  EXPECT_EQ(sgd.code, 1);
  EXPECT_HAS(sgd.out, "was written with optimizer adam");
  EXPECT_HAS(sgd.out, "set kind = \"adam\"");
  shmps::test::expect_no_files(other.name());

  expect_same_model(live, capture(job.name()));
  EXPECT_TRUE(live.slots == capture(job.name()).slots);
  EXPECT_TRUE(server.running());
}

TEST(Checkpoint, CtlCheckpointSaysWhatIsWrong) {
  Watchdog wd(60s);
  TempDir dir("ctl");
  Job job("ckpt-ctl", pattern_spec(4));
  job.start_server();
  job.wait_ready();
  const Ran no_dir = run({"shmps-ctl", "checkpoint", job.name()});
  EXPECT_EQ(no_dir.code, 1);
  EXPECT_HAS(no_dir.out, "no checkpoint directory");
  const Ran is_dir = run({"shmps-ctl", "checkpoint", job.name(), dir.path.string()});
  EXPECT_EQ(is_dir.code, 1);
  EXPECT_HAS(is_dir.out, "is a directory");
  const Ran no_parent = run({"shmps-ctl", "checkpoint", job.name(), (dir.path / "nope" / "x.safetensors").string()});
  EXPECT_EQ(no_parent.code, 1);
  EXPECT_HAS(no_parent.out, "does not exist");
  const Ran missing = run({"shmps-ctl", "checkpoint", "t-no-such-segment"});
  EXPECT_EQ(missing.code, 1);
  EXPECT_HAS(missing.out, "does not exist");
  const Ran as_setting = run({"shmps-ctl", "set", job.name(), "checkpoint=/tmp/x"});
  EXPECT_EQ(as_setting.code, 1);
  EXPECT_HAS(as_setting.out, "shmps-ctl checkpoint");
  const Ran bad_every = run({"shmps-server", "--spec", job.spec_path(), "--checkpoint-dir", dir.path.string(),
                             "--checkpoint-every", "10 parsecs"});
  EXPECT_EQ(bad_every.code, 1);
  EXPECT_HAS(bad_every.out, "--checkpoint-every: expected a period");
  const Ran every_without_dir = run({"shmps-server", "--spec", job.spec_path(), "--checkpoint-every", "5s"});
  EXPECT_EQ(every_without_dir.code, 1);
  EXPECT_HAS(every_without_dir.out, "--checkpoint-every needs --checkpoint-dir");
  // And after all that, an explicit file works.
  const Ran ok = run({"shmps-ctl", "checkpoint", job.name(), (dir.path / "x.safetensors").string()});
  EXPECT_EQ(ok.code, 0) << ok.out;
  EXPECT_TRUE(fs::exists(dir.path / "x.safetensors"));
}

TEST(Checkpoint, AJobStartsFromPretrainedWeightsWithShapeChecks) {
  Watchdog wd(60s);
  TempDir dir("pretrained");
  // Weights from a trained job, exported.
  Job trained("ckpt-pre-src", adam_spec());
  trained.start_server();
  trained.wait_ready();
  run_steps(trained, 6);
  const fs::path weights = dir.path / "weights.safetensors";
  ASSERT_EQ(run({"shmps-ctl", "export", trained.name(), weights.string()}).code, 0);
  const JobState source = capture(trained.name());

  // A new job takes "w" from the file and "b" from a renamed tensor of it.
  const std::string body = "max_workers = 2\n[optimizer]\nkind = \"sgd\"\nlr = 0.1\n"
                           "[[param]]\nname = \"w\"\nshape = [3, 40000]\ninit = { kind = \"pretrained\", file = \"" +
                           weights.string() + "\" }\n[[param]]\nname = \"bias\"\nshape = [7]\n"
                           "init = { kind = \"pretrained\", file = \"" + weights.string() + "\", tensor = \"b\" }\n";
  Job fresh("ckpt-pre", body);
  fresh.start_server();
  fresh.wait_ready();
  const JobState started = capture(fresh.name());
  EXPECT_TRUE(started.values[0] == source.values[0]);
  EXPECT_TRUE(started.values[1] == source.values[1]);

  // A shape that does not match: a clear error, and no segment.
  Job wrong("ckpt-pre-bad", "max_workers = 2\n[optimizer]\nlr = 0.1\n[[param]]\nname = \"w\"\nshape = [3, 4000]\n"
                            "init = { kind = \"pretrained\", file = \"" + weights.string() + "\" }\n");
  const Ran refused = run({"shmps-server", "--spec", wrong.spec_path()});
  EXPECT_EQ(refused.code, 1) << refused.out;
  EXPECT_HAS(refused.out, weights.string());
  EXPECT_HAS(refused.out, "has shape [3, 40000], the spec says [3, 4000]");
  shmps::test::expect_no_files(wrong.name());
}
