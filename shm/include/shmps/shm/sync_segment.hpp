// The sync segment of a server group (SyncSegmentHeader in layout.hpp): the shared-memory
// transport between the servers of one job's server groups on one host.
//
//   own:   SyncSegment::create_or_reuse(job, k, groups, ...)  server k, holding its replica's lock
//   peer:  SyncSegment::open_peer(job, j)                      server k reads group j's records
//
// Server k produces into the rings for group d of its own sync segment (deltas on channel 0,
// answers on channel 1) and consumes the rings for k of every other group's sync segment. Only
// servers map these segments; workers never do.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <shmps/shm/layout.hpp>

namespace shmps::shm {

class SyncSegment {
 public:
  // The bytes of each ring for a job whose slices hold `slice_floats` elements: room for several
  // whole-slice records (a record may use at most half a ring), at least 4 MiB.
  static std::uint64_t ring_bytes_for(std::uint64_t slice_floats) noexcept;

  // Server group `group`'s own sync segment: an existing one that is ready and laid out the same
  // way is reused (a restarted server finds the records it had committed and its peers' positions
  // in them); anything else there (left half-created) is replaced. Throws shmps::Error.
  static SyncSegment create_or_reuse(std::string_view job, std::uint32_t group, std::uint32_t groups,
                                     std::uint64_t ring_bytes, std::uint64_t spec_hash, unsigned mode);
  // Group `group`'s sync segment, once its server has made it ready; nullopt before that. Throws
  // shmps::Error if what is there is not a sync segment of this build for this model (spec_hash)
  // and group count, or its geometry does not fit its size.
  static std::optional<SyncSegment> open_peer(std::string_view job, std::uint32_t group, std::uint32_t groups,
                                              std::uint64_t spec_hash);
  static void remove(std::string_view job, std::uint32_t group);

  SyncSegment();
  ~SyncSegment();
  SyncSegment(SyncSegment&&) noexcept;
  SyncSegment& operator=(SyncSegment&&) noexcept;

  const std::string& name() const noexcept { return name_; }
  SyncSegmentHeader& header() noexcept { return *reinterpret_cast<SyncSegmentHeader*>(base_); }
  const SyncSegmentHeader& header() const noexcept { return *reinterpret_cast<const SyncSegmentHeader*>(base_); }
  // The ring of records for group `to` on `channel` (0: deltas, 1: answers), and its records.
  RingHeader& ring(std::uint32_t to, std::uint32_t channel) noexcept {
    return *at<RingHeader>(base_, header().rings_offset + (2 * to + channel) * header().ring_stride);
  }
  std::byte* ring_data(std::uint32_t to, std::uint32_t channel) noexcept {
    return reinterpret_cast<std::byte*>(&ring(to, channel) + 1);
  }

 private:
  void map(void* shared_memory_object);  // a boost::interprocess::shared_memory_object (kept out of this header)

  std::string name_;
  std::shared_ptr<void> mapping_;
  std::byte* base_ = nullptr;
  std::uint64_t size_ = 0;
};

}  // namespace shmps::shm
