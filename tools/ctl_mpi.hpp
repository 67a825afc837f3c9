// shmps-ctl's commands for a job on several hosts (shmps-launch --mpi; docs/several-hosts.md),
// run by mpirun with one rank per host, placed as the job's servers are: rank K acts on this
// host's replica <job>.h<K>, and the ranks agree through MPI (a barrier between the passes of a
// sync, one consistent cut for a checkpoint, one manifest).
//
//   mpirun ... shmps-ctl sync --mpi NAME             every replica made equal
//   mpirun ... shmps-ctl checkpoint --mpi NAME DIR   DIR/<NAME>.h<K>.safetensors on every host,
//                                                    and DIR/manifest.json naming them all
//   mpirun ... shmps-ctl destroy --mpi NAME          every host's replica removed
#pragma once

#include <functional>
#include <string>

namespace shmps::tools {

int mpi_sync(const std::string& job);
int mpi_checkpoint(const std::string& job, const std::string& dir);
// `destroy_one(name)`: shmps-ctl destroy of one segment (throws shmps::Error if refused).
int mpi_destroy(const std::string& job, const std::function<void(const std::string&)>& destroy_one);

}  // namespace shmps::tools
