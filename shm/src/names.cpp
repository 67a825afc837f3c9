#include "shmps/shm/names.hpp"

#include <shmps/error.hpp>

namespace shmps::shm {

std::string segment_name_problem(std::string_view name) {
  if (name.empty()) return "the segment name is empty: give a name such as 'mlp'";
  if (name.size() >= 64)
    return "segment name '" + std::string(name) + "' is too long (" + std::to_string(name.size()) +
           " characters): use at most 63";
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-';
    if (!ok) {
      std::string shown = c == '/' ? "'/'" : (c >= 32 && c < 127 ? std::string("'") + c + "'" : "a control or non-ASCII character");
      return "segment name '" + std::string(name) + "' contains " + shown +
             ": use only letters, digits, '.', '_' and '-' (a segment is one file in /dev/shm, not a path)";
    }
  }
  if (name.front() == '.' || name.front() == '-')
    return "segment name '" + std::string(name) + "' starts with '" + name.front() + "': start it with a letter or digit";
  if (name.size() >= 5 && name.substr(name.size() - 5) == ".lock")
    return "segment name '" + std::string(name) + "' ends in '.lock', which shmps keeps for its lock files: choose another name";
  if (name.size() >= 5 && name.substr(name.size() - 5) == ".sync")
    return "segment name '" + std::string(name) + "' ends in '.sync', which shmps keeps for the sync segments of server "
           "groups: choose another name";
  return {};
}

void check_segment_name(std::string_view name) {
  if (auto problem = segment_name_problem(name); !problem.empty()) throw Error(problem);
}

std::string shm_object_name(std::string_view name) { return std::string(kShmPrefix) + std::string(name); }
std::string segment_path(std::string_view name) { return std::string(kShmDir) + "/" + shm_object_name(name); }
std::string server_lock_path(std::string_view name) { return segment_path(name) + ".server.lock"; }
std::string slots_lock_path(std::string_view name) { return segment_path(name) + ".slots.lock"; }

std::string replica_name(std::string_view job, std::uint32_t group) { return std::string(job) + ".g" + std::to_string(group); }
std::string host_replica_name(std::string_view job, std::uint32_t rank) {
  return std::string(job) + ".h" + std::to_string(rank);
}
std::string sync_segment_name(std::string_view job, std::uint32_t group) { return replica_name(job, group) + ".sync"; }

}  // namespace shmps::shm
