// Binding server groups to memory nodes (shmps-launch --server-groups): where the machine has
// several NUMA nodes, each server group's server and workers run on one node's CPUs and
// allocate from its memory, so that a group's workers read a replica in node-local memory.
//
// The topology comes from libnuma; SHMPS_NUMA_TOPOLOGY ("0:0-3;1:4-7", node:cpus pairs) replaces
// it, to try or test the binding on a machine with one node. On one node nothing is bound.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace shmps::tools {

struct NumaNode {
  int id = 0;
  std::vector<int> cpus;
  bool real = true;  // a node of this machine (false: from SHMPS_NUMA_TOPOLOGY, CPUs only)
};

// The nodes that have CPUs: SHMPS_NUMA_TOPOLOGY's if set, else libnuma's (none if libnuma finds
// no NUMA support). Throws shmps::Error for a malformed SHMPS_NUMA_TOPOLOGY.
std::vector<NumaNode> numa_nodes();
// "0:0-3;1:4-7" -> nodes; throws shmps::Error saying what is wrong.
std::vector<NumaNode> parse_numa_topology(const std::string& text);

// The node of each of `groups` server groups: group g on node g mod N (index into `nodes`), when
// there are at least two nodes; empty (bind nothing) otherwise.
std::vector<int> plan_numa_binding(const std::vector<NumaNode>& nodes, std::uint32_t groups);

// In a child between fork and exec (the binding is inherited across exec): run on the node's
// CPUs, and, on a real node, prefer its memory. Async-signal-safe enough for a single-threaded
// parent; returns false if the kernel refused.
bool bind_to_node(const NumaNode& node) noexcept;

// "node 1 (cpus 4-7)"
std::string describe(const NumaNode& node);

}  // namespace shmps::tools
