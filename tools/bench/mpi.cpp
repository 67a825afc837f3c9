// mpi: server groups on several hosts, on this machine. shmps-bench-mpi (mpi_transport.cpp) under
// `mpirun -np 2` measures MPI's own ping-pong bandwidth and the sync transport's throughput in
// one run; then the reference MLP trained by 2 and 3 ranks (train.cpp, run_train_mpi).
#include <unistd.h>

#include <cstdio>
#include <string>

#include <shmps/error.hpp>

#include "workloads.hpp"

namespace shmps::bench {

void run_mpi(const Config& cfg, Report& rep) {
  const std::string command = std::string("mpirun") + (::geteuid() == 0 ? " --allow-run-as-root" : "") +
                              " -np 2 --oversubscribe --bind-to none " + self_dir() + "/shmps-bench-mpi" +
                              (cfg.quick ? " --quick" : "") + " 2>&1";
  FILE* f = popen(command.c_str(), "r");
  if (f == nullptr) throw Error("cannot run " + command);
  std::string output;
  int figures = 0;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, f) != nullptr) {
    output += buf;
    char name[256], unit[32];
    double value = 0;
    int consumed = 0;
    if (std::sscanf(buf, "figure %255s %lf %31s %n", name, &value, unit, &consumed) == 3) {
      std::string what(buf + consumed);
      while (!what.empty() && what.back() == '\n') what.pop_back();
      rep.add(name, value, unit, what);
      ++figures;
    }
  }
  if (pclose(f) != 0 || figures == 0) throw Error("mpi: '" + command + "' failed; its output:\n" + output);
  run_train_mpi(cfg, rep);
}

}  // namespace shmps::bench
