// shmps-launch --mpi: a job whose server groups are on several hosts (docs/several-hosts.md).
//
// Two mpirun jobs with the same placement, one rank per host:
//   servers   shmps-server --mpi: rank K serves its host's replica <name>.h<K> and syncs with the
//             others over MPI (one communication thread each)
//   agents    shmps-launch --mpi-agent: rank K waits for its host's replica to be ready, then
//             starts that host's workers, restarts those that die (--max-restarts), and prefixes
//             their output with host, rank and worker
// Open MPI ends the whole servers job when one of its ranks dies; the launcher then starts it
// again (each server resumes from its replica, and the exactly-once tables make sure no delta is
// lost or added twice), while the workers wait for their server as they always do. When the
// workers are done it syncs every replica (`shmps-ctl sync --mpi` under mpirun), runs --after,
// stops the servers and, unless --keep, removes the replicas (`shmps-ctl destroy --mpi`).
#pragma once

#include <string>
#include <vector>

namespace shmps::tools {

struct MpiJob {
  std::string spec_path, name;
  int workers_per_host = 2;
  // Where: --hosts a,b,c (one rank each), --hostfile F (one rank per host in it), or neither:
  // `ranks` ranks on this machine (each with its own replica, as if on its own host).
  std::vector<std::string> hosts;
  std::string hostfile;
  int ranks = 0;
  std::vector<std::string> server_args;  // passed on to every shmps-server
  std::string restore;                   // a multi-host checkpoint's directory (first start only)
  bool keep = false;
  int max_restarts = 0;
  std::string after;
  std::vector<std::string> program;  // each worker's command line
  std::string python_path;
};

int run_mpi_job(const MpiJob& job);

// shmps-launch --mpi-agent (started by run_mpi_job through mpirun): this host's workers.
int run_host_agent(const std::string& name, int workers, int max_restarts, const std::vector<std::string>& program,
                   const std::string& python_path);

}  // namespace shmps::tools
