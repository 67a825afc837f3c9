// How the servers of one job's server groups exchange sync records: one small interface, so that
// the transport (shared memory on one host, MPI between hosts) changes without touching the
// protocol (sync_engine.hpp) or its exactly-once tables.
//
// A record is a shm::PushRecord of kind sync_delta (a slice's delta, to its home group) or
// sync_fresh (the home's values, back): `offset` is the slice, `count` its elements, `seq` the
// sync sequence number, `generation` the sending group, `clock` (answers) the home's version
// word of the slice. Deltas and answers travel on separate channels, so that answers never wait
// behind deltas (a receiver always takes its answers, which needs no room anywhere; a home that
// has no room to answer waits for that, and cannot deadlock with another home). Per pair of
// groups and channel records arrive in the order they were committed, each whole; a record stays until the receiver has handled it
// (a receiver killed mid-way is handed it again: handling must be idempotent, and is).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <shmps/shm/layout.hpp>

namespace shmps::server {

class SyncTransport {
 public:
  virtual ~SyncTransport() = default;

  // Room for a record of `kind` and `count` floats to group `to`: its payload, to be filled, or
  // nullptr if there is no room now: try again later. The record is invisible until
  // commit(to, kind). `version`: an answer's home version word (0 for a delta).
  virtual float* try_claim(std::uint32_t to, shm::RecordKind kind, std::uint64_t slice, std::uint64_t seq,
                           std::uint64_t count, std::uint64_t version) = 0;
  virtual void commit(std::uint32_t to, shm::RecordKind kind) = 0;
  // Committed records may wait to be batched with the next ones (MPI): send them now. Called at
  // the end of each of the engine's turns.
  virtual void flush() {}

  // Calls handler(from, record) for the records received from every other group, in order per
  // group. The handler returns false to stop at a record (it is handed again next time). Records
  // handled are then given back. Returns how many were handled.
  using Handler = std::function<bool(std::uint32_t from, const shm::PushRecord& record)>;
  virtual std::uint64_t receive(const Handler& handler) = 0;

  // Whether records from some group wait to be received (to keep the server from sleeping).
  virtual bool waiting() = 0;
};

// Between the servers of one host: each group's sync segment (shm/sync_segment.hpp) holds two
// rings to every other group; group `group` produces into its own and consumes its rings in the
// others'. `spec_hash`: the replica's, which every peer's must equal. `fresh`: the replica was
// made just now, so its sync segment is made anew too.
std::unique_ptr<SyncTransport> make_shm_sync_transport(const std::string& job, std::uint32_t group, std::uint32_t groups,
                                                       std::uint64_t ring_bytes, std::uint64_t spec_hash, bool fresh,
                                                       unsigned mode);

class MpiComm;

// Between hosts: group K is MPI rank K of `comm` (mpi_comm.hpp), records travel in batches.
// `name` (for messages) and `spec_hash` (which every rank's must equal: checked at once, a
// collective): this replica's. `wake_word`: the futex word of this replica's server, woken when
// records arrive. `budget_bytes`: per peer and channel, what may wait to be sent (and, received,
// to be handled) before try_claim says there is no room.
// What may wait per peer and channel between hosts: at least 16 MiB (16 batches in flight keep a
// link busy), and 8 records of the largest slice.
constexpr std::uint64_t mpi_sync_budget(std::uint64_t slice_floats) {
  return std::max<std::uint64_t>(std::uint64_t{16} << 20, 8 * shm::record_bytes_for(slice_floats));
}
std::unique_ptr<SyncTransport> make_mpi_sync_transport(MpiComm& comm, const std::string& name, std::uint64_t spec_hash,
                                                       std::atomic<std::uint32_t>& wake_word,
                                                       std::uint64_t budget_bytes);

}  // namespace shmps::server
