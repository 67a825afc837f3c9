// shmps-server: creates or recovers the segment for a model spec and applies updates until
// SIGINT or SIGTERM, then drains the rings and exits (leaving the segment for a later server,
// unless --remove-on-stop). With --plan it prints what the segment would cost and exits.
#include <atomic>
#include <csignal>
#include <iostream>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <shmps/error.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/server/server.hpp>
#include <shmps/shm/memory.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/pages.hpp>

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
  std::string consistency, bsp_aggregate, on_worker_death;
  std::string checkpoint_dir, checkpoint_every, restore;
  std::size_t keep = 3;
  std::uint64_t ring_bytes = 0;
  std::uint32_t max_workers = 0, workers_per_group = 0;
  std::uint32_t server_groups = 1, server_group = 0;
  std::string sync_every;
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
  app.add_option("--checkpoint-dir", cl.checkpoint_dir,
                 "write checkpoints here (periodically, on `shmps-ctl checkpoint NAME`, at a graceful stop); with no "
                 "segment, restore the newest valid one found here");
  app.add_option("--checkpoint-every", cl.checkpoint_every,
                 "a period (30s, 5m, 500ms) or a number of clocks (100clocks) between checkpoints (needs --checkpoint-dir)");
  app.add_option("--keep", cl.keep, "checkpoints to keep in --checkpoint-dir, the newest (0: all; default 3)");
  app.add_option("--restore", cl.restore,
                 "recreate the job from this checkpoint file (refused if the segment exists)")->check(CLI::ExistingFile);
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
  app.add_option("--sync-every", cl.sync_every,
                 "server groups: how often this group sends its changed slices' deltas to their home groups, "
                 "a period (100ms, 2s) or a number of applied pushes (50updates) (overrides the spec's sync_every)");
  app.add_flag("--plan", cl.plan_only,
               "print what the segment would cost, part by part, and whether huge pages are offered; create nothing");
  app.add_option("--log-level", cl.log_level, "trace, debug, info, warn, error")->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));
}

// Structured log lines on stderr: time, program, level, then key=value pairs.
void set_up_logging(const std::string& level) {
  auto logger = spdlog::stderr_logger_mt("shmps-server");
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
            << "\n\n"
            << shmps::shm::memory_table(m);
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
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shmps-server: the parameter server of a shmps job (one per segment)"};
  CommandLine cl;
  add_options(app, cl);
  CLI11_PARSE(app, argc, argv);
  set_up_logging(cl.log_level);

  try {
    shmps::server::ServerOptions options;
    options.spec = shmps::server::load_model_spec(cl.spec_path);
    apply_overrides(app, cl, options);
    if (cl.plan_only) {
      print_plan(options, cl.spec_path);
      return 0;
    }
    options.checkpoint_dir = cl.checkpoint_dir;
    options.keep = cl.keep;
    options.restore = cl.restore;
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
    std::cerr << "shmps-server: error: " << e.what() << "\n";
    return 2;
  } catch (const shmps::Error& e) {
    std::cerr << "shmps-server: error: " << e.what() << "\n";
    return 1;
  }
}
