// What a segment costs and where its pages come from, with real processes: the plan of a spec
// (shmps-server --plan) against what the live job reports (shmps-ctl inspect) and the file in
// /dev/shm; pages allocated by the thread or process that uses them (the server's apply threads
// for the model, each worker for its own ring); ring sizes set on the command line.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/layout.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/pages.hpp>
#include <shmps/shm/segment.hpp>
#include <shmps/worker.hpp>

#include "../support/expect.hpp"
#include "../support/harness.hpp"

using namespace std::chrono_literals;
using shmps::test::expect_no_files;
using shmps::test::has;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::run;
using shmps::test::Watchdog;
namespace shm = shmps::shm;

namespace {

// Adam (two state arrays), three worker slots; "w" is 480000 bytes, so the automatic ring is
// the 1 MiB minimum.
constexpr const char* kSpec = R"(
slice_bytes = 65536
max_workers = 3
[optimizer]
kind = "adam"
lr = 0.001
[[param]]
name = "w"
shape = [3, 40000]
[[param]]
name = "b"
shape = [7]
)";

// The memory table in a program's output: from its "PART" line to its "overhead" line.
std::vector<std::string> memory_table(const std::string& out) {
  std::vector<std::string> table;
  std::istringstream in(out);
  bool inside = false;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("PART ", 0) == 0) inside = true;
    if (!inside) continue;
    table.push_back(line);
    if (line.rfind("overhead ", 0) == 0) break;
  }
  return table;
}

// The BYTES column of a table row ("rings   3146304   3.0 MiB  ..."), by its name.
std::uint64_t bytes_of(const std::vector<std::string>& table, const std::string& name) {
  for (const auto& line : table) {
    if (line.rfind(name + "  ", 0) != 0) continue;
    std::istringstream in(line.substr(name.size()));
    std::uint64_t bytes = 0;
    in >> bytes;
    return bytes;
  }
  ADD_FAILURE() << "no row '" << name << "'";
  return 0;
}

std::uint64_t file_size(const std::string& name) {
  struct stat st {};
  if (::stat(shm::segment_path(name).c_str(), &st) != 0) return 0;
  return static_cast<std::uint64_t>(st.st_size);
}

// The whole pages of [offset, offset + bytes) that are allocated in /dev/shm (mincore on a file
// mapping reports the file's pages, whoever allocated them), and how many there are.
struct Pages {
  std::size_t resident = 0, total = 0;
};
Pages pages_in(const shm::Segment& s, std::uint64_t offset, std::uint64_t bytes) {
  const std::uint64_t page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  const std::uint64_t first = (offset + page - 1) / page * page, last = (offset + bytes) / page * page;
  Pages p;
  if (last <= first) return p;
  std::vector<unsigned char> in((last - first) / page);
  if (::mincore(const_cast<std::byte*>(s.base()) + first, last - first, in.data()) != 0) {
    ADD_FAILURE() << "mincore failed";
    return p;
  }
  p.total = in.size();
  for (unsigned char c : in) p.resident += c & 1U;
  return p;
}

// Slot r's ring records (after its RingHeader).
Pages ring_records(const shm::Segment& s, unsigned r) {
  const shm::ByteRange ring = s.ring_range(r);
  return pages_in(s, ring.offset + sizeof(shm::RingHeader), ring.bytes - sizeof(shm::RingHeader));
}

}  // namespace

TEST(Memory, ThePlanOfASpecIsWhatTheLiveJobReportsAndItsPartsAddUpToTheFile) {
  Watchdog wd(60s);
  Job job("memplan", kSpec);
  // The plan creates nothing.
  const auto plan = run({"shmps-server", "--spec", job.spec_path(), "--name", job.name(), "--plan"});
  ASSERT_EQ(plan.code, 0) << plan.out;
  expect_no_files(job.name());
  EXPECT_HAS(plan.out, "ring_bytes 1048576 per worker: automatic: the minimum of 1 MiB");
  EXPECT_HAS(plan.out, "huge pages ");
  const auto planned = memory_table(plan.out);
  ASSERT_GE(planned.size(), 14u) << plan.out;

  job.start_server();
  job.wait_ready();
  const auto inspect = run({"shmps-ctl", "inspect", job.name()});
  ASSERT_EQ(inspect.code, 0) << inspect.out;
  const auto live = memory_table(inspect.out);
  // The same table, line for line.
  EXPECT_EQ(live, planned) << "plan:\n" << plan.out << "\ninspect:\n" << inspect.out;

  // Its parts add up to the segment's file, and values and optimizer state are what the spec says.
  const std::uint64_t size = file_size(job.name());
  ASSERT_GT(size, 0u);
  std::uint64_t sum = 0;
  for (std::size_t i = 1; i < live.size(); ++i) {
    if (live[i].rfind("total ", 0) == 0) break;
    std::istringstream in(live[i].substr(20));
    std::uint64_t bytes = 0;
    in >> bytes;
    sum += bytes;
  }
  EXPECT_EQ(sum, size) << inspect.out;
  EXPECT_EQ(bytes_of(live, "total"), size);
  EXPECT_EQ(bytes_of(live, "values"), (120000u + 7u) * 4u);
  EXPECT_EQ(bytes_of(live, "optimizer state"), 2u * (120000u + 7u) * 4u);
  EXPECT_EQ(bytes_of(live, "rings"), 3u * (sizeof(shm::RingHeader) + 1048576u));
  EXPECT_EQ(bytes_of(live, "worker slots"), 3u * sizeof(shm::WorkerSlot));
  EXPECT_EQ(bytes_of(live, "overhead"), size - 3u * (120000u + 7u) * 4u);

  // The segment's header says what it is and what /dev/shm offered it; so does inspect.
  const bool offered = shm::huge_page_support().offered();
  {
    const shm::Segment view = shm::Segment::open(job.name(), shm::Access::read_only);
    const shm::SegmentHeader& h = view.header();
    EXPECT_EQ(h.total_bytes, size);
    EXPECT_EQ(h.ring_bytes, 1048576u);
    const shm::HugePageSupport found{static_cast<shm::HugeSetting>(shm::load_acquire(h.huge_mount)),
                                     static_cast<shm::HugeSetting>(shm::load_acquire(h.huge_sysfs))};
    EXPECT_EQ(found.offered(), offered);
    EXPECT_LE(shm::load_acquire(h.huge_bytes), size);
  }
  EXPECT_HAS(inspect.out, offered ? "huge pages   offered (" : "huge pages   not offered (");
  // The log says it too, at the start, for whoever reads only the log: these lines are the
  // operator's record of the plan (the ring size's rule is written nowhere else), so their
  // figures are checked against the header's here.
  const std::string log = job.server().output();
  EXPECT_HAS(log, "event=memory segment=" + job.name() + " total_bytes=" + std::to_string(size) + " ");
  EXPECT_HAS(log, "event=ring_size segment=" + job.name() + " ring_bytes=1048576 rule=\"automatic: the minimum of 1 MiB\"");
  EXPECT_HAS(log, offered ? "huge_pages=\"offered (" : "huge_pages=\"not offered (");
}

// Issue 14's target: one 1 GiB parameter, SGD, 64 worker slots. The rings no longer grow with
// workers x model: each is capped at kMaxAutoRingBytes (pushes stream through it), and BSP adds
// one model's worth of step sums instead of a whole step per ring. The plan must stay within
// values + 64 x 64 MiB + 1 GiB (it was 129 GiB in ASP before the cap).
TEST(Memory, A1GiBModelWith64WorkersHasCappedRingsAndInBspOneModelOfStepSums) {
  Watchdog wd(60s);
  constexpr std::uint64_t kSide = 16384, kWorkers = 64;
  const std::string spec = R"(
slice_bytes = 65536
max_workers = 64
[optimizer]
kind = "sgd"
lr = 0.01
[[param]]
name = "w"
shape = [16384, 16384]
)";
  Job job("membig", spec);
  Job bsp_job("membigbsp", "consistency = \"bsp\"\n" + spec);
  const std::uint64_t values = kSide * kSide * sizeof(float);  // 1 GiB, a multiple of 64
  const std::uint64_t rings = kWorkers * (sizeof(shm::RingHeader) + shm::kMaxAutoRingBytes);
  const std::uint64_t bound = values + kWorkers * (std::uint64_t{64} << 20) + (std::uint64_t{1} << 30);
  // The parts above the total add up to it.
  const auto expect_parts_add_up = [](const std::vector<std::string>& table) {
    std::uint64_t sum = 0;
    for (std::size_t i = 1; i < table.size() && table[i].rfind("total ", 0) != 0; ++i) {
      std::istringstream in(table[i].substr(20));
      std::uint64_t bytes = 0;
      in >> bytes;
      sum += bytes;
    }
    EXPECT_EQ(sum, bytes_of(table, "total"));
  };
  const auto has_row = [](const std::vector<std::string>& table, const std::string& name) {
    for (const auto& line : table)
      if (line.rfind(name + "  ", 0) == 0) return true;
    return false;
  };
  const std::string capped = "ring_bytes " + std::to_string(shm::kMaxAutoRingBytes) + " per worker: automatic: the cap of ";

  const auto asp = run({"shmps-server", "--spec", job.spec_path(), "--name", job.name(), "--plan"});
  ASSERT_EQ(asp.code, 0) << asp.out;
  EXPECT_HAS(asp.out, capped);
  const auto asp_table = memory_table(asp.out);
  EXPECT_EQ(bytes_of(asp_table, "values"), values);
  EXPECT_EQ(bytes_of(asp_table, "optimizer state"), 0u);
  EXPECT_EQ(bytes_of(asp_table, "rings"), rings);
  EXPECT_FALSE(has_row(asp_table, "BSP step sums")) << asp.out;  // ASP never pays for them
  EXPECT_LE(bytes_of(asp_table, "total"), bound) << asp.out;
  expect_parts_add_up(asp_table);

  // BSP, from the command line and from the spec: the same rings, plus one model of step sums.
  const auto bsp = run({"shmps-server", "--spec", job.spec_path(), "--name", job.name(), "--consistency", "bsp", "--plan"});
  const auto bsp_spec = run({"shmps-server", "--spec", bsp_job.spec_path(), "--name", bsp_job.name(), "--plan"});
  for (const auto* plan : {&bsp, &bsp_spec}) {
    ASSERT_EQ(plan->code, 0) << plan->out;
    EXPECT_HAS(plan->out, capped);
    const auto table = memory_table(plan->out);
    EXPECT_EQ(bytes_of(table, "values"), values);
    EXPECT_EQ(bytes_of(table, "BSP step sums"), values) << plan->out;
    EXPECT_EQ(bytes_of(table, "rings"), rings);
    EXPECT_LE(bytes_of(table, "total"), bound) << plan->out;
    // The step sums are all BSP adds (and a huge-page boundary before them).
    EXPECT_GE(bytes_of(table, "total"), bytes_of(asp_table, "total") + values);
    EXPECT_LE(bytes_of(table, "total"), bytes_of(asp_table, "total") + values + shm::kHugePageBytes);
    expect_parts_add_up(table);
  }
  EXPECT_EQ(memory_table(bsp.out), memory_table(bsp_spec.out));
  expect_no_files(job.name());
  expect_no_files(bsp_job.name());
}

TEST(Memory, TheModelIsAllocatedByTheServerAndEachRingByItsOwnWorkerWhenItAttaches) {
  Watchdog wd(60s);
  Job job("memtouch", kSpec);
  job.start_server();
  job.wait_ready();
  const shm::Segment view = shm::Segment::open(job.name(), shm::Access::read_only);
  const shm::SegmentHeader& h = view.header();

  // The server allocated values and optimizer state, whole, and no ring's records.
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const shm::ParamEntry& p = view.param(i);
    const Pages values = pages_in(view, p.values_offset, p.size * sizeof(float));
    EXPECT_EQ(values.resident, values.total) << "values of parameter " << i;
    for (int a = 0; a < shm::state_arrays_of(p); ++a) {
      const Pages state = pages_in(view, p.state_offset[a], p.size * sizeof(float));
      EXPECT_EQ(state.resident, state.total) << "state " << a << " of parameter " << i;
    }
  }
  std::uint64_t untouched = 0;
  for (unsigned r = 0; r < 3; ++r) {
    const Pages ring = ring_records(view, r);
    EXPECT_GE(ring.total, 250u);  // 1 MiB: 256 pages, less the ones shared with the headers
    EXPECT_EQ(ring.resident, 0u) << "ring " << r << " was touched before its worker attached";
    untouched += ring.total * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  }
  // The file says so too, and so does inspect.
  struct stat st {};
  ASSERT_EQ(::stat(shm::segment_path(job.name()).c_str(), &st), 0);
  EXPECT_LE(static_cast<std::uint64_t>(st.st_blocks) * 512, h.total_bytes - untouched);
  EXPECT_HAS(run({"shmps-ctl", "inspect", job.name()}).out, "allocated now ");

  // A worker that attaches (and does nothing else) has allocated its whole ring, and only its own.
  {
    shmps::Worker w(shmps::WorkerOptions{.segment = job.name(), .rank = 1});
    const Pages ring1 = ring_records(view, 1);
    EXPECT_EQ(ring1.resident, ring1.total);
    EXPECT_EQ(ring_records(view, 0).resident, 0u);
    EXPECT_EQ(ring_records(view, 2).resident, 0u);
  }
  // So does a worker process, which then pushes into it.
  auto& pusher = job.start({"shmps-test-pusher", "exact", "--pushes", "6"}, {{"SHMPS_RANK", "2"}});
  ASSERT_EQ(pusher.wait(30s), 0) << pusher.output();
  EXPECT_HAS(pusher.output(), "rank 2 pushed 6 applied 6");
  const Pages ring2 = ring_records(view, 2);
  EXPECT_EQ(ring2.resident, ring2.total);
  EXPECT_EQ(ring_records(view, 0).resident, 0u);  // a slot nobody attached to costs no memory
}

TEST(Memory, RingBytesAndMaxWorkersCanBeSetOnTheCommandLine) {
  Watchdog wd(90s);
  Job job("memring", kSpec);
  const auto plan = run({"shmps-server", "--spec", job.spec_path(), "--name", job.name(), "--ring-bytes", "131072",
                         "--max-workers", "5", "--plan"});
  ASSERT_EQ(plan.code, 0) << plan.out;
  EXPECT_HAS(plan.out, "ring_bytes 131072 per worker: set by ring_bytes");
  EXPECT_HAS(plan.out, "5 worker slots");
  EXPECT_EQ(bytes_of(memory_table(plan.out), "rings"), 5u * (sizeof(shm::RingHeader) + 131072u));
  // Bad values are refused, saying why, and create nothing.
  const auto bad = run({"shmps-server", "--spec", job.spec_path(), "--name", job.name(), "--ring-bytes", "100"});
  EXPECT_NE(bad.code, 0);
  EXPECT_HAS(bad.out, "--ring-bytes: must be a multiple of 64");
  const auto none = run({"shmps-server", "--spec", job.spec_path(), "--name", job.name(), "--max-workers", "0"});
  EXPECT_NE(none.code, 0);
  EXPECT_HAS(none.out, "--max-workers: must be from 1");
  expect_no_files(job.name());

  // A job made with small rings...
  auto& first = job.start_server({"--ring-bytes", "131072"});
  job.wait_ready();
  auto inspect = run({"shmps-ctl", "inspect", job.name()});
  EXPECT_HAS(inspect.out, "(ring_bytes 131072 and a 192-byte header each)");
  first.kill(SIGTERM);
  ASSERT_EQ(first.wait(20s), 0) << first.output();
  const std::uint64_t created = shm::Segment::open(job.name(), shm::Access::read_only).header().created_unix_ns;
  // ... keeps them when its server restarts with an automatic ring, in another mode (a BSP step
  // of "w" does not fit 128 KiB: the server says so) ...
  auto& second = job.start_server({"--consistency", "bsp"});
  job.wait_ready();
  inspect = run({"shmps-ctl", "inspect", job.name()});
  EXPECT_HAS(inspect.out, "(ring_bytes 131072 and a 192-byte header each)");
  {
    // The same segment (recovered, not made anew), its rings as they were, now in BSP.
    const shm::Segment view = shm::Segment::open(job.name(), shm::Access::read_only);
    EXPECT_EQ(view.header().created_unix_ns, created);
    EXPECT_EQ(view.header().ring_bytes, 131072u);
    EXPECT_EQ(shm::load_acquire(view.header().consistency), static_cast<std::uint32_t>(shmps::Consistency::bsp));
  }
  second.kill(SIGTERM);
  ASSERT_EQ(second.wait(20s), 0) << second.output();
  // The advice that a BSP step does not fit the ring is a warning in the log, and nowhere else.
  EXPECT_HAS(second.output(), "event=bsp_ring segment=" + job.name() + " note=\"each worker's ring holds 131072 bytes");
  // ... and refuses another explicit size.
  const auto other = run({"shmps-server", "--spec", job.spec_path(), "--name", job.name(), "--ring-bytes", "262144"});
  EXPECT_NE(other.code, 0);
  EXPECT_HAS(other.out, "already exists with rings of 131072 bytes, but ring_bytes 262144 was asked for");
}

TEST(Memory, TheLauncherPassesRingBytesToTheServerItStarts) {
  Watchdog wd(60s);
  Job job("memlaunch", kSpec);
  // Room for two pushes of "w" (480000 bytes each), less than the 1 MiB minimum of an automatic ring.
  Process launch({"shmps-launch", "--spec", job.spec_path(), "--name", job.name(), "--workers", "2", "--ring-bytes",
                  "983040", "--keep", "--", "shmps-test-pusher", "exact", "--pushes", "4"});
  ASSERT_EQ(launch.wait(45s), 0) << launch.output();
  EXPECT_HAS(launch.output(), "ring_bytes=983040");
  const auto inspect = run({"shmps-ctl", "inspect", job.name()});
  EXPECT_HAS(inspect.out, "(ring_bytes 983040 and a 192-byte header each)");
  // More workers than --max-workers gives slots is refused before anything starts (the job's own
  // name and a program that does nothing, so that nothing would be left behind if it were not).
  const auto many = run({"shmps-launch", "--spec", job.spec_path(), "--name", job.name(), "--workers", "3",
                         "--max-workers", "2", "--", "/bin/true"});
  EXPECT_NE(many.code, 0);
  EXPECT_HAS(many.out, "--workers 3 is more than the 2 worker slots of --max-workers");
}
