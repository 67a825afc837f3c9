// shmps-bench-mpi: run by `shmps-bench --only mpi` under `mpirun -np 2`. Both ranks measure, in
// one run and on the communication thread the servers use (server/src/mpi_comm.hpp):
//
//   pingpong   MPI's own point-to-point bandwidth: rank 0 sends a message of N bytes, rank 1 sends
//              it back (MPI_Send/MPI_Recv), N = 64 KiB, 1 MiB, 4 MiB; bytes one way per second;
//              the same buffer each time (cache-hot), and 1 MiB messages taken in turn from 64 MiB
//   sync       the sync protocol's traffic through the MPI transport (sync_mpi_transport.cpp):
//              rank 0 sends a delta of every slice of a 64 MiB model (rounds of them), rank 1 adds
//              each (values += delta) and answers with the slice's values, rank 0 takes each
//              answer; delta bytes per second, with slices of 64 KiB (15 per 1 MiB batch) and of
//              1 MiB (a message each)
//
// Prints "figure NAME VALUE UNIT WHAT" lines on rank 0 (shmps-bench adds them to its report).
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/shm/futex.hpp>
#include <shmps/shm/ring.hpp>

#include "mpi_comm.hpp"
#include "sync_transport.hpp"

namespace {

using shmps::server::MpiComm;
using shmps::shm::PushRecord;
using shmps::shm::RecordKind;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Bytes one way per second of a ping-pong of `bytes`-byte messages, each from the next `bytes` of
// a buffer of `span` bytes (span = bytes: the same, cache-hot message every time; a span as big as
// the model: messages from memory, as the sync's are).
double pingpong(MpiComm& comm, std::size_t bytes, std::size_t span, double budget_s) {
  std::vector<char> memory(std::max(span, bytes), 1);
  std::size_t next = 0;
  char* buffer_at = memory.data();
  double result = 0;
  comm.run([&] {
    const int me = comm.rank(), peer = 1 - me;
    const auto once = [&] {
      buffer_at = memory.data() + next;
      next = (next + bytes) % (memory.size() - bytes + 1);
      if (me == 0) {
        MPI_Send(buffer_at, static_cast<int>(bytes), MPI_BYTE, peer, 7, MPI_COMM_WORLD);
        MPI_Recv(buffer_at, static_cast<int>(bytes), MPI_BYTE, peer, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      } else {
        MPI_Recv(buffer_at, static_cast<int>(bytes), MPI_BYTE, peer, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        MPI_Send(buffer_at, static_cast<int>(bytes), MPI_BYTE, peer, 7, MPI_COMM_WORLD);
      }
    };
    for (int i = 0; i < 5; ++i) once();  // warm-up (connections, registration)
    // Rank 0 decides how many round trips fit the budget, and tells rank 1.
    int iterations = 0;
    if (me == 0) {
      const auto t0 = Clock::now();
      int n = 0;
      while (seconds_since(t0) < budget_s / 4) {
        MPI_Send(&n, 1, MPI_INT, peer, 8, MPI_COMM_WORLD);
        once();
        ++n;
      }
      const int stop = -1;
      MPI_Send(&stop, 1, MPI_INT, peer, 8, MPI_COMM_WORLD);
      iterations = std::max(3 * n, 10);
    } else {
      for (int n = 0; n >= 0;) {
        MPI_Recv(&n, 1, MPI_INT, peer, 8, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        if (n >= 0) once();
      }
    }
    MPI_Bcast(&iterations, 1, MPI_INT, 0, MPI_COMM_WORLD);
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = Clock::now();
    for (int i = 0; i < iterations; ++i) once();
    result = 2.0 * static_cast<double>(bytes) * iterations / seconds_since(t0);
  });
  return result;
}

// Nothing to do: sleep until the communication thread says something arrived (as a server does,
// on its futex word), at most 200 us (room to send may have come instead).
void idle(std::atomic<std::uint32_t>& wake) {
  shmps::shm::futex_wait(wake, wake.load(std::memory_order_acquire), std::chrono::microseconds(200));
}

// Delta bytes per second of `rounds` sync rounds of a model of `slices` slices of `floats` each.
double sync_throughput(MpiComm& comm, std::uint64_t floats, std::uint64_t slices, int rounds) {
  std::atomic<std::uint32_t> wake{0};
  auto transport = shmps::server::make_mpi_sync_transport(comm, "bench", 1, wake, shmps::server::mpi_sync_budget(floats));
  std::vector<float> values(floats * slices, 1.0f), delta(floats, 0.5f);
  comm.allgather(0);  // both ready
  const std::uint64_t total = slices * static_cast<std::uint64_t>(rounds);
  const auto t0 = Clock::now();
  if (comm.rank() == 0) {
    std::uint64_t sent = 0, answered = 0;
    const auto take_answers = [&] {
      return transport->receive([&](std::uint32_t, const PushRecord& r) {
        std::memcpy(values.data() + r.offset * floats, shmps::shm::record_payload(&r), floats * sizeof(float));
        ++answered;
        return true;
      });
    };
    while (answered < total) {
      bool did = false;
      while (sent < total) {
        float* payload = transport->try_claim(1, RecordKind::sync_delta, sent % slices, sent + 1, floats, 0);
        if (payload == nullptr) break;
        std::memcpy(payload, delta.data(), floats * sizeof(float));
        transport->commit(1, RecordKind::sync_delta);
        ++sent;
        did = true;
      }
      transport->flush();
      if (take_answers() == 0 && !did) idle(wake);
    }
  } else {
    std::uint64_t added = 0;
    while (added < total) {
      const std::uint64_t handled = transport->receive([&](std::uint32_t from, const PushRecord& r) {
        float* answer = transport->try_claim(from, RecordKind::sync_fresh, r.offset, r.seq, floats, 1);
        if (answer == nullptr) return false;
        float* v = values.data() + r.offset * floats;
        const float* d = shmps::shm::record_payload(&r);
        for (std::uint64_t k = 0; k < floats; ++k) v[k] += d[k];
        std::memcpy(answer, v, floats * sizeof(float));
        transport->commit(from, RecordKind::sync_fresh);
        ++added;
        return true;
      });
      transport->flush();
      if (handled == 0) idle(wake);
    }
  }
  const double elapsed = seconds_since(t0);
  comm.allgather(0);  // both done (rank 1's last answers are on their way; rank 0 has them all)
  return static_cast<double>(total * floats * sizeof(float)) / elapsed;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  try {
    MpiComm comm;
    if (comm.size() != 2) throw shmps::Error("shmps-bench-mpi runs with exactly 2 ranks (mpirun -np 2)");
    const double budget = quick ? 0.1 : 1.0;
    const auto figure = [&](const std::string& name, double value, const char* unit, const std::string& what) {
      if (comm.rank() == 0) std::printf("figure %s %.6g %s %s\n", name.c_str(), value, unit, what.c_str());
    };
    double pp_1mib = 0, pp_1mib_model = 0;
    constexpr std::size_t kModel = std::size_t{64} << 20;
    for (const std::size_t kib : {64UL, 1024UL, 4096UL}) {
      const double bw = pingpong(comm, kib << 10, kib << 10, budget);
      if (kib == 1024) pp_1mib = bw;
      figure("mpi.pingpong." + std::to_string(kib) + "KiB", bw / 1e9, "GB/s",
             "MPI_Send/MPI_Recv ping-pong of " + std::to_string(kib) + " KiB messages, the same buffer every time "
             "(cache-hot), bytes one way per second");
    }
    pp_1mib_model = pingpong(comm, 1 << 20, kModel, budget);
    figure("mpi.pingpong.1024KiB.from_64MiB", pp_1mib_model / 1e9, "GB/s",
           "the same with 1 MiB messages taken in turn from 64 MiB (from memory, as a sync round's)");
    const int rounds = quick ? 2 : 8;
    const double small = sync_throughput(comm, 16384, 1024, rounds);  // 64 KiB slices, 64 MiB model
    figure("mpi.sync.64KiB_slices", small / 1e9, "GB/s",
           "delta bytes per second through the MPI sync transport (rank 1 adds each and answers), 64 KiB slices "
           "batched into 1 MiB messages, 64 MiB per round");
    figure("mpi.sync.64KiB_slices.vs_pingpong_1MiB", small / pp_1mib, "x", "/ mpi.pingpong.1024KiB");
    figure("mpi.sync.64KiB_slices.vs_pingpong_1MiB_from_64MiB", small / pp_1mib_model, "x",
           "/ mpi.pingpong.1024KiB.from_64MiB");
    const double big = sync_throughput(comm, 262144, 64, rounds);  // 1 MiB slices
    figure("mpi.sync.1MiB_slices", big / 1e9, "GB/s", "the same with 1 MiB slices, one message each");
    figure("mpi.sync.1MiB_slices.vs_pingpong_1MiB", big / pp_1mib, "x", "/ mpi.pingpong.1024KiB");
    figure("mpi.sync.1MiB_slices.vs_pingpong_1MiB_from_64MiB", big / pp_1mib_model, "x",
           "/ mpi.pingpong.1024KiB.from_64MiB");
    std::fflush(stdout);
    return 0;
  } catch (const shmps::Error& e) {
    std::fprintf(stderr, "shmps-bench-mpi: error: %s\n", e.what());
    std::fflush(stderr);
    std::_Exit(1);
  }
}
