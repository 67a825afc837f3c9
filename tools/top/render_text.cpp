// --once: the header block and both tables, as plain text.
#include <shmps/shm/names.hpp>

#include "format.hpp"
#include "render.hpp"
#include "table.hpp"

namespace shmps::top {

std::vector<std::string> summary_lines(const Metrics& m) {
  const Sample& s = m.now;
  std::vector<std::string> lines;
  if (s.presence != Presence::ready) {
    lines.push_back("segment     " + (s.problem.empty() ? s.segment + ": " + presence_name(s.presence) : s.problem));
    lines.push_back("server      " + std::string(s.server_alive ? "a live server holds its lock" : "none"));
    return lines;
  }
  lines.push_back("segment     " + s.segment + " (" + shm::segment_path(s.segment) + ", " +
                  human_bytes(static_cast<double>(s.total_bytes)) + "), state " + s.state);
  std::string server = "server      " + server_text(s);
  if (s.server_alive) {
    server += ", up " + opt(m.uptime_s, human_duration);
    server += ", heartbeat " + opt(m.server_heartbeat_age_s, human_duration) + " ago";
  } else {
    server += ": waiting for a server to start (shmps-server --spec FILE)";
  }
  lines.push_back(server);
  std::string job = "job         " + consistency_text(s) + (s.groups.size() > 1 ? ", slowest group clock " : ", model clock ") +
                    std::to_string(s.model_clock);
  if (s.consistency == Consistency::bsp) job += ", " + std::to_string(s.steps) + " steps";
  if (s.stragglers_evicted != 0)
    job += ", " + std::to_string(s.stragglers_evicted) + " straggler" + (s.stragglers_evicted == 1 ? "" : "s") + " evicted";
  job += "; optimizer " + std::string(to_string(s.optimizer.kind)) + " lr=" + general(s.optimizer.lr);
  job += "; workers " + std::to_string(m.workers_alive) + " alive of " + std::to_string(s.max_workers);
  lines.push_back(job);
  if (s.groups.size() > 1) {
    std::string groups = "groups      ";
    groups += std::to_string(s.groups.size());
    groups += " of ";
    groups += std::to_string(s.workers_per_group);
    groups += " workers:";
    for (std::size_t g = 0; g < s.groups.size(); ++g) {
      groups += g ? ", " : " ";
      groups += std::to_string(g);
      groups += " at clock ";
      groups += std::to_string(s.groups[g].clock);
      groups += " (";
      groups += std::to_string(s.groups[g].steps);
      groups += " steps)";
    }
    lines.push_back(groups);
  }
  if (s.server_groups > 1)
    lines.push_back("sync        server group " + std::to_string(s.server_group) + " of " +
                    std::to_string(s.server_groups) + ", home of " + std::to_string(s.home_slices) + " slices; " +
                    std::to_string(s.sync_sent) + " deltas sent, " + std::to_string(s.sync_taken) + " answers taken, " +
                    std::to_string(s.sync_in_flight) + " in flight; " + std::to_string(s.sync_added) +
                    " deltas added as home; last complete round " +
                    (m.sync_age_s ? human_duration(*m.sync_age_s) + " ago" : std::string("never")) + "; " +
                    human_bytes(static_cast<double>(s.sync_bytes)) + " sent");
  for (std::size_t i = 0; i < s.peers.size() && i < m.peers.size(); ++i)
    lines.push_back("  peer      group " + std::to_string(s.peers[i].group) + ": home of " +
                    std::to_string(s.peers[i].home_slices) + " slices here, values from " +
                    (m.peers[i].lag_s ? human_duration(*m.peers[i].lag_s) + " ago" : std::string("never")) + ", " +
                    std::to_string(s.peers[i].in_flight) + " in flight" +
                    (m.peers[i].oldest_in_flight_s ? " (oldest " + human_duration(*m.peers[i].oldest_in_flight_s) + ")"
                                                   : std::string()));
  std::string apply = "apply       " + opt(m.records_per_s, human_count) + " pushes/s, " + opt(m.floats_per_s, human_count) +
                      " floats/s, busy " + opt(m.apply_busy_fraction, percent) + "; latency ";
  if (m.latency.p50_ns)
    apply += "p50 " + human_ns(*m.latency.p50_ns) + " p99 " + human_ns(m.latency.p99_ns.value_or(0)) + " (" + m.latency.window +
             ", " + std::to_string(m.latency.samples) + " samples)";
  else
    apply += "- (no samples)";
  apply += "; " + std::to_string(s.records_applied) + " applied";
  lines.push_back(apply);
  std::string ckpt = "checkpoints " + std::to_string(s.checkpoints) + " (" + std::to_string(s.checkpoint_failures) + " failed)";
  if (m.checkpoint_age_s)
    ckpt += "; last " + human_duration(*m.checkpoint_age_s) + " ago, took " + opt(m.checkpoint_duration_s, human_duration) +
            ", at clock " + std::to_string(s.last_checkpoint_clock);
  lines.push_back(ckpt);
  return lines;
}

std::string render_text(const Metrics& m) {
  std::string out;
  for (const auto& line : summary_lines(m)) out += line + "\n";
  if (m.now.presence != Presence::ready) return out;
  std::vector<WorkerMetrics> used;
  for (const auto& w : m.workers)
    if (w.now.status != "free") used.push_back(w);
  out += "\nworkers (" + std::to_string(used.size()) + " of " + std::to_string(m.workers.size()) + " slots used)\n";
  const TextTable workers = layout(used);
  out += workers.header + "\n";
  for (const auto& line : workers.lines) out += line + "\n";
  out += "\nparameters (" + std::to_string(m.params.size()) + ")\n";
  const TextTable params = layout(m.params);
  out += params.header + "\n";
  for (const auto& line : params.lines) out += line + "\n";
  if (m.interval_s) out += "\nrates over " + fixed(*m.interval_s, 2) + " s\n";
  return out;
}

}  // namespace shmps::top
