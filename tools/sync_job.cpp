#include "sync_job.hpp"

#include <shmps/error.hpp>
#include <shmps/shm/mailbox.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/segment.hpp>

#include "status.hpp"

namespace shmps::tools {

std::uint32_t server_groups_of(const std::string& job) {
  const std::string first = shm::replica_name(job, 0);
  if (shm::segment_name_problem(first).empty() && shm::Segment::exists(first))
    return shm::Segment::open(first, shm::Access::read_only).header().server_groups;
  return 0;
}

std::string sync_job(const std::string& job, std::uint32_t groups, std::chrono::seconds limit,
                     const std::function<void()>& while_waiting) {
  for (int pass = 0; pass < 2; ++pass) {
    for (std::uint32_t g = 0; g < groups; ++g) {
      const std::string name = shm::replica_name(job, g);
      const auto alive = [&name, &while_waiting] {
        if (while_waiting) while_waiting();
        bool a = false;
        holder(shm::server_lock_path(name), 0, a);
        return a;
      };
      if (!alive())
        throw Error("the server of server group " + std::to_string(g) + " (segment '" + name +
                    "') is not alive: start it again (it resumes from its replica), then sync");
      shm::Segment seg = shm::Segment::open(name, shm::Access::read_write);
      const shm::mailbox::Answer a = shm::mailbox::ask(seg.header(), name, "sync", limit, alive);
      if (a.status != 0) throw Error("server group " + std::to_string(g) + " refused to sync: " + a.reply);
    }
  }
  return "synced the " + std::to_string(groups) + " server groups of '" + job + "': every replica holds the same values";
}

}  // namespace shmps::tools
