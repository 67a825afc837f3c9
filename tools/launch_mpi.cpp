#include "launch_mpi.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include <shmps/error.hpp>
#include <shmps/shm/names.hpp>

#include "launcher.hpp"

namespace shmps::tools {

namespace {

using namespace std::chrono_literals;

// A server that could not finalise MPI in time (server/src/mpi_comm.cpp) leaves with this code.
constexpr int kLeftWithoutFinalize = 3;

// mpirun with the job's placement: one rank per host, or `ranks` on this machine.
std::vector<std::string> mpirun(const MpiJob& job) {
  std::vector<std::string> a{"mpirun"};
  if (geteuid() == 0) a.push_back("--allow-run-as-root");  // Open MPI refuses root unless told
  if (!job.hosts.empty()) {
    std::string list;
    for (const auto& h : job.hosts) list += (list.empty() ? "" : ",") + h;
    a.insert(a.end(), {"--host", list, "-np", std::to_string(job.hosts.size())});
  } else if (!job.hostfile.empty()) {
    a.insert(a.end(), {"--hostfile", job.hostfile, "--map-by", "ppr:1:node"});
    if (job.ranks > 0) a.insert(a.end(), {"-np", std::to_string(job.ranks)});
  } else {
    a.insert(a.end(), {"-np", std::to_string(job.ranks), "--oversubscribe"});
  }
  // A server's apply and communication threads and a host's workers share the host's cores as the
  // kernel sees fit (Open MPI would pin each rank to one core).
  a.insert(a.end(), {"--bind-to", "none"});
  if (!job.python_path.empty()) a.insert(a.end(), {"-x", "PYTHONPATH=" + job.python_path});
  return a;
}

std::vector<std::string> operator+(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::string text(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) out += (out.empty() ? "" : " ") + a;
  return out;
}

// Runs a short mpirun command (a shmps-ctl --mpi) to its end, with the job's output going on.
bool run_ctl(Launcher& launcher, const MpiJob& job, const std::vector<std::string>& ctl_args,
             std::chrono::seconds limit) {
  Child& c = launcher.spawn("", mpirun(job) + std::vector<std::string>{resolve("shmps-ctl")} + ctl_args, {});
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (launcher.running(c)) {
    launcher.pump(100ms);
    if (launcher.interrupted() || std::chrono::steady_clock::now() > deadline) {
      launcher.signal(c, SIGTERM);
      launcher.wait(c, 10s);
      std::cerr << "shmps-launch: shmps-ctl " << ctl_args[0]
                << (launcher.interrupted() ? " interrupted" : " did not finish in time") << "\n";
      return false;
    }
  }
  if (!succeeded(*c.status)) std::cerr << "shmps-launch: shmps-ctl " << ctl_args[0] << " " << describe(*c.status) << "\n";
  return succeeded(*c.status);
}

}  // namespace

int run_mpi_job(const MpiJob& job) {
  namespace fs = std::filesystem;
  Launcher launcher;
  std::vector<std::string> server_cmd = mpirun(job) + std::vector<std::string>{resolve("shmps-server"), "--mpi",
                                                                               "--spec", fs::absolute(job.spec_path),
                                                                               "--name", job.name} +
                                        job.server_args;
  const std::vector<std::string> first_start =
      job.restore.empty() ? server_cmd : server_cmd + std::vector<std::string>{"--restore", fs::absolute(job.restore)};
  const std::string where = !job.hosts.empty()      ? "on hosts " + text(job.hosts)
                            : !job.hostfile.empty() ? "on the hosts of " + job.hostfile
                                                    : std::to_string(job.ranks) + " ranks on this machine";
  std::cout << "shmps-launch: job '" << job.name << "' " << where << ": servers through mpirun (" << text(first_start)
            << "), " << job.workers_per_host << " worker" << (job.workers_per_host == 1 ? "" : "s") << " per host"
            << std::endl;
  Child* servers = &launcher.spawn("", first_start, {});
  // Two mpiruns started at the same moment can race to create Open MPI's session directory
  // (/tmp/ompi.<host>.<uid>, removed again when the last job on the host ends), and the loser
  // fails in orte_init with "mkdir ... File exists". So the workers' mpirun starts once the
  // servers' one is up: a first line from its ranks (their session directories exist by then),
  // its end, or 30 s.
  bool servers_spoke = false;
  servers->on_line = [&](const std::string&) { servers_spoke = true; };
  for (const auto until = std::chrono::steady_clock::now() + 30s;
       !servers_spoke && launcher.running(*servers) && !launcher.interrupted() && std::chrono::steady_clock::now() < until;)
    launcher.pump(50ms);
  servers->on_line = nullptr;
  std::vector<std::string> agent_cmd =
      mpirun(job) + std::vector<std::string>{resolve("shmps-launch"), "--mpi-agent", "--name", job.name, "--workers",
                                             std::to_string(job.workers_per_host), "--max-restarts",
                                             std::to_string(job.max_restarts), "--"} +
      job.program;
  Child* agents = &launcher.spawn("", agent_cmd, {});
  // Each host agent says once when its replica is ready ("... ready; rank K of S"). A restore is
  // done once every rank's is: a restart from then on resumes from the replicas. A servers' job
  // that ends before that (a part refused, replicas of an earlier run in the way, a rank that
  // died mid-restore) is not restarted: a restart would resume from whatever replicas exist.
  int ready_ranks = 0, rank_count = 0;
  agents->on_line = [&](const std::string& line) {
    const auto at = line.find(" ready; rank ");
    int k = 0, of = 0;
    if (at != std::string::npos && std::sscanf(line.c_str() + at, " ready; rank %d of %d", &k, &of) == 2) {
      ++ready_ranks;
      rank_count = of;
    }
  };
  const auto every_rank_ready = [&] { return rank_count > 0 && ready_ranks >= rank_count; };

  bool failed = false;
  int server_restarts = 0;
  constexpr int kMaxServerRestarts = 10;
  const auto stop = [&](Child& c, std::chrono::seconds grace) {
    launcher.signal(c, SIGTERM);
    return launcher.wait(c, grace);
  };
  while (launcher.running(*agents)) {
    launcher.pump(200ms);
    if (launcher.interrupted()) break;
    if (launcher.running(*servers)) continue;
    if (!job.restore.empty() && !every_rank_ready()) {
      std::cerr << "shmps-launch: the servers' mpirun " << describe(*servers->status) << " before every rank's "
                << "replica was restored from " << job.restore << " (see above: a part refused, replicas of an "
                << "earlier run in the way, or a rank that died restoring); nothing is restarted. Remove every "
                << "replica (mpirun ... shmps-ctl destroy --mpi " << job.name << ") and restore again\n";
      failed = true;
      stop(*agents, 30s);
      break;
    }
    if (server_restarts < kMaxServerRestarts) {
      // Open MPI ended every server when one died: start them all again; each resumes from its
      // replica, and the workers wait for them.
      ++server_restarts;
      std::cout << "shmps-launch: the servers' mpirun " << describe(*servers->status)
                << "; starting every rank's server again (restart " << server_restarts << " of " << kMaxServerRestarts
                << ")" << std::endl;
      servers = &launcher.spawn("", server_cmd, {});
    } else {
      std::cerr << "shmps-launch: the servers' mpirun " << describe(*servers->status) << " and has used its "
                << kMaxServerRestarts << " restarts; stopping the job\n";
      failed = true;
      stop(*agents, 30s);
    }
  }
  if (launcher.interrupted()) {
    // Workers first: each agent stops its workers; then the servers, which keep their replicas.
    if (launcher.running(*agents)) stop(*agents, 30s);
    if (launcher.running(*servers)) stop(*servers, 60s);
    return 128 + launcher.interrupted();
  }
  if (!failed && !succeeded(*agents->status)) {
    std::cerr << "shmps-launch: the workers' mpirun " << describe(*agents->status) << " (a worker failed for good; "
              << "its messages are above)\n";
    failed = true;
  }
  if (!failed) {
    if (!launcher.running(*servers)) {
      std::cout << "shmps-launch: the servers' mpirun " << describe(*servers->status)
                << "; starting them again for the final sync" << std::endl;
      servers = &launcher.spawn("", server_cmd, {});
    }
    // The final sync waits for every rank's server to be ready (shmps-ctl retries while a replica
    // is being recovered).
    failed = !run_ctl(launcher, job, {"sync", "--mpi", job.name}, 300s);
  }
  if (!failed && !job.after.empty()) {
    Child& post = launcher.spawn("after", {"/bin/sh", "-c", job.after},
                                 {{"SHMPS_SEGMENT", shm::host_replica_name(job.name, 0)},
                                  {"PATH", self_dir() + ":" + (getenv("PATH") ? getenv("PATH") : "")}});
    while (launcher.running(post)) {
      launcher.pump(200ms);
      if (launcher.interrupted()) stop(post, 10s);
    }
    if (!succeeded(*post.status)) {
      std::cerr << "shmps-launch: the --after command " << describe(*post.status) << "\n";
      failed = true;
    }
  }
  if (launcher.running(*servers)) {
    // mpirun exits with code 1 whenever it is told to stop (it forwards SIGTERM to every rank, and
    // each server stops gracefully, keeping its replica): only a kill says something went wrong.
    const int status = stop(*servers, 60s);
    if (WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) == kLeftWithoutFinalize))
      std::cerr << "shmps-launch: the servers' mpirun " << describe(status) << " when stopped\n";
  }
  if (!job.keep && !failed && !run_ctl(launcher, job, {"destroy", "--mpi", job.name}, 60s)) {
    std::cerr << "shmps-launch: the replicas were not all removed (see above): shmps-ctl destroy --mpi " << job.name
              << " under mpirun removes them\n";
    failed = true;
  }
  if (launcher.interrupted()) return 128 + launcher.interrupted();
  if (failed) return 1;
  std::cout << "shmps-launch: job finished" << (job.keep ? "; replicas kept" : "; replicas removed") << std::endl;
  return 0;
}

int run_host_agent(const std::string& name, int workers, int max_restarts, const std::vector<std::string>& program,
                   const std::string& python_path) {
  const char* rank_env = std::getenv("OMPI_COMM_WORLD_RANK");
  const char* size_env = std::getenv("OMPI_COMM_WORLD_SIZE");
  if (rank_env == nullptr || size_env == nullptr)
    throw Error("--mpi-agent is started by shmps-launch --mpi through mpirun (OMPI_COMM_WORLD_RANK is not set)");
  const int rank = std::atoi(rank_env), size = std::atoi(size_env);
  char host_buf[256] = {};
  gethostname(host_buf, sizeof host_buf - 1);
  const std::string host = host_buf;
  const std::string replica = shm::host_replica_name(name, static_cast<std::uint32_t>(rank));
  const std::string where = host + "/r" + std::to_string(rank);
  Launcher launcher;
  // The server of this host may still be creating or recovering its replica.
  const auto deadline = std::chrono::steady_clock::now() + 120s;
  while (!segment_ready(replica) || !server_alive(replica)) {
    launcher.pump(50ms);
    if (launcher.interrupted()) return 128 + launcher.interrupted();
    if (std::chrono::steady_clock::now() > deadline)
      throw Error("[" + where + "] replica '" + replica + "' was not ready within 120 s: see the servers' messages");
  }
  std::cout << "[" << where << "] replica " << replica << " ready; rank " << rank << " of " << size << ", starting "
            << workers << " worker" << (workers == 1 ? "" : "s") << std::endl;
  const auto start = [&](int i) {
    const int global = i * size + rank;  // as with server groups on one host: rank r in group r mod S
    std::vector<std::pair<std::string, std::string>> env{
        {"SHMPS_SEGMENT", replica},
        {"SHMPS_RANK", std::to_string(i)},
        {"SHMPS_WORLD_SIZE", std::to_string(workers * size)},
        {"SHMPS_GLOBAL_RANK", std::to_string(global)},
        {"SHMPS_SERVER_GROUP", std::to_string(rank)},
        {"SHMPS_GROUP_SIZE", std::to_string(workers)}};
    if (!python_path.empty()) env.emplace_back("PYTHONPATH", python_path);
    return &launcher.spawn(where + " w" + std::to_string(global), program, env);
  };
  std::vector<Child*> children;
  std::vector<int> restarts(static_cast<std::size_t>(workers), 0);
  for (int i = 0; i < workers; ++i) children.push_back(start(i));
  bool failed = false, any_running = true;
  while (any_running) {
    launcher.pump(200ms);
    if (launcher.interrupted()) {
      for (Child* c : children) launcher.signal(*c, SIGTERM);
      for (Child* c : children) launcher.wait(*c, 10s);
      return 128 + launcher.interrupted();
    }
    any_running = false;
    for (std::size_t i = 0; i < children.size(); ++i) {
      Child* c = children[i];
      if (launcher.running(*c)) {
        any_running = true;
      } else if (!succeeded(*c->status) && !c->reported) {
        c->reported = true;
        if (restarts[i] < max_restarts && !failed) {
          ++restarts[i];
          std::cout << "[" << where << "] worker " << c->label << " " << describe(*c->status)
                    << "; restarting it with the same rank (restart " << restarts[i] << " of " << max_restarts << ")"
                    << std::endl;
          children[i] = start(static_cast<int>(i));
          any_running = true;
        } else {
          std::cerr << "[" << where << "] worker " << c->label << " " << describe(*c->status)
                    << "; stopping this host's workers\n";
          failed = true;
          for (Child* other : children) launcher.signal(*other, SIGTERM);
        }
      }
    }
  }
  return failed ? 1 : 0;
}

}  // namespace shmps::tools
