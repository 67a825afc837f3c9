// Segment names and the files that belong to a segment.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace shmps::shm {

// Where segments and their lock files live (Boost.Interprocess's POSIX shared memory on Linux).
inline constexpr std::string_view kShmDir = "/dev/shm";
inline constexpr std::string_view kShmPrefix = "shmps.";

// "" if `name` is a valid segment name, else a message saying what is wrong and what to do.
// Valid: 1..63 characters from [A-Za-z0-9._-], not starting with '.' or '-', not ending in
// ".lock" (lock files) or ".sync" (sync segments).
std::string segment_name_problem(std::string_view name);
// Throws shmps::Error with the message above if the name is invalid.
void check_segment_name(std::string_view name);

std::string shm_object_name(std::string_view name);  // "shmps.<name>" (Boost's name)
std::string segment_path(std::string_view name);     // "/dev/shm/shmps.<name>"
std::string server_lock_path(std::string_view name); // "/dev/shm/shmps.<name>.server.lock"
std::string slots_lock_path(std::string_view name);  // "/dev/shm/shmps.<name>.slots.lock"

// Server groups: the replica segment of group g of job `job` ("<job>.g<g>"), and its sync
// segment ("<job>.g<g>.sync", the object /dev/shm/shmps.<job>.g<g>.sync; sync_segment.hpp).
std::string replica_name(std::string_view job, std::uint32_t group);
std::string sync_segment_name(std::string_view job, std::uint32_t group);
// Server groups on several hosts (shmps-server --mpi): the replica of MPI rank `rank` on its host,
// <job>.h<rank> (so that several ranks can share one machine, each with its own).
std::string host_replica_name(std::string_view job, std::uint32_t rank);

}  // namespace shmps::shm
