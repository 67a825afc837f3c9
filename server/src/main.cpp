// shmps-server: creates or recovers the segment for a model spec and applies updates until
// SIGINT or SIGTERM, then drains the rings and exits (leaving the segment for a later server,
// unless --remove-on-stop). With --plan it prints what the segment would cost and exits.
#include <atomic>
#include <filesystem>
#include <csignal>
#include <iostream>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <shmps/error.hpp>
#include <shmps/server/checkpoint_manifest.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/server/server.hpp>
#include <shmps/shm/memory.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/pages.hpp>
#include <shmps/shm/segment.hpp>

#include "mpi_comm.hpp"

namespace {
std::atomic<shmps::server::Server*> g_server{nullptr};
std::atomic<bool> g_stop_requested{false};
extern "C" void on_stop_signal(int) {
  g_stop_requested.store(true);
  if (auto* server = g_server.load()) server->stop();  // async-signal-safe: an atomic store and a futex wake
}

// The command line, as CLI11 fills it.
struct CommandLine {
  std::string spec_path, name, log_level = "info";
  unsigned threads = 0;
  unsigned idle_poll_us = static_cast<unsigned>(shmps::server::ServerOptions{}.idle_poll.count());
  bool remove_on_stop = false, group = false;
  std::string consistency, bsp_aggregate, on_worker_death, straggler_timeout;
  std::string checkpoint_dir, checkpoint_every, restore;
  std::size_t keep = 3;
  std::uint64_t ring_bytes = 0;
  std::uint32_t max_workers = 0, workers_per_group = 0;
  std::uint32_t server_groups = 1, server_group = 0;
  std::string sync_every;
  bool mpi = false;
  bool plan_only = false;
};

void add_options(CLI::App& app, CommandLine& cl) {
  app.add_option("--spec", cl.spec_path, "model spec (TOML): segment name, parameters, optimizer")->required()->check(CLI::ExistingFile);
  app.add_option("--name", cl.name, "segment name (overrides the spec's `name`)");
  app.add_option("--threads", cl.threads, "apply threads (default: the spec's server_threads, else all cores)");
  app.add_flag("--remove-on-stop", cl.remove_on_stop, "remove the segment when the server stops (default: keep it for a restart)");
  app.add_flag("--group", cl.group, "let the owner's group use the segment (mode 0660 instead of 0600)");
  app.add_option("--consistency", cl.consistency, "bsp, ssp:N or asp (overrides the spec, also for a recovered segment)");
  app.add_option("--bsp-aggregate", cl.bsp_aggregate, "sum or mean: how a BSP step combines the workers' gradients");
  app.add_option("--on-worker-death", cl.on_worker_death,
                 "proceed or wait: whether barriers go on without a dead worker or wait for its restart");
  app.add_option("--straggler-timeout", cl.straggler_timeout,
                 "BSP: evict a live worker that alone holds its group's barrier this long (10s, 500ms; 0 or off: "
                 "never); its open step is discarded and a restart of its rank rejoins (overrides the spec's "
                 "straggler_timeout, default 10s)");
  app.add_option("--checkpoint-dir", cl.checkpoint_dir,
                 "write checkpoints here (periodically, on `shmps-ctl checkpoint NAME`, at a graceful stop); with no "
                 "segment, restore the newest valid one found here");
  app.add_option("--checkpoint-every", cl.checkpoint_every,
                 "a period (30s, 5m, 500ms) or a number of clocks (100clocks) between checkpoints (needs --checkpoint-dir)");
  app.add_option("--keep", cl.keep, "checkpoints to keep in --checkpoint-dir, the newest (0: all; default 3)");
  app.add_option("--restore", cl.restore,
                 "recreate the job from this checkpoint file (refused if the segment exists); with --mpi, the "
                 "directory of a multi-host checkpoint (its manifest.json): each rank restores its part")
      ->check(CLI::ExistingPath);
  app.add_option("--idle-poll-us", cl.idle_poll_us,
                 "microseconds the server keeps polling for pushes before it sleeps (lower latency for a "
                 "little CPU; 0: sleep at once)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1000000));
  app.add_option("--ring-bytes", cl.ring_bytes,
                 "bytes of each worker's push ring, a multiple of 64 (overrides the spec's ring_bytes; default: two "
                 "pushes of the largest parameter, or one whole step in BSP, at most 32 MiB: bigger pushes and steps "
                 "stream)");
  app.add_option("--max-workers", cl.max_workers, "worker slots (overrides the spec's max_workers)");
  app.add_option("--workers-per-group", cl.workers_per_group,
                 "workers per worker group: rank r is in group r / N; BSP and SSP hold inside each group, groups "
                 "run asynchronously (overrides the spec's workers_per_group; 0: one group)");
  app.add_option("--server-groups", cl.server_groups,
                 "server groups of the job (SINGA's): each serves its replica <name>.g<K> and syncs slices with "
                 "the others (shmps-launch --server-groups starts them; default 1: none)")
      ->check(CLI::Range(1U, shmps::shm::kMaxServerGroups));
  app.add_option("--server-group", cl.server_group, "which server group this server serves, 0 to --server-groups - 1");
  app.add_flag("--mpi", cl.mpi,
               "server groups on several hosts: started by mpirun (shmps-launch --mpi does), one rank per host; rank "
               "K serves group K of the MPI job's size, its replica <name>.h<K>, and syncs over MPI");
  app.add_option("--sync-every", cl.sync_every,
                 "server groups: how often this group sends its changed slices' deltas to their home groups, "
                 "a period (100ms, 2s) or a number of applied pushes (50updates) (overrides the spec's sync_every)");
  app.add_flag("--plan", cl.plan_only,
               "print what the segment would cost, part by part, and whether huge pages are offered; create nothing");
  app.add_option("--log-level", cl.log_level, "trace, debug, info, warn, error")->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));
}

// Structured log lines on stderr: time, program, level, then key=value pairs.
// Under MPI the program name carries the host and the rank, so that the lines of every rank, which
// mpirun brings together, say where they come from.
void set_up_logging(const std::string& level, const std::string& where = {}) {
  spdlog::drop("shmps-server");
  auto logger = spdlog::stderr_logger_mt(where.empty() ? "shmps-server" : "shmps-server[" + where + "]");
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %n %l %v");
  logger->set_level(spdlog::level::from_str(level));
  spdlog::set_default_logger(logger);
}

// The spec and the command line's overrides of it (name, policy, sizes, threads), each checked
// and reported under its flag; and the checkpoint period.
void apply_overrides(const CLI::App& app, const CommandLine& cl, shmps::server::ServerOptions& options) {
  if (!cl.name.empty()) {
    if (auto problem = shmps::server::validate_segment_name(cl.name); !problem.empty())
      throw shmps::Error("--name: " + problem);
    options.spec.name = cl.name;
  }
  if (!cl.consistency.empty()) {
    if (auto problem = shmps::server::parse_consistency(cl.consistency, options.spec.consistency, options.spec.staleness);
        !problem.empty())
      throw shmps::Error("--consistency: " + problem);
    options.override_policy = true;
  }
  if (!cl.bsp_aggregate.empty()) {
    if (auto problem = shmps::server::parse_bsp_aggregate(cl.bsp_aggregate, options.spec.bsp_aggregate); !problem.empty())
      throw shmps::Error("--bsp-aggregate: " + problem);
    options.override_policy = true;
  }
  if (!cl.on_worker_death.empty()) {
    if (auto problem = shmps::server::parse_on_worker_death(cl.on_worker_death, options.spec.on_worker_death);
        !problem.empty())
      throw shmps::Error("--on-worker-death: " + problem);
    options.override_policy = true;
  }
  if (!cl.straggler_timeout.empty()) {
    if (auto problem = shmps::server::parse_straggler_timeout(cl.straggler_timeout, options.spec.straggler_timeout);
        !problem.empty())
      throw shmps::Error("--straggler-timeout: " + problem);
  }
  if (!cl.checkpoint_every.empty()) {
    if (cl.checkpoint_dir.empty())
      throw shmps::Error("--checkpoint-every needs --checkpoint-dir: where should the checkpoints go?");
    if (auto problem = shmps::server::parse_checkpoint_every(cl.checkpoint_every, options.checkpoint_every); !problem.empty())
      throw shmps::Error("--checkpoint-every: " + problem);
  }
  if (app.count("--ring-bytes") != 0) {
    options.spec.ring_bytes = cl.ring_bytes;
    if (auto problem = shmps::server::validate_model_spec(options.spec); !problem.empty())
      throw shmps::Error("--ring-bytes: " + problem.substr(problem.find(':') + 2));
  }
  if (app.count("--max-workers") != 0) {
    options.spec.max_workers = cl.max_workers;
    if (auto problem = shmps::server::validate_model_spec(options.spec); !problem.empty())
      throw shmps::Error("--max-workers: " + problem.substr(problem.find(':') + 2));
  }
  if (app.count("--workers-per-group") != 0) {
    options.spec.workers_per_group = cl.workers_per_group;
    if (auto problem = shmps::server::validate_model_spec(options.spec); !problem.empty())
      throw shmps::Error("--workers-per-group: " + problem.substr(problem.find(':') + 2));
  }
  if (!cl.sync_every.empty()) {
    if (auto problem = shmps::server::parse_sync_every(cl.sync_every, options.spec.sync_every); !problem.empty())
      throw shmps::Error("--sync-every: " + problem);
  }
  if (options.mpi != nullptr) {
    if (!cl.checkpoint_dir.empty())
      throw shmps::Error("--checkpoint-dir with --mpi: each host's files could not be restored as one job; take a "
                         "checkpoint of every host with `mpirun ... shmps-ctl checkpoint --mpi NAME DIR`");
    if (app.count("--server-groups") != 0 || app.count("--server-group") != 0)
      throw shmps::Error("--mpi takes the server groups from mpirun (one per rank): drop --server-groups and "
                         "--server-group");
    const auto rank = static_cast<std::uint32_t>(options.mpi->rank());
    const auto size = static_cast<std::uint32_t>(options.mpi->size());
    if (size > shmps::shm::kMaxServerGroups)
      throw shmps::Error("--mpi: " + std::to_string(size) + " ranks, but a job has at most " +
                         std::to_string(shmps::shm::kMaxServerGroups) + " server groups: start fewer ranks");
    options.job = options.spec.name;
    options.server_group = rank;
    options.server_groups = size;
    options.spec.name = shmps::shm::host_replica_name(options.job, rank);
    if (auto problem = shmps::server::validate_segment_name(options.spec.name); !problem.empty())
      throw shmps::Error("--mpi: the replica's name: " + problem);
    if (size > 1 && options.spec.consistency == shmps::Consistency::bsp && options.spec.workers_per_group != 0 &&
        options.spec.workers_per_group < options.spec.max_workers)
      throw shmps::Error("server groups in BSP need one worker group per server group (a server group writes synced "
                         "values at its step boundary, which must be every worker's): drop workers_per_group, or run "
                         "ASP or SSP");
    options.threads = cl.threads;
    return;
  }
  if (cl.server_group >= cl.server_groups)
    throw shmps::Error("--server-group " + std::to_string(cl.server_group) + " must be below --server-groups " +
                       std::to_string(cl.server_groups) + " (groups are numbered from 0)");
  if (cl.server_groups > 1) {
    if (options.spec.consistency == shmps::Consistency::bsp && options.spec.workers_per_group != 0 &&
        options.spec.workers_per_group < options.spec.max_workers)
      throw shmps::Error("server groups in BSP need one worker group per server group (a server group writes synced "
                         "values at its step boundary, which must be every worker's): drop workers_per_group, or run "
                         "ASP or SSP");
    options.job = options.spec.name;
    options.server_group = cl.server_group;
    options.server_groups = cl.server_groups;
    options.spec.name = shmps::shm::replica_name(options.job, cl.server_group);
    if (auto problem = shmps::server::validate_segment_name(options.spec.name); !problem.empty())
      throw shmps::Error("--server-groups: the replica's name: " + problem);
  }
  options.threads = cl.threads;
}

// --plan: what start() would create, without taking a lock or creating anything.
void print_plan(const shmps::server::ServerOptions& options, const std::string& spec_path) {
  const shmps::shm::LayoutPlan plan = shmps::server::plan_for(options);
  const shmps::shm::MemoryBreakdown m = shmps::shm::memory_breakdown(plan);
  const auto& spec = options.spec;
  std::cout << "plan of segment '" << spec.name << "' (" << spec_path << "): " << plan.params.size()
            << " parameters, " << plan.slice_count << " slices of " << plan.slice_floats << " floats, "
            << plan.max_workers << " worker slots"
            << (plan.group_count > 1 ? " in " + std::to_string(plan.group_count) + " groups of " +
                                           std::to_string(plan.workers_per_group)
                                     : std::string())
            << ", " << to_string(spec.optimizer.kind)
            << (plan.state_arrays > 0 && plan.state_dtype == shmps::StateDType::bf16 ? " (bf16 state)" : "") << ", "
            << to_string(spec.consistency) << ", " << plan.redo_count << " redo entries\n"
            << "ring_bytes " << plan.ring_bytes << " per worker: " << plan.ring_rule << "; a push of up to "
            << (plan.ring_bytes / 2 - sizeof(shmps::shm::PushRecord)) / sizeof(float)
            << " floats fits one record, bigger ones stream through the ring in chunks\n"
            << "huge pages " << shmps::shm::huge_page_text(shmps::shm::huge_page_support(), 0, m.total_bytes)
            << "\n";
  // Parameters whose values are stored in 2 bytes (dtype = "bf16" / "fp16"), each with its size.
  for (const auto& p : plan.params)
    if (p.dtype != shmps::shm::DType::f32)
      std::cout << "dtype " << shmps::shm::to_string(p.dtype) << " " << p.name << ": " << p.size << " elements, "
                << shmps::shm::human_bytes(p.size * shmps::shm::dtype_bytes(p.dtype)) << " (float32: "
                << shmps::shm::human_bytes(p.size * sizeof(float)) << ")\n";
  // Tables with their own optimizer, each with what it keeps per row.
  for (const auto& p : spec.params)
    if (p.optimizer)
      std::cout << "optimizer " << to_string(p.optimizer->kind) << " lr=" << p.optimizer->lr << " for table " << p.name
                << (p.optimizer->kind == shmps::OptimizerKind::rowwise_adagrad ? ": one accumulator per row (8 bytes)"
                    : p.optimizer->kind == shmps::OptimizerKind::adam          ? ": lazy, a step count per row (8 bytes)"
                                                                                : "")
                << "\n";
  std::cout << "\n" << shmps::shm::memory_table(m);
}

// Handlers first: a SIGTERM that arrives while start() runs (or right after "ready") must
// stop the server gracefully, not kill it.
void install_stop_handlers() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}
// --mpi --restore DIR (or DIR/manifest.json): a checkpoint of a job on several hosts. Every rank
// checks its own part against the manifest, and no rank restores unless every part is whole.
void restore_own_part(shmps::server::MpiComm& mpi, shmps::server::ServerOptions& options) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path dir = fs::is_directory(options.restore, ec) ? options.restore : options.restore.parent_path();
  std::string problem;
  shmps::server::Manifest manifest;
  try {
    manifest = shmps::server::read_manifest(options.restore);
    if (manifest.job != options.job)
      problem = "the checkpoint is of job '" + manifest.job + "', not '" + options.job + "': give --name " + manifest.job;
    else if (manifest.ranks != static_cast<std::uint32_t>(mpi.size()))
      problem = "the checkpoint has parts for " + std::to_string(manifest.ranks) + " ranks, and " +
                std::to_string(mpi.size()) + " were started: start as many ranks as it has parts";
    else
      problem = shmps::server::check_part(dir, manifest, static_cast<std::uint32_t>(mpi.rank()));
  } catch (const shmps::Error& e) {
    problem = e.what();
  }
  const std::vector<std::uint64_t> whole = mpi.allgather(problem.empty() ? 1 : 0);
  std::string bad;
  for (std::size_t k = 0; k < whole.size(); ++k)
    if (whole[k] == 0) bad += (bad.empty() ? "" : ", ") + std::to_string(k);
  if (!problem.empty()) throw shmps::Error("--restore " + options.restore.string() + ": " + problem);
  if (!bad.empty())
    throw shmps::Error("--restore " + options.restore.string() + ": the part of rank " + bad +
                       " is missing or damaged (that rank says why): nothing was restored");
  options.restore = dir / manifest.parts[static_cast<std::size_t>(mpi.rank())].file;
  options.restore_sync_tables = true;
}

// The error, and the exit code. Under MPI the process leaves without finalising: the other ranks
// may wait in a collective for this one, and mpirun ends them all when a rank exits this way.
int fail(shmps::server::MpiComm* mpi, const char* what, int code) {
  std::cerr << "shmps-server" << (mpi ? "[" + mpi->host() + "/r" + std::to_string(mpi->rank()) + "]" : std::string())
            << ": error: " << what << "\n";
  if (mpi != nullptr) {
    std::cerr.flush();
    std::_Exit(code);
  }
  return code;
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shmps-server: the parameter server of a shmps job (one per segment)"};
  CommandLine cl;
  add_options(app, cl);
  CLI11_PARSE(app, argc, argv);
  set_up_logging(cl.log_level);

  std::unique_ptr<shmps::server::MpiComm> mpi;
  try {
    shmps::server::ServerOptions options;
    options.spec = shmps::server::load_model_spec(cl.spec_path);
    if (cl.mpi && !cl.plan_only) {
      mpi = std::make_unique<shmps::server::MpiComm>();
      options.mpi = mpi.get();
      set_up_logging(cl.log_level, mpi->host() + "/r" + std::to_string(mpi->rank()));
    }
    apply_overrides(app, cl, options);
    if (cl.plan_only) {
      print_plan(options, cl.spec_path);
      return 0;
    }
    options.checkpoint_dir = cl.checkpoint_dir;
    options.keep = cl.keep;
    options.restore = cl.restore;
    if (mpi && !cl.restore.empty()) restore_own_part(*mpi, options);
    options.idle_poll = std::chrono::microseconds(cl.idle_poll_us);
    options.remove_on_stop = cl.remove_on_stop;
    options.mode = cl.group ? 0660 : 0600;
    install_stop_handlers();
    shmps::server::Server server(std::move(options));
    server.start();
    g_server.store(&server);
    if (g_stop_requested.load()) server.stop();
    server.run();
    g_server.store(nullptr);
    return 0;
  } catch (const shmps::server::SpecError& e) {
    return fail(mpi.get(), e.what(), 2);
  } catch (const shmps::Error& e) {
    return fail(mpi.get(), e.what(), 1);
  }
}
