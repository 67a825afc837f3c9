// Fuzz target ring_records: a buggy or hostile worker. A server is started in this process on a
// fresh segment (a dense parameter and a [[table]], SGD), a Worker attaches as rank 0, and then
// the fuzzer's bytes are written straight into rank 0's ring as its records (headers: kind,
// param, record_bytes, offset, count, seq, generation, clock; payloads; rows records with their
// row ids; padding; clock records with resume blobs; puts) and its tail is committed; the server
// then runs one collect + apply round on it (Server::apply_round), as it would on a live job.
//
// Input: byte 0 picks the consistency (0 asp, 1 bsp, 2 ssp:1); bytes 1-8 are the tail the worker
// commits (little-endian u64; 0: the length of the ring's bytes, as an honest worker would); the
// rest is the ring's bytes from position 0, at most the ring's capacity (16 KiB).
// Checks: the round returns (no crash, no sanitizer report: nothing is read or written outside
// the segment); the ring's head never passes what was committed; and when the first record is
// plainly malformed (a kind that does not exist, or a size that is not whole 64-byte lines
// inside the ring), or the tail is more than a ring ahead of the head, the server refuses it: no value of any parameter changes, and it logs
// event=bad_record.
//
// SHMPS_FUZZ_MAKE_SEEDS=DIR: writes rings of real pushes (dense, rows, clock, put) into DIR.
#include <atomic>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <spdlog/sinks/base_sink.h>

#include <shmps/error.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/server/server.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/layout.hpp>
#include <shmps/worker.hpp>

#include "fuzz_support.hpp"

namespace {

using namespace shmps;

constexpr const char* kModes[] = {"asp", "bsp", "ssp:1"};

std::string spec_text(const std::string& name, int mode) {
  return "name = \"" + name + "\"\nconsistency = \"" + kModes[mode] + R"("
max_workers = 2
slice_bytes = 256
ring_bytes = 16384
[optimizer]
kind = "sgd"
lr = 1.0
[[param]]
name = "p"
shape = [300]
init = { kind = "constant", value = 1.0 }
[[table]]
name = "emb"
rows = 64
dim = 4
init = { kind = "constant", value = 2.0 }
)";
}

// Counts the server's event=bad_record lines (the log the task asks to move).
struct CountingSink : spdlog::sinks::base_sink<std::mutex> {
  std::atomic<std::uint64_t> bad_records{0};

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    const std::string_view text(msg.payload.data(), msg.payload.size());
    if (text.find("event=bad_record") != std::string_view::npos) ++bad_records;
  }
  void flush_() override {}
};
std::shared_ptr<CountingSink> g_sink;

struct Job {
  std::string name;
  std::optional<server::Server> server;
  std::optional<Worker> worker;
  explicit Job(int mode, std::chrono::milliseconds timeout = std::chrono::seconds(30))
      : name(fuzz::unique_segment("ring")) {
    server::ServerOptions o;
    o.spec = server::parse_model_spec(spec_text(name, mode), "<fuzz spec>");
    o.threads = 1;
    server.emplace(std::move(o));
    server->start();
    worker.emplace(WorkerOptions{.segment = name, .rank = 0, .timeout = timeout});
    server->apply_round();  // BSP: admits the worker to its group, as a running server would
  }
  ~Job() {
    worker.reset();
    server.reset();
    fuzz::remove_segment(name);
  }
  shm::Segment& segment() { return const_cast<shm::Segment&>(server->segment()); }
};

void make_seeds(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  for (int mode = 0; mode < 3; ++mode) {
    Job job(mode);
    Worker& w = *job.worker;
    std::vector<float> g(300, 0.5f), part(40, -1.0f), rows(12, 0.25f);
    std::vector<std::uint64_t> ids{3, 3, 63};
    w.push("p", g);
    w.push("p", 100, part);
    w.push_rows("emb", ids, rows);
    w.clock();
    const std::uint64_t tail = shm::load_acquire(job.segment().ring(0).tail);
    std::vector<std::uint8_t> bytes(9 + tail, 0);
    bytes[0] = static_cast<std::uint8_t>(mode);
    std::memcpy(bytes.data() + 9, job.segment().ring_data(0), tail);
    std::ofstream(dir / ("pushes-" + std::string(mode == 2 ? "ssp" : kModes[mode])), std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  {
    Job job(0, std::chrono::milliseconds(300));
    std::vector<float> v(300, 7.0f);
    try {
      job.worker->put("p", v);  // may wait for the round this harness never runs here
    } catch (const shmps::Error&) {
    }
    const std::uint64_t tail = shm::load_acquire(job.segment().ring(0).tail);
    std::vector<std::uint8_t> bytes(9 + tail, 0);
    std::memcpy(bytes.data() + 9, job.segment().ring_data(0), tail);
    std::ofstream(dir / "put", std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
}

bool plainly_malformed(const shm::PushRecord& r, std::uint64_t tail, std::uint64_t capacity) {
  const auto kind = static_cast<std::uint32_t>(r.kind);
  const bool known = kind == 1 || kind == 2 || kind == 3 || kind == 4 || kind == 7;
  return !known || r.record_bytes < sizeof(shm::PushRecord) || r.record_bytes % shm::kCacheLine != 0 ||
         r.record_bytes > capacity || r.record_bytes > tail;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("SHMPS_FUZZ_MAKE_SEEDS")) {
    make_seeds(dir);
    std::exit(0);
  }
  g_sink = std::make_shared<CountingSink>();
  auto logger = std::make_shared<spdlog::logger>("fuzz", g_sink);
  logger->set_level(spdlog::level::warn);
  spdlog::set_default_logger(logger);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 9) return 0;
  const int mode = data[0] % 3;
  std::uint64_t tail = 0;
  std::memcpy(&tail, data + 1, 8);
  data += 9, size -= 9;
  Job job(mode);
  shm::Segment& seg = job.segment();
  shm::RingHeader& ring = seg.ring(0);
  const std::uint64_t capacity = ring.capacity;
  const std::size_t n = std::min<std::size_t>(size, capacity);
  std::memcpy(seg.ring_data(0), data, n);
  if (tail == 0) tail = n;

  // Every value before the round.
  const std::uint32_t params = seg.header().param_count;
  std::vector<std::vector<float>> before(params);
  for (std::uint32_t i = 0; i < params; ++i) {
    const shm::ParamEntry& p = seg.param(i);
    before[i].assign(seg.values(p), seg.values(p) + p.size);
  }
  const std::uint64_t logged_before = g_sink->bad_records.load();
  // A tail more than the ring's capacity past the head (0) is malformed too: no producer commits it.
  const auto* first = reinterpret_cast<const shm::PushRecord*>(seg.ring_data(0));
  const bool malformed_first = tail > capacity || (tail > 0 && plainly_malformed(*first, tail, capacity));

  shm::store_release(ring.tail, tail);
  try {
    job.server->apply_round();
  } catch (const shmps::Error&) {
    // Refusing a round with an error is allowed; the checks below still hold.
  }

  SHMPS_FUZZ_CHECK(shm::load_acquire(ring.head) <= tail);
  if (malformed_first) {
    for (std::uint32_t i = 0; i < params; ++i) {
      const shm::ParamEntry& p = seg.param(i);
      SHMPS_FUZZ_CHECK(std::memcmp(seg.values(p), before[i].data(), p.size * sizeof(float)) == 0);
    }
    SHMPS_FUZZ_CHECK(g_sink->bad_records.load() > logged_before);
  }
  return 0;
}
