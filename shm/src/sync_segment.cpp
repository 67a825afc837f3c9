#include "shmps/shm/sync_segment.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <boost/interprocess/exceptions.hpp>
#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <algorithm>
#include <cerrno>
#include <cstring>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/proc.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::shm {

namespace bip = boost::interprocess;

namespace {

struct Mapping {
  bip::shared_memory_object shm;
  bip::mapped_region region;
};

std::uint64_t total_bytes_for(std::uint32_t groups, std::uint64_t ring_bytes) {
  return sizeof(SyncSegmentHeader) + 2 * groups * (sizeof(RingHeader) + ring_bytes);
}

// Whether the header describes a ready sync segment of this build for `groups` groups, produced
// by `origin`, of `size` bytes; "" if so, else what is wrong.
std::string header_problem(const SyncSegmentHeader& h, std::uint64_t size, std::uint32_t origin, std::uint32_t groups,
                           std::uint64_t spec_hash) {
  if (h.magic != kSyncMagic) return "is not a shmps sync segment (bad magic)";
  if (h.layout_version != kLayoutVersion || h.fingerprint != kLayoutFingerprint)
    return "was made by another shmps build (layout version " + std::to_string(h.layout_version) + ")";
  if (h.total_bytes != size || h.total_bytes != total_bytes_for(h.server_groups, h.ring_bytes) ||
      h.rings_offset != sizeof(SyncSegmentHeader) || h.ring_stride != sizeof(RingHeader) + h.ring_bytes)
    return "is damaged (its geometry does not match its size)";
  if (h.origin != origin) return "belongs to server group " + std::to_string(h.origin);
  if (h.server_groups != groups)
    return "is for " + std::to_string(h.server_groups) + " server groups, not " + std::to_string(groups);
  if (h.spec_hash != spec_hash) return "serves another model (its spec differs from this server's)";
  return {};
}

}  // namespace

std::uint64_t SyncSegment::ring_bytes_for(std::uint64_t slice_floats) noexcept {
  return std::max<std::uint64_t>(std::uint64_t{4} << 20, 8 * record_bytes_for(slice_floats));
}

// Maps the whole object read-write; the mapping keeps it (and its handle) alive.
void SyncSegment::map(void* shared_memory_object) {
  auto& shm = *static_cast<bip::shared_memory_object*>(shared_memory_object);
  auto mapping = std::make_shared<Mapping>();
  mapping->region = bip::mapped_region(shm, bip::read_write);
  mapping->shm.swap(shm);
  base_ = static_cast<std::byte*>(mapping->region.get_address());
  size_ = mapping->region.get_size();
  mapping_ = mapping;
}

SyncSegment::SyncSegment() = default;
SyncSegment::~SyncSegment() = default;
SyncSegment::SyncSegment(SyncSegment&&) noexcept = default;
SyncSegment& SyncSegment::operator=(SyncSegment&&) noexcept = default;

void SyncSegment::remove(std::string_view job, std::uint32_t group) {
  bip::shared_memory_object::remove(shm_object_name(sync_segment_name(job, group)).c_str());
}

std::optional<SyncSegment> SyncSegment::open_peer(std::string_view job, std::uint32_t group, std::uint32_t groups,
                                                  std::uint64_t spec_hash) {
  const std::string name = sync_segment_name(job, group);
  SyncSegment s;
  try {
    bip::shared_memory_object shm(bip::open_only, shm_object_name(name).c_str(), bip::read_write);
    bip::offset_t size = 0;
    if (!shm.get_size(size) || static_cast<std::uint64_t>(size) < sizeof(SyncSegmentHeader)) return std::nullopt;
    s.map(&shm);
  } catch (const bip::interprocess_exception& e) {
    if (e.get_error_code() == bip::not_found_error) return std::nullopt;
    throw Error("cannot open the sync segment of server group " + std::to_string(group) + " (" + segment_path(name) +
                "): " + e.what());
  }
  s.name_ = name;
  if (load_acquire(s.header().state) != static_cast<std::uint32_t>(SegmentState::ready)) return std::nullopt;
  if (auto problem = header_problem(s.header(), s.size_, group, groups, spec_hash); !problem.empty())
    throw Error("the sync segment of server group " + std::to_string(group) + " (" + segment_path(name) + ") " + problem +
                ": stop the job's servers and remove it (shmps-ctl destroy removes a job's segments)");
  for (std::uint32_t r = 0; r < 2 * groups; ++r)
    if (at<RingHeader>(s.base_, s.header().rings_offset + r * s.header().ring_stride)->capacity != s.header().ring_bytes)
      throw Error("the sync segment of server group " + std::to_string(group) + " (" + segment_path(name) +
                  ") is damaged (a ring's capacity is not its header's): stop the job's servers and remove it");
  return s;
}

SyncSegment SyncSegment::create_or_reuse(std::string_view job, std::uint32_t group, std::uint32_t groups,
                                         std::uint64_t ring_bytes, std::uint64_t spec_hash, unsigned mode) {
  const std::uint64_t total = total_bytes_for(groups, ring_bytes);
  try {
    if (auto existing = open_peer(job, group, groups, spec_hash)) {
      if (existing->header().ring_bytes == ring_bytes) return std::move(*existing);
    }
  } catch (const Error&) {
    // Not this job's (another model, another build): only this group's server makes it; replaced.
  }
  // Nothing usable there: only this group's server (holding its replica's server lock) makes it.
  remove(job, group);
  const std::string name = sync_segment_name(job, group);
  Segment::check_room(name, total);
  SyncSegment s;
  try {
    bip::permissions perms;
    perms.set_permissions(static_cast<int>(mode));
    bip::shared_memory_object shm(bip::create_only, shm_object_name(name).c_str(), bip::read_write, perms);
    const int fd = shm.get_mapping_handle().handle;
    ::fchmod(fd, static_cast<mode_t>(mode));
    if (::ftruncate(fd, static_cast<off_t>(total)) != 0) throw Error("cannot size it: " + std::string(std::strerror(errno)));
    s.map(&shm);
  } catch (const bip::interprocess_exception& e) {
    throw Error("cannot create the sync segment of server group " + std::to_string(group) + " (" + segment_path(name) +
                "): " + e.what());
  }
  s.name_ = name;
  SyncSegmentHeader& h = s.header();
  h.magic = kSyncMagic;
  h.layout_version = kLayoutVersion;
  h.server_groups = groups;
  h.fingerprint = kLayoutFingerprint;
  h.total_bytes = total;
  h.ring_bytes = ring_bytes;
  h.ring_stride = sizeof(RingHeader) + ring_bytes;
  h.origin = group;
  h.rings_offset = sizeof(SyncSegmentHeader);
  h.created_unix_ns = unix_ns();
  h.spec_hash = spec_hash;
  for (std::uint32_t d = 0; d < groups; ++d)
    for (std::uint32_t c = 0; c < 2; ++c) s.ring(d, c).capacity = ring_bytes;
  store_release(h.state, static_cast<std::uint32_t>(SegmentState::ready));
  return s;
}

}  // namespace shmps::shm
