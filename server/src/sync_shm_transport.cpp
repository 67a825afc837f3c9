// SyncTransport over shared memory (sync_transport.hpp): the rings of the groups' sync segments,
// two per pair of groups and direction: deltas on channel 0, answers on channel 1.
#include <spdlog/spdlog.h>

#include <array>
#include <chrono>
#include <optional>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/shm/ring.hpp>
#include <shmps/shm/sync_segment.hpp>

#include "sync_transport.hpp"

namespace shmps::server {

using namespace shmps::shm;

namespace {

constexpr std::uint32_t channel_of(RecordKind kind) { return kind == RecordKind::sync_fresh ? 1 : 0; }

class ShmSyncTransport final : public SyncTransport {
 public:
  ShmSyncTransport(const std::string& job, std::uint32_t group, std::uint32_t groups, std::uint64_t ring_bytes,
                   std::uint64_t spec_hash, bool fresh, unsigned mode)
      : job_(job), group_(group), groups_(groups), spec_hash_(spec_hash), producers_(groups), peers_(groups),
        consumers_(groups) {
    // A replica made just now starts with empty rings: records left for its previous life are
    // not its own (and its peers notice the new segment, sync_segment.hpp).
    if (fresh) SyncSegment::remove(job, group);
    own_ = SyncSegment::create_or_reuse(job, group, groups, ring_bytes, spec_hash, mode);
    for (std::uint32_t d = 0; d < groups; ++d)
      if (d != group)
        for (std::uint32_t c = 0; c < 2; ++c) producers_[d][c] = RingProducer(&own_.ring(d, c), own_.ring_data(d, c));
    connect();
  }

  float* try_claim(std::uint32_t to, RecordKind kind, std::uint64_t slice, std::uint64_t seq, std::uint64_t count,
                   std::uint64_t version) override {
    if (to >= groups_ || to == group_) return nullptr;
    PushRecord* record = producers_[to][channel_of(kind)].try_claim(count);
    if (record == nullptr) return nullptr;
    record->kind = kind;
    record->param = 0;
    record->offset = slice;
    record->count = count;
    record->seq = seq;
    record->generation = group_;
    record->clock = version;
    record->grad_sq_norm = 0;
    return record_payload(record);
  }

  void commit(std::uint32_t to, RecordKind kind) override { producers_[to][channel_of(kind)].commit(); }

  std::uint64_t receive(const Handler& handler) override {
    connect();
    std::uint64_t handled = 0;
    for (std::uint32_t from = 0; from < groups_; ++from) {
      if (!peers_[from]) continue;
      for (std::uint32_t c : {1U, 0U}) {  // answers first: taking them frees room for the peer's answers to come
        RingConsumer& ring = consumers_[from][c];
        const auto result = ring.read([&](std::uint64_t, const PushRecord& record) {
          if (record.kind == RecordKind::padding) return true;
          if (!handler(from, record)) return false;
          ++handled;
          return true;
        });
        if (result.malformed) {
          // Only a server writes there: a malformed record is a bug. Skip what is committed, so
          // that one bad record does not stop the sync for good.
          spdlog::error("event=sync_record_malformed segment={} from_group={} channel={} position={} reason=\"a record "
                        "of group {}'s sync segment is not well formed; the rest of what it committed is skipped\"",
                        own_.name(), from, c, result.stopped_at, from);
          ring.release_to(ring.committed());
        } else {
          ring.release_to(result.stopped_at);
        }
      }
    }
    return handled;
  }

  bool waiting() override {
    for (std::uint32_t from = 0; from < groups_; ++from)
      if (peers_[from])
        for (std::uint32_t c = 0; c < 2; ++c)
          if (consumers_[from][c].committed() != consumers_[from][c].head()) return true;
    return false;
  }

 private:
  // Maps the sync segments of the groups whose servers have made theirs ready, and maps again
  // one that was replaced (its group's replica was made again): looked at every 50 ms for the
  // missing ones, every second for the others.
  void connect() {
    const auto now = std::chrono::steady_clock::now();
    const bool recheck = now >= next_recheck_;
    if (now < next_connect_ && !recheck) return;
    next_connect_ = now + std::chrono::milliseconds(50);
    if (recheck) next_recheck_ = now + std::chrono::seconds(1);
    for (std::uint32_t j = 0; j < groups_; ++j) {
      if (j == group_ || (peers_[j] && !recheck)) continue;
      std::optional<SyncSegment> found;
      try {
        found = SyncSegment::open_peer(job_, j, groups_, spec_hash_);
      } catch (const Error& e) {
        if (refused_[j]++ % 100 == 0)
          spdlog::error("event=sync_peer_refused segment={} peer_group={} reason=\"{}\"", own_.name(), j, e.what());
        continue;
      }
      if (!found || (peers_[j] && found->header().created_unix_ns == peers_[j]->header().created_unix_ns)) continue;
      spdlog::info("event=sync_connected segment={} peer_group={}{}", own_.name(), j,
                   peers_[j] ? " note=\"its sync segment was made again (its replica was recreated)\"" : "");
      peers_[j] = std::move(found);
      for (std::uint32_t c = 0; c < 2; ++c)
        consumers_[j][c] = RingConsumer::for_sync(&peers_[j]->ring(group_, c), peers_[j]->ring_data(group_, c));
    }
  }

  std::string job_;
  std::uint32_t group_, groups_;
  std::uint64_t spec_hash_;
  SyncSegment own_;
  std::vector<std::array<RingProducer, 2>> producers_;
  std::vector<std::optional<SyncSegment>> peers_;
  std::vector<std::array<RingConsumer, 2>> consumers_;
  std::vector<std::uint64_t> refused_ = std::vector<std::uint64_t>(kMaxServerGroups, 0);
  std::chrono::steady_clock::time_point next_connect_{}, next_recheck_{};
};

}  // namespace

std::unique_ptr<SyncTransport> make_shm_sync_transport(const std::string& job, std::uint32_t group, std::uint32_t groups,
                                                       std::uint64_t ring_bytes, std::uint64_t spec_hash, bool fresh,
                                                       unsigned mode) {
  return std::make_unique<ShmSyncTransport>(job, group, groups, ring_bytes, spec_hash, fresh, mode);
}

}  // namespace shmps::server
