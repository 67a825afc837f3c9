// SyncTransport over shared memory (sync_transport.hpp): the rings of the groups' sync segments.
#include <spdlog/spdlog.h>

#include <chrono>
#include <optional>
#include <vector>

#include <shmps/shm/ring.hpp>
#include <shmps/shm/sync_segment.hpp>

#include "sync_transport.hpp"

namespace shmps::server {

using namespace shmps::shm;

namespace {

class ShmSyncTransport final : public SyncTransport {
 public:
  ShmSyncTransport(const std::string& job, std::uint32_t group, std::uint32_t groups, std::uint64_t ring_bytes,
                   unsigned mode)
      : job_(job), group_(group), groups_(groups),
        own_(SyncSegment::create_or_reuse(job, group, groups, ring_bytes, mode)), producers_(groups),
        peers_(groups), consumers_(groups) {
    for (std::uint32_t d = 0; d < groups; ++d)
      if (d != group) producers_[d] = RingProducer(&own_.ring(d), own_.ring_data(d));
    connect();
  }

  float* try_claim(std::uint32_t to, RecordKind kind, std::uint64_t slice, std::uint64_t seq,
                   std::uint64_t count) override {
    if (to >= groups_ || to == group_) return nullptr;
    PushRecord* record = producers_[to].try_claim(count);
    if (record == nullptr) return nullptr;
    record->kind = kind;
    record->param = 0;
    record->offset = slice;
    record->count = count;
    record->seq = seq;
    record->generation = group_;
    record->clock = 0;
    record->grad_sq_norm = 0;
    return record_payload(record);
  }

  void commit(std::uint32_t to) override { producers_[to].commit(); }

  std::uint64_t receive(const Handler& handler) override {
    connect();
    std::uint64_t handled = 0;
    for (std::uint32_t from = 0; from < groups_; ++from) {
      if (!peers_[from]) continue;
      RingConsumer& ring = consumers_[from];
      const auto result = ring.read([&](std::uint64_t, const PushRecord& record) {
        if (record.kind == RecordKind::padding) return true;
        if (!handler(from, record)) return false;
        ++handled;
        return true;
      });
      if (result.malformed) {
        // Only a server writes there: a malformed record is a bug. Skip what is committed, so
        // that one bad record does not stop the sync for good.
        spdlog::error("event=sync_record_malformed segment={} from_group={} position={} reason=\"a record of group {}'s "
                      "sync segment is not well formed; the rest of what it committed is skipped\"",
                      own_.name(), from, result.stopped_at, from);
        ring.release_to(ring.committed());
      } else {
        ring.release_to(result.stopped_at);
      }
    }
    return handled;
  }

  bool waiting() override {
    for (std::uint32_t from = 0; from < groups_; ++from)
      if (peers_[from] && consumers_[from].committed() != consumers_[from].head()) return true;
    return false;
  }

 private:
  // Maps the sync segments of the groups whose servers have made theirs ready (at most every
  // 50 ms: a group whose server has not started yet is looked for again later).
  void connect() {
    const auto now = std::chrono::steady_clock::now();
    if (now < next_connect_) return;
    next_connect_ = now + std::chrono::milliseconds(50);
    for (std::uint32_t j = 0; j < groups_; ++j) {
      if (j == group_ || peers_[j]) continue;
      peers_[j] = SyncSegment::open_peer(job_, j, groups_);
      if (peers_[j]) {
        consumers_[j] = RingConsumer::for_sync(&peers_[j]->ring(group_), peers_[j]->ring_data(group_));
        spdlog::info("event=sync_connected segment={} peer_group={}", own_.name(), j);
      }
    }
  }

  std::string job_;
  std::uint32_t group_, groups_;
  SyncSegment own_;
  std::vector<RingProducer> producers_;
  std::vector<std::optional<SyncSegment>> peers_;
  std::vector<RingConsumer> consumers_;
  std::chrono::steady_clock::time_point next_connect_{};
};

}  // namespace

std::unique_ptr<SyncTransport> make_shm_sync_transport(const std::string& job, std::uint32_t group, std::uint32_t groups,
                                                       std::uint64_t ring_bytes, unsigned mode) {
  return std::make_unique<ShmSyncTransport>(job, group, groups, ring_bytes, mode);
}

}  // namespace shmps::server
