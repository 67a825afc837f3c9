// Recovery: making an existing segment whole again when a server starts on it. The previous
// server may have been killed at any instruction: a slice half copied in (its redo entry still
// valid, its version word odd) is copied in again; an odd version word without a redo entry is
// damage, repaired to even and reported. The rings need nothing: a record is consumed only once
// its ring's head moves past it, after its apply, and the exactly-once table skips what a
// predecessor applied before it died.
#pragma once

#include <cstdint>

#include <shmps/server/options.hpp>
#include <shmps/shm/segment.hpp>

namespace shmps::server {

// Checks that `segment` holds the model of `options.spec` (its layout hash `spec_hash`, and an
// explicit ring size), then replays valid redo entries and repairs odd version words. Throws
// shmps::Error, with what to do, for a segment of another model; changes nothing then.
void recover_segment(shm::Segment& segment, const ServerOptions& options, std::uint64_t spec_hash);

}  // namespace shmps::server
