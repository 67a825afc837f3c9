// Server groups (SINGA's HandleSyncRequest / HandleSyncResponse): how the replicas of a job's
// server groups converge, exactly once through the death of any server.
//
// Each slice has a home group (SyncSlice::home). The home's replica holds the slice's true
// values: its workers' pushes and every other group's deltas go there. Another group applies its
// own workers' pushes to its replica at once and, every sync_every, begins a sync round:
//
//   requester g, slice s (not in flight, changed since its last sync):
//     sync_sent[s] = values - sync_base; sent_seq = q   (q: this round's number, header.sync_seq)
//     send sync_delta(s, q, sync_sent[s]) to home(s)
//   home h, on sync_delta(s, q, delta) from g:
//     if sync_applied[s][g] < q: values += delta; sync_applied[s][g] = q   (one redo entry: atomic)
//     answer sync_fresh(s, q, values)                                       (also for a duplicate)
//   requester g, on sync_fresh(s, q, F) with q == sent_seq > synced_seq:
//     values = F + (values - sync_base - sync_sent)    (the home's values plus what g applied since)
//     sync_base = F; synced_seq = q                    (one redo entry: atomic)
//
// Why nothing is lost or applied twice when a server is SIGKILLed anywhere: every write of a
// slice goes in through a redo entry (redo.hpp), together with the table entry that records it;
// the delta in flight stays in sync_sent until its answer is taken, and a restarted requester
// sends every slice in flight again (the home recognises the sequence number and only answers);
// the transport keeps a record until its receiver has handled it, and handling is idempotent. A
// slice's version goes up by one update for each delta added or answer taken.
//
// When: a round begins only when no slice is in flight, so a round's answers all come back
// before the next one. Writes (adding deltas, taking answers) happen between apply rounds; in
// BSP only at the group's step boundary or while no worker is attached, so that a step's values
// stay what its workers view (ARCHITECTURE.md, Pull). A slice this group's workers did not change
// is synced too after kRefreshRounds rounds' time, at least a second (a zero delta, which the home
// does not write): its home's values come back, so a group sees the other groups' updates of every
// slice, not only of those it pushes to.
//
// shmps-ctl sync NAME: a full round (every non-home slice, changed or not) once nothing is in
// flight; done when its answers are back. After a full round of every group in turn, every delta
// is at its home; after a second, every replica holds the homes' values: equal everywhere.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include <shmps/server/model_spec.hpp>
#include <shmps/shm/segment.hpp>

#include "sync_transport.hpp"

namespace shmps::server {

class SyncEngine {
 public:
  SyncEngine(shm::Segment& segment, std::unique_ptr<SyncTransport> transport, SyncEvery every);

  // One turn, between apply rounds: receives (adds other groups' deltas, takes answers) if
  // `may_write`, begins a sync round if one is due, and sends what waits to be sent. Returns
  // whether it did anything.
  bool tick(bool may_write);
  // Receives only (BSP: at a step boundary, before the step's clock is published).
  bool receive();

  // shmps-ctl sync: a full round as soon as nothing is in flight.
  void request_full_sync();
  bool full_sync_open() const noexcept { return full_ != Full::none; }
  // The full round asked for is done: true once, then the request is closed.
  bool take_full_sync_done();

  // A multi-host checkpoint (shmps-ctl checkpoint --mpi): for at most `lease`, or until resume(),
  // this group adds no delta, takes no answer and begins no round, so that the replicas' parts
  // taken meanwhile are one consistent cut (a delta added at its home is in the home's part, and
  // in flight or taken in the requester's part).
  void pause_for(std::chrono::milliseconds lease) { paused_until_ = std::chrono::steady_clock::now() + lease; }
  void resume() { paused_until_ = {}; }
  bool paused() const { return std::chrono::steady_clock::now() < paused_until_; }

  // Records wait to be received, or a full round to begin: no reason to sleep. (Answers still
  // to come are not: the server's sleeps are short, and a dead peer must not make it spin.)
  bool busy() const;
  std::uint64_t in_flight() const noexcept { return in_flight_; }

 private:
  bool handle(std::uint32_t from, const shm::PushRecord& record);
  bool add_delta(std::uint32_t from, const shm::PushRecord& record);
  void take_fresh(const shm::PushRecord& record);
  void copy_in_through_redo(shm::RedoEntry& e, shm::RedoTarget target, std::uint64_t slice, std::uint64_t seq,
                            std::uint32_t origin, std::uint64_t clean_version);
  bool begin_round(bool every_slice);
  bool send_pending();
  bool round_due() const;

  enum class Full { none, waiting, running, done };
  // A slice nobody here changed is still synced after this many rounds' time (at least
  // kMinRefreshMs), to take the home's values.
  static constexpr std::int64_t kRefreshRounds = 8;
  static constexpr std::int64_t kMinRefreshMs = 1000;

  shm::Segment& segment_;
  std::unique_ptr<SyncTransport> transport_;
  SyncEvery every_;
  std::uint32_t group_, groups_;
  std::vector<std::uint64_t> to_send_;  // slices in flight whose delta this process has not sent yet
  std::uint64_t in_flight_ = 0;
  std::chrono::steady_clock::time_point last_round_;
  std::uint64_t records_at_last_round_ = 0;
  Full full_ = Full::none;
  std::uint64_t refresh_after_ns_;
  bool may_write_ = true;  // the last tick could receive: records waiting are work then
  std::uint64_t warned_bad_records_ = 0;
  std::chrono::steady_clock::time_point paused_until_{};
};

}  // namespace shmps::server
