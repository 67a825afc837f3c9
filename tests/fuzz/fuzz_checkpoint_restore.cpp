// Fuzz target checkpoint_restore: feeds the bytes as a checkpoint file to a server started with
// --restore FILE (Server::start: read_checkpoint, check_restorable, restore_into a segment being
// created), for a fixed model: an Adagrad dense parameter and a table, 4 worker slots.
// Before the read, a "xxh3:<16 hex digits>" checksum in the header is rewritten in place to the
// data section's true checksum, so that mutated data (slot tables, versions, resume blobs,
// optimizer state) reaches the restore instead of stopping at the checksum; a mismatch is
// still tested whenever the header has no such string.
// Checks: start() succeeds or throws shmps::Error (nothing else, no sanitizer report); after a
// restore the server survives an apply round and its values are exactly the file's.
//
// SHMPS_FUZZ_MAKE_SEEDS=DIR: writes seed checkpoints of this model (the project's own writer,
// after real pushes) into DIR and exits.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

#include <tbb/task_arena.h>

#include <shmps/error.hpp>
#include <shmps/server/checkpoint.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/server/safetensors.hpp>
#include <shmps/server/server.hpp>
#include <shmps/worker.hpp>

#include "fuzz_support.hpp"

namespace {

using namespace shmps;

constexpr const char* kModel = R"(
max_workers = 4
slice_bytes = 256
ring_bytes = 65536
[optimizer]
kind = "adagrad"
lr = 0.5
[[param]]
name = "w"
shape = [8, 16]
init = { kind = "u24", stream = 3, scale_divisor = 4 }
[[table]]
name = "emb"
rows = 32
dim = 4
)";

server::ServerOptions options_for(const std::string& name) {
  server::ServerOptions o;
  o.spec = server::parse_model_spec("name = \"" + name + "\"\n" + kModel, "<fuzz spec>");
  o.threads = 1;
  return o;
}

// The data section's checksum written over the header's "xxh3:" digits, when they are there.
void fix_checksum(std::vector<std::uint8_t>& bytes) {
  if (bytes.size() < 8) return;
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  if (n > bytes.size() - 8) return;
  const std::string_view header(reinterpret_cast<const char*>(bytes.data()) + 8, n);
  const std::size_t at = header.find(server::safetensors::kChecksumPrefix);
  if (at == std::string_view::npos || at + 5 + 16 > header.size()) return;
  const std::string sum = server::safetensors::checksum(
      std::as_bytes(std::span<const std::uint8_t>(bytes.data() + 8 + n, bytes.size() - 8 - n)));
  std::memcpy(bytes.data() + 8 + at, sum.data(), sum.size());
}

void make_seeds(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  const std::string name = fuzz::unique_segment("ckseed");
  {
    server::Server s(options_for(name));
    s.start();
    tbb::task_arena arena(1);
    server::Snapshot snap;
    server::take_snapshot(s.segment(), arena, snap);
    server::write_checkpoint(snap, dir / "fresh.safetensors");
    Worker w(WorkerOptions{.segment = name, .rank = 1});
    std::vector<float> g(128, 0.25f);
    w.push("w", g);
    std::vector<std::uint64_t> ids{1, 5, 5, 31};
    std::vector<float> rows(16, -1.0f);
    w.push_rows("emb", ids, rows);
    w.clock();
    s.apply_round();
    server::take_snapshot(s.segment(), arena, snap);
    server::write_checkpoint(snap, dir / "pushed.safetensors");
  }
  fuzz::remove_segment(name);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("SHMPS_FUZZ_MAKE_SEEDS")) {
    make_seeds(dir);
    std::exit(0);
  }
  fuzz::quiet_log();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string name = fuzz::unique_segment("ckpt");
  static const std::filesystem::path path = fuzz::scratch_dir("checkpoint_restore") / "input.safetensors";
  std::vector<std::uint8_t> bytes(data, data + size);
  fix_checksum(bytes);
  fuzz::write_file(path, bytes.data(), bytes.size());
  fuzz::remove_segment(name);
  server::ServerOptions options = options_for(name);
  options.restore = path;
  {
    std::optional<server::Server> s;
    s.emplace(std::move(options));
    try {
      s->start();
    } catch (const shmps::Error& e) {
      SHMPS_FUZZ_CHECK(e.what()[0] != '\0');
      s.reset();
      fuzz::remove_segment(name);
      return 0;
    }
    // Restored: the values are the file's, bit for bit, and a round runs on them.
    const server::Snapshot snap = server::read_checkpoint(path);
    const shm::Segment& seg = s->segment();
    for (std::uint32_t i = 0; i < snap.params.size(); ++i) {
      const shm::ParamEntry& p = seg.param(i);
      SHMPS_FUZZ_CHECK(snap.params[i].values.size() == p.size);
      const float* v = seg.values(p);
      SHMPS_FUZZ_CHECK(std::memcmp(v, snap.params[i].values.data(), p.size * sizeof(float)) == 0);
    }
    s->apply_round();
  }
  fuzz::remove_segment(name);
  return 0;
}
