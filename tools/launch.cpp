// shmps-launch: starts a job on one big box, in the manner of torchrun.
//
//   shmps-launch --spec models/mlp.toml --workers 4 [worker options...] [-- PROGRAM ARGS...]
//
// Starts shmps-server for the spec unless a server for that segment is already alive, waits for
// the segment to be ready, then starts N processes of PROGRAM (default: shmps-worker) with
// SHMPS_SEGMENT, SHMPS_RANK and SHMPS_WORLD_SIZE set, prefixing each output line with the rank.
// When the workers are done the server it started is stopped (it drains its rings) and, unless
// --keep, the segment is removed. Ctrl-C or SIGTERM stops the job where it stands: the workers
// are frozen, the server applies what is whole and writes its last checkpoint, then the workers
// are ended. With --max-restarts K a worker
// that dies is started again with the same rank (it resumes from its slot), at most K times per
// rank; after that the job stops. With --kill-stragglers a worker the server evicted from its BSP
// barrier or SSP bound as a straggler (--straggler-timeout) is SIGKILLed and started again with
// the same rank, where it rejoins. Exits non-zero if any worker failed for good. Options it does
// not know, before `--`, are passed on to the worker program.
//
// With --server-groups S it starts S servers, one per server group, each with its replica
// <name>.g<k>; rank r works with group r mod S (as its slot r / S, with SHMPS_GLOBAL_RANK = r).
// A server that dies is started again (it resumes from its replica). When the workers are done
// it syncs the groups (every replica then holds the same values) before --after and the stop.
#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <thread>

#include <CLI/CLI.hpp>

#include <shmps/error.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/liveness.hpp>
#include <shmps/shm/membership.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/segment.hpp>

#include "launch_mpi.hpp"
#include "launcher.hpp"
#include "numa_binding.hpp"
#include "sync_job.hpp"

using namespace shmps;

using namespace shmps::tools;

int main(int argc, char** argv) {
  CLI::App app{"shmps-launch: start a server (if needed) and N worker processes for one job"};
  std::string spec_path, name, after;
  int workers = 2;
  unsigned server_threads = 0;
  bool keep = false;
  std::vector<std::string> program;
  app.add_option("--spec", spec_path, "model spec (TOML); the server is started from it unless one is running")
      ->check(CLI::ExistingFile);
  app.add_option("--name", name, "segment name (default: the spec's name)");
  auto* workers_option = app.add_option("--workers", workers, "number of worker processes")->check(CLI::Range(1, 1024));
  std::vector<std::string> worker_commands;
  app.add_option("--worker", worker_commands,
                 "one worker's program and arguments, split at spaces; repeat it for a mixed job (rank i runs the "
                 "i-th), e.g. --worker worker/python/examples/train_mlp_torch.py --worker shmps-worker")
      ->excludes(workers_option);
  app.add_option("--server-threads", server_threads, "apply threads of the server it starts");
  std::string consistency, on_worker_death, straggler_timeout;
  app.add_option("--consistency", consistency, "bsp, ssp:N or asp, for the server it starts (default: the spec's)");
  app.add_option("--on-worker-death", on_worker_death, "proceed or wait, for the server it starts");
  app.add_option("--straggler-timeout", straggler_timeout,
                 "BSP: the server it starts evicts a live worker that alone holds its group's barrier this long "
                 "(10s, 500ms; 0 or off: never; default: the spec's straggler_timeout, 10s)");
  bool kill_stragglers = false;
  app.add_flag("--kill-stragglers", kill_stragglers,
               "SIGKILL a worker the server evicted from its BSP barrier or SSP bound as a straggler and start it "
               "again with the same rank, where it rejoins (at most 10 times per rank; not counted in --max-restarts)");
  std::string ring_bytes, max_workers, workers_per_group;
  app.add_option("--workers-per-group", workers_per_group,
                 "workers in each worker group, for the server it starts (default: the spec's; 0 = one group)");
  app.add_option("--ring-bytes", ring_bytes, "bytes of each worker's push ring, for the server it starts (default: the spec's)");
  app.add_option("--max-workers", max_workers, "worker slots, for the server it starts (default: the spec's)");
  std::string checkpoint_dir, checkpoint_every, checkpoint_keep;
  app.add_option("--checkpoint-dir", checkpoint_dir,
                 "the server it starts writes checkpoints here (and restores the newest if there is no segment)");
  app.add_option("--checkpoint-every", checkpoint_every, "30s, 5m or 100clocks: between checkpoints (with --checkpoint-dir)");
  app.add_option("--checkpoint-keep", checkpoint_keep, "checkpoints to keep in --checkpoint-dir (server's --keep; default 3)");
  app.add_flag("--keep", keep, "keep the segment (and its values) when the job ends");
  std::uint32_t server_groups = 1;
  std::string sync_every, restore;
  app.add_option("--server-groups", server_groups,
                 "server groups (SINGA's): S servers, each with its replica <name>.g<k> that syncs slices with the "
                 "others; rank r works with group r mod S (default 1)")
      ->check(CLI::Range(1U, shm::kMaxServerGroups));
  app.add_option("--sync-every", sync_every,
                 "server groups: how often a group sends its updates to the slices' home groups, 100ms or 50updates "
                 "(default: the spec's sync_every)");
  std::string numa = "auto";
  app.add_option("--numa", numa,
                 "server groups: auto binds each group's server and workers to one NUMA node where the machine has "
                 "several (group g on node g mod nodes); off binds nothing (default auto)")
      ->check(CLI::IsMember({"auto", "off"}));
  app.add_option("--restore", restore,
                 "start the server(s) from this checkpoint (every server group from the same file); with --mpi, the "
                 "directory of a checkpoint written by shmps-ctl checkpoint --mpi (each host restores its part)")
      ->check(CLI::ExistingPath);
  int max_restarts = 0;
  bool chaos = false;
  double chaos_after = 1.5;
  app.add_option("--max-restarts", max_restarts,
                 "restart a worker that dies, with the same rank, at most this many times per rank")
      ->check(CLI::Range(0, 1000));
  app.add_flag("--chaos", chaos,
               "demonstrate crash safety: SIGKILL the last worker once, --chaos-after seconds after its first push, "
               "and restart it (implies --max-restarts 1 at least)");
  app.add_option("--chaos-after", chaos_after,
                 "seconds after the last worker's first push (default 1.5): counted from its first push, not from "
                 "its start, so that a worker slow to start (a Python import) has made progress to lose")
      ->check(CLI::PositiveNumber);
  bool mpi = false, mpi_agent = false;
  std::string hosts, hostfile;
  int mpi_ranks = 0;
  app.add_flag("--mpi", mpi,
               "server groups on several hosts, one per host, kept in step over MPI: starts the servers and each "
               "host's --workers through mpirun (see --hosts, --hostfile, --ranks; README, Several hosts)");
  app.add_option("--hosts", hosts, "with --mpi: the hosts, a,b,c (one server and its workers on each)");
  app.add_option("--hostfile", hostfile, "with --mpi: an Open MPI hostfile; one rank per host in it")
      ->check(CLI::ExistingFile);
  app.add_option("--ranks", mpi_ranks,
                 "with --mpi and no hosts: this many ranks on this machine, each with its own replica <name>.h<K> "
                 "as if on its own host (default 2)")
      ->check(CLI::Range(1, static_cast<int>(shm::kMaxServerGroups)));
  app.add_flag("--mpi-agent", mpi_agent, "(internal) started by --mpi through mpirun: this host's workers")->group("");
  app.add_option("--after", after, "a command run once after every worker succeeded, while the server still runs "
                                   "(e.g. \"shmps-worker --evaluate\")");
  app.footer("After --: the worker program and its arguments (default: shmps-worker). Options before -- that "
             "shmps-launch does not know are passed on to the worker program.");
  app.allow_extras();  // unknown options go to the worker program
  // Split at "--" ourselves: CLI11 would take an unknown option's value for a positional.
  int ours = argc;
  for (int i = 1; i < argc; ++i)
    if (std::string_view(argv[i]) == "--") {
      ours = i;
      break;
    }
  for (int i = ours + 1; i < argc; ++i) program.emplace_back(argv[i]);
  CLI11_PARSE(app, ours, argv);

  try {
    if (!worker_commands.empty()) {
      if (!program.empty())
        throw Error("give the workers' programs either with --worker (one each) or after -- (the same for all), not both");
      workers = static_cast<int>(worker_commands.size());
    }
    if (!spec_path.empty()) {
      auto spec = server::load_model_spec(spec_path);
      if (name.empty()) name = spec.name;
      std::uint64_t slots = spec.max_workers;
      if (!max_workers.empty()) {
        char* end = nullptr;
        slots = std::strtoull(max_workers.c_str(), &end, 10);
        if (*end != '\0' || max_workers.empty()) throw Error("--max-workers: not a number: '" + max_workers + "'");
      }
      const std::uint64_t per_group = (static_cast<std::uint64_t>(workers) + server_groups - 1) / server_groups;
      if (per_group > slots)
        throw Error("--workers " + std::to_string(workers) + " is more than the " + std::to_string(slots) +
                    " worker slots of " + (max_workers.empty() ? spec_path : "--max-workers") +
                    (server_groups > 1 ? " in each of the " + std::to_string(server_groups) + " server groups" : "") +
                    ": raise max_workers, or start fewer workers");
    }
    if (name.empty()) throw Error("no segment: give --spec FILE (to start a server) or --name NAME (to join one)");
    shm::check_segment_name(name);
    // Each rank's command line: its --worker, or the program after -- (default shmps-worker); then
    // the options shmps-launch does not know, in their original order.
    if (program.empty()) program.push_back("shmps-worker");
    std::vector<std::vector<std::string>> programs;
    for (int r = 0; r < workers; ++r) {
      std::vector<std::string> argv_r;
      if (worker_commands.empty()) {
        argv_r = program;
      } else {
        std::istringstream words(worker_commands[static_cast<std::size_t>(r)]);
        for (std::string word; words >> word;) argv_r.push_back(word);
        if (argv_r.empty()) throw Error("--worker " + std::to_string(r + 1) + " is empty: give a program");
      }
      argv_r[0] = resolve(argv_r[0]);
      for (const auto& extra : app.remaining()) argv_r.push_back(extra);
      programs.push_back(std::move(argv_r));
    }
    // Python workers import shmps from this build (build/<preset>/python) without installing it.
    std::string python_path = self_dir() + "/../python";
    if (::access(python_path.c_str(), R_OK) != 0) python_path.clear();
    if (const char* outer = std::getenv("PYTHONPATH"); outer && *outer)
      python_path = python_path.empty() ? outer : python_path + ":" + outer;

    if (mpi_agent) return tools::run_host_agent(name, workers, max_restarts, programs[0], python_path);
    if (mpi) {
      if (spec_path.empty()) throw Error("--mpi starts the job's servers: give --spec FILE");
      if (server_groups > 1) throw Error("--mpi makes one server group per host: drop --server-groups");
      if (!worker_commands.empty()) throw Error("--mpi runs the same worker program on every host: give it after --, not with --worker");
      if (!checkpoint_dir.empty() || !checkpoint_every.empty())
        throw Error("--checkpoint-dir with --mpi: a job on several hosts is checkpointed with `mpirun ... shmps-ctl "
                    "checkpoint --mpi " + name + " DIR` (README, Several hosts) and restored with --restore DIR");
      if (kill_stragglers || !straggler_timeout.empty())
        throw Error("--kill-stragglers and --straggler-timeout are for a job on one host; with --mpi, set "
                    "straggler_timeout in the spec");
      if (chaos) throw Error("--chaos is for a job on one host; kill a worker or a server by hand to see --mpi ride through");
      if (!hosts.empty() && !hostfile.empty()) throw Error("give --hosts or --hostfile, not both");
      tools::MpiJob job;
      job.spec_path = spec_path;
      job.name = name;
      job.workers_per_host = workers;
      for (std::size_t at = 0; !hosts.empty() && at != std::string::npos;) {
        const std::size_t comma = hosts.find(',', at);
        job.hosts.push_back(hosts.substr(at, comma == std::string::npos ? comma : comma - at));
        at = comma == std::string::npos ? comma : comma + 1;
      }
      if (!job.hosts.empty() && mpi_ranks != 0 && mpi_ranks != static_cast<int>(job.hosts.size()))
        throw Error("--ranks " + std::to_string(mpi_ranks) + " with " + std::to_string(job.hosts.size()) + " --hosts: one rank per host");
      job.hostfile = hostfile;
      job.ranks = mpi_ranks != 0 ? mpi_ranks : (hostfile.empty() ? 2 : 0);
      if (job.ranks == 1 || job.hosts.size() == 1)
        throw Error("--mpi with one rank has no server groups to keep in step: run the job without --mpi, or give "
                    "two hosts or more");
      job.restore = restore;
      job.keep = keep;
      job.max_restarts = max_restarts;
      job.after = after;
      job.program = programs[0];
      job.python_path = python_path;
      if (!sync_every.empty()) job.server_args.insert(job.server_args.end(), {"--sync-every", sync_every});
      if (server_threads) job.server_args.insert(job.server_args.end(), {"--threads", std::to_string(server_threads)});
      if (!consistency.empty()) job.server_args.insert(job.server_args.end(), {"--consistency", consistency});
      if (!on_worker_death.empty()) job.server_args.insert(job.server_args.end(), {"--on-worker-death", on_worker_death});
      if (!ring_bytes.empty()) job.server_args.insert(job.server_args.end(), {"--ring-bytes", ring_bytes});
      if (!max_workers.empty()) job.server_args.insert(job.server_args.end(), {"--max-workers", max_workers});
      if (!workers_per_group.empty()) job.server_args.insert(job.server_args.end(), {"--workers-per-group", workers_per_group});
      return tools::run_mpi_job(job);
    }

    if (server_groups > 1 && !restore.empty())
      for (std::uint32_t g = 0; g < server_groups; ++g)
        if (shm::Segment::exists(shm::replica_name(name, g)))
          throw Error("--restore: replica " + shm::replica_name(name, g) + " exists, and its state is newer than any "
                      "checkpoint; to go back to " + restore + ", stop the job and remove its replicas (shmps-ctl destroy " +
                      shm::replica_name(name, g) + ", ...), then restore every group");
    if (server_groups > 1 && !checkpoint_dir.empty())
      throw Error("--checkpoint-dir with --server-groups: a job with server groups is checkpointed as one file after a "
                  "sync, with `shmps-ctl checkpoint " + name + " FILE`, and restored with --restore FILE");
    // The segment of server group g: the job's own, or the group's replica.
    const auto segment_of = [&](std::uint32_t g) { return server_groups > 1 ? shm::replica_name(name, g) : name; };
    const auto server_label = [&](std::uint32_t g) { return server_groups > 1 ? "server" + std::to_string(g) : std::string("server"); };
    // Server groups on NUMA nodes: each group's server and workers on one node, where there are several.
    std::vector<tools::NumaNode> nodes;
    std::vector<int> node_of_group;
    if (server_groups > 1 && numa == "auto") {
      nodes = tools::numa_nodes();
      node_of_group = tools::plan_numa_binding(nodes, server_groups);
      if (node_of_group.empty())
        std::cout << "shmps-launch: " << (nodes.empty() ? std::string("no NUMA nodes found (libnuma)") : "one NUMA " + tools::describe(nodes[0]))
                  << ": the server groups are not bound to memory nodes\n";
      for (std::uint32_t g = 0; g < node_of_group.size(); ++g)
        std::cout << "shmps-launch: server group " << g << " and its workers run on NUMA "
                  << tools::describe(nodes[static_cast<std::size_t>(node_of_group[g])]) << "\n";
    }
    const auto node_for = [&](std::uint32_t g) -> const tools::NumaNode* {
      return g < node_of_group.size() ? &nodes[static_cast<std::size_t>(node_of_group[g])] : nullptr;
    };
    Launcher launcher;
    std::vector<Child*> servers(server_groups, nullptr);  // the servers this launcher started
    std::vector<int> server_restarts(server_groups, 0);
    std::vector<std::vector<std::string>> server_args(server_groups);
    const auto start_and_wait = [&](std::uint32_t g) {
      const std::string seg_name = segment_of(g);
      Child* server = &launcher.spawn(server_label(g), server_args[g], {}, node_for(g));
      servers[g] = server;
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      while (!segment_ready(seg_name) || !server_alive(seg_name)) {
        launcher.pump(std::chrono::milliseconds(20));
        if (!launcher.running(*server))
          throw Error("the server " + describe(launcher.wait(*server, std::chrono::milliseconds(0))) +
                      " before the segment was ready (its messages are above)");
        if (launcher.interrupted() || std::chrono::steady_clock::now() > deadline) {
          launcher.signal(*server, SIGTERM);
          launcher.wait(*server, std::chrono::seconds(10));
          throw Error(launcher.interrupted() ? "interrupted while the server was starting"
                                             : "the server did not make segment '" + seg_name + "' ready within 60 s");
        }
      }
    };
    for (std::uint32_t g = 0; g < server_groups; ++g) {
      if (server_alive(segment_of(g))) {
        std::cout << "shmps-launch: joining the running server of segment '" << segment_of(g) << "'\n";
        continue;
      }
      if (spec_path.empty())
        throw Error("no server is running for segment '" + segment_of(g) + "': give --spec FILE so that shmps-launch starts one");
      std::vector<std::string> args{resolve("shmps-server"), "--spec", spec_path, "--name", name};
      if (server_groups > 1)
        args.insert(args.end(), {"--server-groups", std::to_string(server_groups), "--server-group", std::to_string(g)});
      if (!sync_every.empty()) args.insert(args.end(), {"--sync-every", sync_every});
      if (!restore.empty()) args.insert(args.end(), {"--restore", restore});
      if (server_threads) args.insert(args.end(), {"--threads", std::to_string(server_threads)});
      if (!consistency.empty()) args.insert(args.end(), {"--consistency", consistency});
      if (!on_worker_death.empty()) args.insert(args.end(), {"--on-worker-death", on_worker_death});
      if (!straggler_timeout.empty()) args.insert(args.end(), {"--straggler-timeout", straggler_timeout});
      if (!ring_bytes.empty()) args.insert(args.end(), {"--ring-bytes", ring_bytes});
      if (!max_workers.empty()) args.insert(args.end(), {"--max-workers", max_workers});
      if (!workers_per_group.empty()) args.insert(args.end(), {"--workers-per-group", workers_per_group});
      if (!checkpoint_dir.empty()) args.insert(args.end(), {"--checkpoint-dir", checkpoint_dir});
      if (!checkpoint_every.empty()) args.insert(args.end(), {"--checkpoint-every", checkpoint_every});
      if (!checkpoint_keep.empty()) args.insert(args.end(), {"--keep", checkpoint_keep});
      if (!keep) args.push_back("--remove-on-stop");
      server_args[g] = std::move(args);
      start_and_wait(g);
      // A restart resumes from the replica it made (a restore over it would be refused).
      if (const auto at = std::find(server_args[g].begin(), server_args[g].end(), "--restore"); at != server_args[g].end())
        server_args[g].erase(at, at + 2);
    }
    const bool started_servers = servers[0] != nullptr;

    // The segment, mapped read-only before any worker starts: its slot count (a joined job's spec
    // is not read), and for --chaos the victim's published count, which the clock counts from:
    // its first push (a joined job's slot may hold an earlier process's pushes).
    const auto group_of_rank = [&](int r) { return static_cast<std::uint32_t>(r) % server_groups; };
    const auto slot_of_rank = [&](int r) { return static_cast<std::uint32_t>(r) / server_groups; };
    const shm::Segment watched = shm::Segment::open(segment_of(group_of_rank(workers - 1)), shm::Access::read_only);
    if (slot_of_rank(workers - 1) >= watched.header().max_workers)
      throw Error("--workers " + std::to_string(workers) + " is more than the " +
                  std::to_string(watched.header().max_workers) + " worker slots of segment '" + watched.name() +
                  "': start fewer workers, or a job with more slots");
    const auto victim_published = [&] { return shm::load_acquire(watched.slot(slot_of_rank(workers - 1)).published); };
    const std::uint64_t published_at_start = victim_published();
    std::optional<std::chrono::steady_clock::time_point> victim_first_push;

    std::cout << "shmps-launch: segment '" << name << "'"
              << (server_groups > 1 ? " (" + std::to_string(server_groups) + " server groups: " + segment_of(0) + " ...)" : "")
              << " ready; starting " << workers << " worker"
              << (workers == 1 ? "" : "s") << ":";
    for (int r = 0; r < workers; ++r)
      if (r == 0 || programs[static_cast<std::size_t>(r)][0] != programs[static_cast<std::size_t>(r) - 1][0])
        std::cout << (r ? "," : "") << " " << programs[static_cast<std::size_t>(r)][0]
                  << (worker_commands.empty() ? "" : " (w" + std::to_string(r) + ")");
    std::cout << "\n";
    if (chaos) max_restarts = std::max(max_restarts, 1);
    auto start_worker = [&](int r) {
      std::vector<std::pair<std::string, std::string>> env{{"SHMPS_SEGMENT", segment_of(group_of_rank(r))},
                                                           {"SHMPS_RANK", std::to_string(slot_of_rank(r))},
                                                           {"SHMPS_WORLD_SIZE", std::to_string(workers)}};
      if (server_groups > 1) {
        env.emplace_back("SHMPS_GLOBAL_RANK", std::to_string(r));  // the rank in the whole job (data shards)
        env.emplace_back("SHMPS_SERVER_GROUP", std::to_string(group_of_rank(r)));
        // The workers of its group, who share its replica (a BSP start barrier waits for them).
        const std::uint32_t g = group_of_rank(r);
        env.emplace_back("SHMPS_GROUP_SIZE", std::to_string((static_cast<std::uint32_t>(workers) - g + server_groups - 1) / server_groups));
      }
      if (!python_path.empty()) env.emplace_back("PYTHONPATH", python_path);
      return &launcher.spawn("w" + std::to_string(r), programs[static_cast<std::size_t>(r)], env, node_for(group_of_rank(r)));
    };
    // --kill-stragglers: every group's segment, read-only, to see which slots the server evicted;
    // per rank, the straggler restarts so far and whether its current process was killed for it.
    constexpr int kMaxStragglerRestarts = 10;
    std::vector<shm::Segment> straggler_segments;
    if (kill_stragglers)
      for (std::uint32_t g = 0; g < server_groups; ++g)
        straggler_segments.push_back(shm::Segment::open(segment_of(g), shm::Access::read_only));
    std::vector<int> straggler_restarts(static_cast<std::size_t>(workers), 0);
    std::vector<bool> killed_as_straggler(static_cast<std::size_t>(workers), false);
    std::vector<Child*> ranks;
    std::vector<int> restarts(static_cast<std::size_t>(workers), 0);
    for (int r = 0; r < workers; ++r) ranks.push_back(start_worker(r));
    bool chaos_done = !chaos;

    // Run until every worker is done, one fails for good, or we are interrupted.
    bool failed = false, stopping = false;
    while (true) {
      launcher.pump(std::chrono::milliseconds(chaos_done ? 200 : 20));
      if (!chaos_done && !victim_first_push && victim_published() > published_at_start)
        victim_first_push = std::chrono::steady_clock::now();
      const bool victim_gone = !chaos_done && !launcher.running(*ranks.back());
      if (!chaos_done && !stopping &&
          (victim_gone || (victim_first_push && std::chrono::steady_clock::now() - *victim_first_push >=
                                                    std::chrono::duration<double>(chaos_after)))) {
        chaos_done = true;
        Child& victim = *ranks.back();
        if (launcher.running(victim)) {
          std::cout << "shmps-launch: --chaos: killing worker " << victim.label << " (pid " << victim.pid
                    << ") with SIGKILL" << std::endl;
          kill(victim.pid, SIGKILL);
        } else {
          std::cout << "shmps-launch: --chaos: worker " << victim.label << " "
                    << (victim.status ? describe(*victim.status) : std::string("ended"))
                    << (victim_first_push ? " before --chaos-after had passed" : " before its first push")
                    << "; nothing killed" << std::endl;
        }
      }
      if (kill_stragglers && !stopping) {
        for (std::size_t r = 0; r < ranks.size(); ++r) {
          Child* c = ranks[r];
          if (killed_as_straggler[r]) continue;
          const shm::WorkerSlot& slot =
              straggler_segments[group_of_rank(static_cast<int>(r))].slot(slot_of_rank(static_cast<int>(r)));
          if (!shm::evicted(slot)) continue;
          if (!launcher.running(*c)) {
            // Evicted and gone by itself: a slow (not stopped) straggler gets an error at its next
            // call and exits. That is a straggler restart too, not a failure of the job.
            if (!c->reported && c->status && !succeeded(*c->status)) killed_as_straggler[r] = true;
            continue;
          }
          // Its process, or one in its process group (a shell that runs it).
          const pid_t pid = shm::load_acquire(slot.pid);
          if (pid != c->pid && ::getpgid(pid) != c->pid) continue;
          killed_as_straggler[r] = true;
          std::cout << "shmps-launch: worker " << c->label << " (pid " << pid
                    << ") was evicted from the "
                    << (shm::load_acquire(straggler_segments[group_of_rank(static_cast<int>(r))].header().consistency) ==
                                    static_cast<std::uint32_t>(Consistency::ssp)
                            ? "SSP bound"
                            : "BSP barrier")
                    << " as a straggler ("
                    << shm::load_acquire(slot.evicted_behind_ms) << " ms behind); --kill-stragglers: killing it "
                    << "with SIGKILL" << std::endl;
          launcher.signal(*c, SIGKILL);
        }
      }
      bool any_running = false;
      for (std::size_t r = 0; r < ranks.size(); ++r) {
        Child* c = ranks[r];
        if (launcher.running(*c)) {
          any_running = true;
        } else if (killed_as_straggler[r] && !stopping && !c->reported) {
          c->reported = true;
          killed_as_straggler[r] = false;
          if (straggler_restarts[r] < kMaxStragglerRestarts && !launcher.interrupted()) {
            ++straggler_restarts[r];
            std::cout << "shmps-launch: worker " << c->label << " " << describe(*c->status)
                      << " as a straggler; restarting it with the same rank, where it rejoins (straggler restart "
                      << straggler_restarts[r] << " of " << kMaxStragglerRestarts << ")" << std::endl;
            ranks[r] = start_worker(static_cast<int>(r));
            any_running = true;
          } else {
            std::cerr << "shmps-launch: worker " << c->label << " was evicted as a straggler "
                      << kMaxStragglerRestarts + 1 << " times; stopping the job\n";
            failed = true;
          }
        } else if (!succeeded(*c->status) && !stopping && !c->reported) {
          c->reported = true;
          if (restarts[r] < max_restarts && !launcher.interrupted()) {
            ++restarts[r];
            std::cout << "shmps-launch: worker " << c->label << " " << describe(*c->status)
                      << "; restarting it with the same rank (restart " << restarts[r] << " of " << max_restarts << ")"
                      << std::endl;
            ranks[r] = start_worker(static_cast<int>(r));
            any_running = true;
          } else {
            std::cerr << "shmps-launch: worker " << c->label << " " << describe(*c->status)
                      << (max_restarts > 0 ? " and has used its " + std::to_string(max_restarts) + " restart" +
                                                 (max_restarts == 1 ? "" : "s") + " (--max-restarts)"
                                           : std::string())
                      << "; stopping the job\n";
            failed = true;
          }
        }
      }
      for (std::uint32_t g = 0; g < server_groups; ++g) {
        Child* server = servers[g];
        if (!server || launcher.running(*server) || !any_running || stopping) continue;
        if (server_groups > 1 && server_restarts[g] < 10 && !launcher.interrupted()) {
          // A server group's server resumes from its replica; its peers and workers wait for it.
          ++server_restarts[g];
          std::cout << "shmps-launch: the server of group " << g << " " << describe(*server->status)
                    << "; starting it again (restart " << server_restarts[g] << " of 10)" << std::endl;
          try {
            start_and_wait(g);
          } catch (const Error& e) {
            std::cerr << "shmps-launch: " << e.what() << "; stopping the job\n";
            failed = true;
          }
          continue;
        }
        std::cerr << "shmps-launch: the server" << (server_groups > 1 ? " of group " + std::to_string(g) : "") << " "
                  << describe(*server->status) << "; stopping the job\n";
        failed = true;
      }
      if ((failed || launcher.interrupted()) && !stopping) {
        stopping = true;
        const bool servers_running =
            std::all_of(servers.begin(), servers.end(), [&](Child* c) { return c && launcher.running(*c); });
        if (launcher.interrupted() && servers_running) {
          // Stop the job where it stands: freeze the workers, let the server apply what is
          // whole and write its last checkpoint, then end the workers. Ending them first would
          // let the server see them die one by one; with on_worker_death = "proceed" a BSP step
          // could then complete without the worker that died first, and a restore from that
          // checkpoint would not continue the run exactly. A frozen worker is alive to the server.
          for (Child* c : ranks) launcher.signal(*c, SIGSTOP);
          for (Child* server : servers) launcher.signal(*server, SIGTERM);
          for (Child* server : servers) {
            const int status = launcher.wait(*server, std::chrono::seconds(30));
            if (!succeeded(status)) std::cerr << "shmps-launch: the " << server->label << " " << describe(status) << "\n";
          }
          for (Child* c : ranks) {
            launcher.signal(*c, SIGTERM);
            launcher.signal(*c, SIGCONT);
          }
        } else {
          for (Child* c : ranks) launcher.signal(*c, SIGTERM);
        }
      }
      if (!any_running) break;
    }
    for (Child* c : ranks) launcher.wait(*c, std::chrono::seconds(10));

    // Server groups: every replica made equal (each group's updates home, the homes' values back).
    if (server_groups > 1 && !failed && !launcher.interrupted()) {
      try {
        // A group's server that died after the last worker ended is started again first: the sync
        // needs every group.
        for (std::uint32_t g = 0; g < server_groups; ++g)
          if (servers[g] && !launcher.running(*servers[g])) {
            std::cout << "shmps-launch: the server of group " << g << " " << describe(*servers[g]->status)
                      << "; starting it again for the final sync" << std::endl;
            start_and_wait(g);
          }
        std::cout << "shmps-launch: "
                  << tools::sync_job(name, server_groups, std::chrono::seconds(120),
                                     [&launcher] {
                                       launcher.pump(std::chrono::milliseconds(0));
                                       if (launcher.interrupted()) throw Error("interrupted");
                                     })
                  << std::endl;
      } catch (const Error& e) {
        std::cerr << "shmps-launch: the final sync failed: " << e.what() << "\n";
        failed = true;
      }
    }
    if (!failed && !launcher.interrupted() && !after.empty()) {
      Child& post = launcher.spawn("after", {"/bin/sh", "-c", after},
                                   {{"SHMPS_SEGMENT", segment_of(0)}, {"PATH", self_dir() + ":" + (getenv("PATH") ? getenv("PATH") : "")}});
      // No time limit, but Ctrl-C and SIGTERM stop it (it is in its own process group, so the
      // terminal's signal does not reach it by itself).
      while (launcher.running(post)) {
        launcher.pump(std::chrono::milliseconds(200));
        if (launcher.interrupted() && launcher.running(post)) {
          launcher.signal(post, SIGTERM);
          launcher.wait(post, std::chrono::seconds(10));
        }
      }
      const int status = *post.status;
      if (!succeeded(status) && !launcher.interrupted()) {
        std::cerr << "shmps-launch: the --after command " << describe(status) << "\n";
        failed = true;
      }
    }
    for (Child* server : servers)
      if (server && launcher.running(*server)) launcher.signal(*server, SIGTERM);
    for (Child* server : servers) {
      if (!server || !launcher.running(*server)) continue;
      const int status = launcher.wait(*server, std::chrono::seconds(30));
      if (!succeeded(status)) {
        std::cerr << "shmps-launch: the " << server->label << " " << describe(status) << "\n";
        failed = true;
      }
    }
    if (launcher.interrupted()) return 128 + launcher.interrupted();
    if (failed) return 1;
    std::cout << "shmps-launch: job finished"
              << (started_servers && !keep ? (server_groups > 1 ? "; segments removed" : "; segment removed") : "") << "\n";
    return 0;
  } catch (const server::SpecError& e) {
    std::cerr << "shmps-launch: error: " << e.what() << "\n";
    return 2;
  } catch (const Error& e) {
    std::cerr << "shmps-launch: error: " << e.what() << "\n";
    return 1;
  }
}
