#include "ctl_mpi.hpp"

#include <mpi.h>

#include <array>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <optional>
#include <thread>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/checkpoint_manifest.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/mailbox.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/proc.hpp>
#include <shmps/shm/segment.hpp>

#include "status.hpp"

namespace shmps::tools {

namespace {

// MPI for the length of one command. Every rank runs the same steps; after each, all() tells every
// rank whether every rank succeeded, so that none waits for one that gave up.
class MpiSession {
 public:
  MpiSession() {
    MPI_Init(nullptr, nullptr);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    std::array<char, MPI_MAX_PROCESSOR_NAME> name{};
    int length = 0;
    MPI_Get_processor_name(name.data(), &length);
    host_.assign(name.data(), static_cast<std::size_t>(length));
  }
  ~MpiSession() { MPI_Finalize(); }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  std::uint32_t rank() const { return static_cast<std::uint32_t>(rank_); }
  std::uint32_t size() const { return static_cast<std::uint32_t>(size_); }
  const std::string& host() const { return host_; }

  // Runs `step` here; says what went wrong on this rank; true if it went right on every rank.
  bool all(const std::string& what, const std::function<void()>& step) {
    int ok = 1;
    try {
      step();
    } catch (const std::exception& e) {  // shmps::Error, and std::filesystem's
      std::cerr << "shmps-ctl[" << host_ << "/r" << rank_ << "]: " << what << ": " << e.what() << "\n";
      ok = 0;
    }
    int every = 0;
    MPI_Allreduce(&ok, &every, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return every == 1;
  }

  std::vector<std::uint64_t> allgather(std::uint64_t value) const {
    std::vector<std::uint64_t> all(size());
    MPI_Allgather(&value, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD);
    return all;
  }
  // Fixed-width strings (at most `width` bytes each).
  std::vector<std::string> allgather(const std::string& value, std::size_t width) const {
    std::vector<char> mine(width, '\0'), all(width * size());
    value.copy(mine.data(), std::min(width - 1, value.size()));
    MPI_Allgather(mine.data(), static_cast<int>(width), MPI_CHAR, all.data(), static_cast<int>(width), MPI_CHAR,
                  MPI_COMM_WORLD);
    std::vector<std::string> out;
    for (std::uint32_t k = 0; k < size(); ++k) out.emplace_back(all.data() + k * width);
    return out;
  }

 private:
  int rank_ = 0, size_ = 1;
  std::string host_;
};

bool ready(const std::string& replica) {
  try {
    const shm::Segment seg = shm::Segment::open(replica, shm::Access::read_only);
    return shm::load_acquire(seg.header().state) == static_cast<std::uint32_t>(shm::SegmentState::ready);
  } catch (const Error&) {
    return false;
  }
}

// The request answered by this rank's server; throws with the server's reply if refused.
std::string ask(const std::string& replica, const std::string& request, std::optional<std::chrono::seconds> limit) {
  const auto alive = [&replica] {
    bool a = false;
    holder(shm::server_lock_path(replica), 0, a);
    return a;
  };
  // A server just (re)started may still be making its replica ready: wait for it a little.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!(shm::Segment::exists(replica) && alive() && ready(replica)) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (!shm::Segment::exists(replica))
    throw Error("no replica '" + replica + "' on this host: is the job running here, with as many ranks as this?");
  if (!alive())
    throw Error("the server of '" + replica + "' is not alive: start the job's servers again (they resume from "
                "their replicas), then retry");
  shm::Segment seg = shm::Segment::open(replica, shm::Access::read_write);
  const shm::mailbox::Answer a = shm::mailbox::ask(seg.header(), replica, request, limit, alive);
  if (a.status != 0) throw Error("'" + request + "' refused: " + a.reply);
  return a.reply;
}

// Two passes of a full sync round on every rank at once, with a barrier between: after the
// first every delta is at its home, after the second every replica holds the homes' values.
bool sync_passes(MpiSession& mpi, const std::string& replica) {
  for (int pass = 1; pass <= 2; ++pass)
    if (!mpi.all("sync pass " + std::to_string(pass), [&] { ask(replica, "sync", std::chrono::seconds(120)); }))
      return false;
  return true;
}

}  // namespace

int mpi_sync(const std::string& job) {
  MpiSession mpi;
  if (!sync_passes(mpi, shm::host_replica_name(job, mpi.rank()))) return 1;
  if (mpi.rank() == 0)
    std::cout << "synced the " << mpi.size() << " ranks' replicas of '" << job << "': every replica holds the same values\n";
  return 0;
}

int mpi_checkpoint(const std::string& job, const std::string& dir_text) {
  namespace fs = std::filesystem;
  MpiSession mpi;
  const std::string replica = shm::host_replica_name(job, mpi.rank());
  const fs::path dir = fs::absolute(dir_text).lexically_normal();  // the server has its own cwd
  // Each checkpoint's parts have names of their own (rank 0's clock), so that a checkpoint that
  // fails half-way leaves the previous one whole: its parts are removed only once the new
  // manifest is written.
  const std::uint64_t stamp = mpi.allgather(shm::unix_ns())[0];
  const fs::path part = dir / server::part_file_name(job, mpi.rank(), stamp);
  if (!mpi.all("the checkpoint directory", [&] {
        std::error_code ec;
        fs::create_directories(dir, ec);
        if (!fs::is_directory(dir)) throw Error(dir.string() + ": not a directory and cannot be created");
      }))
    return 1;
  if (!sync_passes(mpi, replica)) return 1;
  // One consistent cut: no group adds or takes a delta from the first part's snapshot to the last
  // one's (the ten-minute lease ends the pause should this command die).
  // The server refuses a part unless paused, and fails it if the pause ended before it was durable.
  const bool paused = mpi.all("pausing the sync", [&] { ask(replica, "sync_pause=600000", std::chrono::seconds(30)); });
  const bool written =
      paused && mpi.all("writing this host's part", [&] { ask(replica, "checkpoint_part=" + part.string(), std::nullopt); });
  try {
    ask(replica, "sync_resume", std::chrono::seconds(30));
  } catch (const Error& e) {
    std::cerr << "shmps-ctl[" << mpi.host() << "/r" << mpi.rank() << "]: resuming the sync: " << e.what()
              << " (it resumes by itself within ten minutes)\n";
  }
  if (!written) return 1;
  server::Manifest manifest;
  std::uint64_t bytes = 0;
  std::string hash;
  const bool hashed = mpi.all("hashing this host's part", [&] {
    bytes = fs::file_size(part);
    hash = server::file_xxh3(part);
  });
  if (!hashed) return 1;
  const auto sizes = mpi.allgather(bytes);
  const auto hashes = mpi.allgather(hash, 17);
  const auto hosts = mpi.allgather(mpi.host(), MPI_MAX_PROCESSOR_NAME + 1);
  manifest.job = job;
  manifest.ranks = mpi.size();
  manifest.taken_unix_ns = stamp;
  for (std::uint32_t k = 0; k < mpi.size(); ++k)
    manifest.parts.push_back({k, hosts[k], server::part_file_name(job, k, stamp), sizes[k], hashes[k]});
  std::optional<server::Manifest> previous;
  try {
    previous = server::read_manifest(dir);
  } catch (const Error&) {  // none, or not readable: nothing to remove afterwards
  }
  if (!mpi.all("writing the manifest", [&] { server::write_manifest(dir, manifest); })) return 1;
  if (previous && previous->job == job && mpi.rank() < previous->parts.size() &&
      previous->parts[mpi.rank()].file != manifest.parts[mpi.rank()].file) {
    std::error_code ec;  // the previous checkpoint's part, now replaced
    fs::remove(dir / previous->parts[mpi.rank()].file, ec);
  }
  if (mpi.rank() == 0)
    std::cout << "checkpoint of '" << job << "' on " << mpi.size() << " ranks: " << (dir / server::kManifestFile).string()
              << " names " << mpi.size() << " parts (" << manifest.parts[0].file << " ...), each written on "
              << "its host; restore with shmps-launch --mpi --restore " << dir.string() << "\n";
  return 0;
}

int mpi_destroy(const std::string& job, const std::function<void(const std::string&)>& destroy_one) {
  MpiSession mpi;
  const std::string replica = shm::host_replica_name(job, mpi.rank());
  return mpi.all("removing " + replica, [&] { destroy_one(replica); }) ? 0 : 1;
}

}  // namespace shmps::tools
