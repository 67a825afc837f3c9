// How the servers of one job's server groups exchange sync records: one small interface, so that
// another transport (MPI between hosts) can replace shared memory without touching the protocol
// (sync_engine.hpp) or its exactly-once tables.
//
// A record is a shm::PushRecord of kind sync_delta (a slice's delta, to its home group) or
// sync_fresh (the home's values, back): `offset` is the slice, `count` its elements, `seq` the
// sync sequence number, `generation` the sending group. Per pair of groups records arrive in
// the order they were committed, each whole; a record stays until the receiver has handled it
// (a receiver killed mid-way is handed it again: handling must be idempotent, and is).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <shmps/shm/layout.hpp>

namespace shmps::server {

class SyncTransport {
 public:
  virtual ~SyncTransport() = default;

  // Room for a record of `count` floats to group `to`: its payload, to be filled, or nullptr if
  // there is no room now (or `to`'s server has never been up): try again later. The record is
  // invisible until commit(to).
  virtual float* try_claim(std::uint32_t to, shm::RecordKind kind, std::uint64_t slice, std::uint64_t seq,
                           std::uint64_t count) = 0;
  virtual void commit(std::uint32_t to) = 0;

  // Calls handler(from, record) for the records received from every other group, in order per
  // group. The handler returns false to stop at a record (it is handed again next time). Records
  // handled are then given back. Returns how many were handled.
  using Handler = std::function<bool(std::uint32_t from, const shm::PushRecord& record)>;
  virtual std::uint64_t receive(const Handler& handler) = 0;

  // Whether records from some group wait to be received (to keep the server from sleeping).
  virtual bool waiting() = 0;
};

// Between the servers of one host: each group's sync segment (shm/sync_segment.hpp) holds a ring
// to every other group; group `group` produces into its own and consumes its ring in the others'.
std::unique_ptr<SyncTransport> make_shm_sync_transport(const std::string& job, std::uint32_t group, std::uint32_t groups,
                                                       std::uint64_t ring_bytes, unsigned mode);

}  // namespace shmps::server
