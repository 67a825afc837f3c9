// Binding server groups to NUMA nodes (tools/numa_binding.hpp), on a fake topology: this machine
// has one node, so the plan and the binding are checked against topologies given in text.
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <shmps/error.hpp>

#include "numa_binding.hpp"

using shmps::tools::NumaNode;
using shmps::tools::parse_numa_topology;
using shmps::tools::plan_numa_binding;

TEST(NumaBinding, ATopologyIsReadFromItsText) {
  const auto nodes = parse_numa_topology("0:0-3,8;1:4-7");
  ASSERT_EQ(nodes.size(), 2u);
  EXPECT_EQ(nodes[0].id, 0);
  EXPECT_EQ(nodes[0].cpus, (std::vector<int>{0, 1, 2, 3, 8}));
  EXPECT_EQ(nodes[1].cpus, (std::vector<int>{4, 5, 6, 7}));
  EXPECT_FALSE(nodes[0].real);
  EXPECT_EQ(shmps::tools::describe(nodes[0]), "node 0 (cpus 0-3,8)");
}

TEST(NumaBinding, AMalformedTopologyIsRefusedSayingWhy) {
  const auto message = [](const std::string& text) {
    try {
      parse_numa_topology(text);
    } catch (const shmps::Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(message("0-3").find("is not NODE:CPUS"), std::string::npos) << message("0-3");
  EXPECT_NE(message("x:0").find("is not a node number"), std::string::npos);
  EXPECT_NE(message("0:3-1").find("is not a CPU or a range of CPUs"), std::string::npos);
  EXPECT_NE(message("0:a").find("is not a CPU or a range of CPUs"), std::string::npos);
}

TEST(NumaBinding, GroupsGoRoundRobinOverTwoOrMoreNodesAndNowhereOnOne) {
  const auto two = parse_numa_topology("0:0-3;1:4-7");
  EXPECT_EQ(plan_numa_binding(two, 3), (std::vector<int>{0, 1, 0}));
  EXPECT_EQ(plan_numa_binding(parse_numa_topology("0:0;1:1;2:2;3:3"), 2), (std::vector<int>{0, 1}));
  EXPECT_TRUE(plan_numa_binding(parse_numa_topology("0:0-7"), 4).empty()) << "one node: nothing to bind";
  EXPECT_TRUE(plan_numa_binding({}, 4).empty()) << "no NUMA: nothing to bind";
}

// The binding really restricts a process to its node's CPUs (here: CPU 0 of a fake node), and is
// inherited by what it runs next.
TEST(NumaBinding, ABoundChildRunsOnlyOnItsNodesCpus) {
  const NumaNode node = parse_numa_topology("0:0").front();
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (!shmps::tools::bind_to_node(node)) _exit(2);
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) _exit(3);
    _exit(CPU_COUNT(&set) == 1 && CPU_ISSET(0, &set) ? 0 : 4);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "2: refused, 3: no affinity, 4: not only CPU 0";
}

// This machine's own topology, as libnuma reports it (one node here): every node has CPUs.
TEST(NumaBinding, TheMachinesNodesHaveCpus) {
  ::unsetenv("SHMPS_NUMA_TOPOLOGY");
  for (const NumaNode& node : shmps::tools::numa_nodes()) {
    EXPECT_TRUE(node.real);
    EXPECT_FALSE(node.cpus.empty()) << shmps::tools::describe(node);
  }
}
