#include "numa_binding.hpp"

#include <numa.h>
#include <sched.h>

#include <cstdlib>
#include <sstream>

#include <shmps/error.hpp>

namespace shmps::tools {

namespace {

// "0-3,6" -> {0, 1, 2, 3, 6}
std::vector<int> parse_cpu_list(const std::string& text, const std::string& whole) {
  std::vector<int> cpus;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');) {
    const auto dash = part.find('-');
    try {
      std::size_t used = 0;
      const int lo = std::stoi(part.substr(0, dash), &used);
      if (used != part.substr(0, dash).size()) throw std::invalid_argument(part);
      int hi = lo;
      if (dash != std::string::npos) {
        hi = std::stoi(part.substr(dash + 1), &used);
        if (used != part.substr(dash + 1).size()) throw std::invalid_argument(part);
      }
      if (lo < 0 || hi < lo || hi >= CPU_SETSIZE) throw std::invalid_argument(part);
      for (int c = lo; c <= hi; ++c) cpus.push_back(c);
    } catch (const std::exception&) {
      throw Error("SHMPS_NUMA_TOPOLOGY='" + whole + "': '" + part + "' is not a CPU or a range of CPUs (e.g. 0-3,6)");
    }
  }
  return cpus;
}

std::string cpu_list_text(const std::vector<int>& cpus) {
  std::ostringstream out;
  for (std::size_t i = 0; i < cpus.size();) {
    std::size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    out << (i ? "," : "") << cpus[i];
    if (j > i) out << "-" << cpus[j];
    i = j + 1;
  }
  return out.str();
}

}  // namespace

std::vector<NumaNode> parse_numa_topology(const std::string& text) {
  std::vector<NumaNode> nodes;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ';');) {
    if (item.empty()) continue;
    const auto colon = item.find(':');
    if (colon == std::string::npos)
      throw Error("SHMPS_NUMA_TOPOLOGY='" + text + "': '" + item + "' is not NODE:CPUS (e.g. 0:0-3;1:4-7)");
    NumaNode node;
    try {
      node.id = std::stoi(item.substr(0, colon));
    } catch (const std::exception&) {
      throw Error("SHMPS_NUMA_TOPOLOGY='" + text + "': '" + item.substr(0, colon) + "' is not a node number");
    }
    node.cpus = parse_cpu_list(item.substr(colon + 1), text);
    node.real = false;
    if (node.cpus.empty()) throw Error("SHMPS_NUMA_TOPOLOGY='" + text + "': node " + std::to_string(node.id) + " has no CPUs");
    nodes.push_back(std::move(node));
  }
  return nodes;
}

std::vector<NumaNode> numa_nodes() {
  if (const char* fake = std::getenv("SHMPS_NUMA_TOPOLOGY"); fake != nullptr && *fake != '\0') return parse_numa_topology(fake);
  std::vector<NumaNode> nodes;
  if (numa_available() < 0) return nodes;
  struct bitmask* cpus = numa_allocate_cpumask();
  for (int n = 0; n <= numa_max_node(); ++n) {
    if (!numa_bitmask_isbitset(numa_nodes_ptr, static_cast<unsigned>(n))) continue;
    if (numa_node_to_cpus(n, cpus) != 0) continue;
    NumaNode node;
    node.id = n;
    for (unsigned c = 0; c < cpus->size; ++c)
      if (numa_bitmask_isbitset(cpus, c)) node.cpus.push_back(static_cast<int>(c));
    if (!node.cpus.empty()) nodes.push_back(std::move(node));  // a memory-only node runs nobody
  }
  numa_free_cpumask(cpus);
  return nodes;
}

std::vector<int> plan_numa_binding(const std::vector<NumaNode>& nodes, std::uint32_t groups) {
  std::vector<int> plan;
  if (nodes.size() < 2) return plan;
  for (std::uint32_t g = 0; g < groups; ++g) plan.push_back(static_cast<int>(g % nodes.size()));
  return plan;
}

bool bind_to_node(const NumaNode& node) noexcept {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : node.cpus) CPU_SET(c, &set);
  bool ok = sched_setaffinity(0, sizeof(set), &set) == 0;
  if (node.real && numa_available() >= 0) numa_set_preferred(node.id);  // memory policy survives exec
  return ok;
}

std::string describe(const NumaNode& node) {
  return "node " + std::to_string(node.id) + " (cpus " + cpu_list_text(node.cpus) + ")";
}

}  // namespace shmps::tools
