#include "run_common.hpp"

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace shmps::trainer {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

void print_training_figures(const TrainStats& st) {
  std::printf("trained %" PRIu64 " batches, %" PRIu64 " samples in %.2f s: %.0f samples/s\n", st.batches,
              st.samples, st.seconds, st.seconds > 0 ? static_cast<double>(st.samples) / st.seconds : 0.0);
  if (st.last_epoch_samples > 0) {
    std::printf("running train loss %.4f acc %.4f (this worker's last epoch, %" PRIu64 " samples)\n",
                st.last_epoch_loss, st.last_epoch_acc, st.last_epoch_samples);
  }
}

namespace {

// The resume state's bytes.
struct Cursor {
  std::uint64_t magic = 0x3152534e5255434dULL;  // the bytes "MCURNSR1", little-endian
  std::uint64_t samples = 0, batch = 0, workers = 0, rank = 0;
  std::uint64_t batches_done = 0;
};

}  // namespace

std::uint64_t world_size_from_env() {
  const char* s = std::getenv("SHMPS_WORLD_SIZE");
  if (s == nullptr || *s == '\0') return 1;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s, &end, 10);
  if (*end != '\0' || v == 0) {
    throw shmps::Error(std::string("SHMPS_WORLD_SIZE='") + s +
                       "' is not a positive integer; unset it or pass --workers");
  }
  return static_cast<std::uint64_t>(v);
}

std::vector<std::byte> cursor_bytes(const shmps::data::Schedule& sched, std::uint64_t batches_done) {
  const Cursor c{.samples = sched.samples, .batch = sched.batch, .workers = sched.workers, .rank = sched.rank,
                 .batches_done = batches_done};
  std::vector<std::byte> out(sizeof c);
  std::memcpy(out.data(), &c, sizeof c);
  return out;
}

std::uint64_t resume_cursor(const shmps::Worker& w, const shmps::data::Schedule& sched) {
  const std::vector<std::byte> state = w.load_state();
  if (state.empty()) return 0;
  Cursor c;
  if (state.size() != sizeof c) throw shmps::Error("the resume state of slot " + std::to_string(w.rank()) + " is not shmps-worker's");
  std::memcpy(&c, state.data(), sizeof c);
  if (c.magic != Cursor{}.magic) throw shmps::Error("the resume state of slot " + std::to_string(w.rank()) + " is not shmps-worker's");
  if (c.samples != sched.samples || c.batch != sched.batch || c.workers != sched.workers || c.rank != sched.rank)
    throw shmps::Error("slot " + std::to_string(w.rank()) + " was training another schedule (--samples " +
                       std::to_string(c.samples) + " --batch " + std::to_string(c.batch) + " --workers " +
                       std::to_string(c.workers) + "); run with the same options, or use a new segment");
  return c.batches_done;
}

std::uint64_t join_job(shmps::Worker& w, shmps::data::Schedule& sched, int rank, std::uint64_t workers,
                       const std::string& consistency) {
  sched.workers = workers > 0 ? workers : world_size_from_env();
  if (w.rank() < 0 || static_cast<std::uint64_t>(w.rank()) >= sched.workers) {
    throw shmps::Error("worker slot " + std::to_string(w.rank()) + " is not below the number of workers " +
                       std::to_string(sched.workers) + "; pass --workers (or set SHMPS_WORLD_SIZE)");
  }
  sched.rank = static_cast<std::uint64_t>(w.rank());
  // Server groups (shmps-launch --server-groups): the slot is the rank within the worker's
  // group's replica; the data shard follows the rank in the whole job.
  if (const char* global = std::getenv("SHMPS_GLOBAL_RANK"); global != nullptr && *global != '\0' && rank < 0) {
    char* end = nullptr;
    const unsigned long long g = std::strtoull(global, &end, 10);
    if (*end != '\0' || g >= sched.workers)
      throw shmps::Error(std::string("SHMPS_GLOBAL_RANK='") + global + "' is not a rank below the number of workers " +
                         std::to_string(sched.workers));
    sched.rank = g;
  }
  if (!consistency.empty() && consistency != w.consistency())
    throw shmps::Error("--consistency " + consistency + " asked, but the job runs " + w.consistency() +
                       " (set it on the server: shmps-server --consistency, or shmps-ctl set " + w.segment() +
                       " consistency=" + consistency + ")");
  std::printf("segment %s (%s), worker %" PRIu64 "/%" PRIu64 ": %" PRIu64 " samples, batch %" PRIu64 ", %" PRIu64
              " epoch(s), %" PRIu64 " batches\n",
              w.segment().c_str(), w.consistency().c_str(), sched.rank, sched.workers, sched.samples, sched.batch,
              sched.epochs(), sched.worker_total_batches());
  std::fflush(stdout);

  // Resume: the data cursor the slot's previous process committed with its last step.
  const std::uint64_t start_batch = resume_cursor(w, sched);
  if (start_batch > 0) {
    std::printf("resuming: generation %" PRIu64 " of slot %d continues at batch %" PRIu64 " of %" PRIu64
                " (%" PRIu64 " pushes committed before)\n",
                w.generation(), w.rank(), start_batch + 1, sched.worker_total_batches(), w.published());
    std::fflush(stdout);
  }

  // BSP from the start: every worker in step 0, however late its process starts (else the first
  // one up could finish step 0 alone, and runs would differ). A restarted worker joins at once.
  if (w.consistency() == "bsp" && start_batch == 0 && w.current_clock() == 0) {
    // With server groups (shmps-launch --server-groups) the step is its group's: the barrier
    // waits for the workers of this worker's replica.
    std::uint64_t joining = sched.workers;
    if (const char* group = std::getenv("SHMPS_GROUP_SIZE"); group != nullptr && *group != '\0')
      joining = std::min<std::uint64_t>(sched.workers, std::strtoull(group, nullptr, 10));
    std::printf("waiting for all %" PRIu64 " workers to join step 0\n", joining);
    std::fflush(stdout);
    w.wait_for_workers(joining, std::chrono::minutes(2));
  }
  return start_batch;
}

}  // namespace shmps::trainer
