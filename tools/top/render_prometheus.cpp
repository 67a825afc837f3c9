// --prometheus and /metrics: the Prometheus text exposition format (version 0.0.4).
//
// Every metric is named shmps_*, labelled with segment (and rank for a worker slot, param for a
// parameter), and comes with its HELP and TYPE lines; counters end in _total. Raw counters are
// exported rather than the monitor's rates: Prometheus computes rates itself (rate()). Free worker
// slots are left out.
#include <cmath>
#include <charconv>
#include <functional>
#include <variant>

#include "render.hpp"

namespace shmps::top {

namespace {

// A sample's value: an exact integer, a real number, or none (the line is left out).
using Value = std::variant<std::monostate, std::uint64_t, double>;

Value from(const std::optional<double>& v) { return v ? Value(*v) : Value(); }

std::string text_of(const Value& v) {
  if (const auto* u = std::get_if<std::uint64_t>(&v)) return std::to_string(*u);
  const double d = std::get<double>(v);
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "+Inf" : "-Inf";
  char buf[64];
  const auto end = std::to_chars(buf, buf + sizeof buf, d).ptr;  // the shortest text that reads back exactly
  return std::string(buf, end);
}

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

using Labels = std::vector<std::pair<std::string, std::string>>;

class Exposition {
 public:
  // One metric family: its HELP and TYPE, then its samples (a family without samples is left out).
  void family(const std::string& name, const char* type, const std::string& help,
              const std::vector<std::pair<Labels, Value>>& samples) {
    bool any = false;
    for (const auto& [labels, v] : samples) any = any || !std::holds_alternative<std::monostate>(v);
    if (!any) return;
    out_ += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
    for (const auto& [labels, v] : samples) {
      if (std::holds_alternative<std::monostate>(v)) continue;
      out_ += name;
      if (!labels.empty()) {
        out_ += '{';
        for (std::size_t i = 0; i < labels.size(); ++i) {
          if (i) out_ += ',';
          out_ += labels[i].first;
          out_ += "=\"";
          out_ += escape(labels[i].second);
          out_ += '"';
        }
        out_ += '}';
      }
      out_ += ' ';
      out_ += text_of(v);
      out_ += '\n';
    }
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

template <class Row>
struct Family {
  std::string name;
  const char* type;
  std::string help;
  std::function<Value(const Row&)> value;
};

std::uint64_t u(std::uint64_t v) { return v; }

}  // namespace

std::string render_prometheus(const Metrics& m) {
  const Sample& s = m.now;
  Exposition e;
  const Labels job{{"segment", s.segment}};
  auto one = [&](Value v) { return std::vector<std::pair<Labels, Value>>{{job, v}}; };

  e.family("shmps_segment_up", "gauge", "1 if the segment exists and this monitor can read it",
           one(u(s.presence == Presence::ready ? 1 : 0)));
  e.family("shmps_server_up", "gauge", "1 if a live server holds the segment's server lock",
           one(u(s.server_alive ? 1 : 0)));
  if (s.presence != Presence::ready) return e.take();

  std::vector<std::pair<Labels, Value>> states;
  for (const char* state : {"creating", "ready", "stopping", "stopped"})
    states.push_back({{{"segment", s.segment}, {"state", state}}, u(s.state == state ? 1 : 0)});
  e.family("shmps_segment_state", "gauge", "the segment's state (1 for the current one)", states);
  e.family("shmps_segment_size_bytes", "gauge", "size of the shared-memory segment", one(s.total_bytes));
  e.family("shmps_server_pid", "gauge", "pid of the current (or last) server", one(u(static_cast<std::uint64_t>(s.server_pid))));
  e.family("shmps_server_epoch", "gauge", "server epoch, bumped at every server start", one(s.epoch));
  e.family("shmps_server_uptime_seconds", "gauge", "time since the current server started", one(from(m.uptime_s)));
  e.family("shmps_server_heartbeat_age_seconds", "gauge", "time since the server's last heartbeat",
           one(from(m.server_heartbeat_age_s)));
  e.family("shmps_consistency_info", "gauge", "the consistency model (labels), always 1",
           {{{{"segment", s.segment},
              {"mode", std::string(to_string(s.consistency))},
              {"bsp_aggregate", std::string(to_string(s.bsp_aggregate))},
              {"on_worker_death", std::string(to_string(s.on_worker_death))}},
             u(1)}});
  e.family("shmps_straggler_timeout_seconds", "gauge", "BSP: a straggler is evicted from its barrier after this (0: never)",
           one(static_cast<double>(s.straggler_timeout_ms) / 1e3));
  e.family("shmps_stragglers_evicted_total", "counter", "live workers evicted from a BSP barrier as stragglers",
           one(s.stragglers_evicted));
  e.family("shmps_staleness_bound", "gauge", "SSP staleness bound, in clocks", one(u(s.staleness)));
  e.family("shmps_model_clock", "gauge", "BSP: the step the slowest worker group is collecting", one(s.model_clock));
  {
    std::vector<std::pair<Labels, Value>> clocks, steps;
    for (std::size_t g = 0; g < s.groups.size(); ++g) {
      clocks.push_back({Labels{{"segment", s.segment}, {"group", std::to_string(g)}}, Value(s.groups[g].clock)});
      steps.push_back({Labels{{"segment", s.segment}, {"group", std::to_string(g)}}, Value(s.groups[g].steps)});
    }
    e.family("shmps_group_clock", "gauge", "BSP: the step each worker group is collecting", std::move(clocks));
    e.family("shmps_group_steps_total", "counter", "BSP steps each worker group completed", std::move(steps));
  }
  e.family("shmps_bsp_steps_total", "counter", "BSP steps completed", one(s.steps));
  e.family("shmps_optimizer_info", "gauge", "the server's optimizer (label kind), always 1",
           {{{{"segment", s.segment}, {"kind", std::string(to_string(s.optimizer.kind))}}, u(1)}});
  e.family("shmps_optimizer_learning_rate", "gauge", "the optimizer's learning rate", one(static_cast<double>(s.optimizer.lr)));
  e.family("shmps_workers_alive", "gauge", "worker slots held by a live process (alive or suspect)", one(u(m.workers_alive)));
  e.family("shmps_workers_max", "gauge", "worker slots in the segment", one(u(s.max_workers)));
  e.family("shmps_records_applied_total", "counter", "push records applied by the servers", one(s.records_applied));
  e.family("shmps_floats_applied_total", "counter", "gradient elements applied by the servers", one(s.floats_applied));
  e.family("shmps_apply_rounds_total", "counter", "apply rounds of the servers", one(s.apply_rounds));
  e.family("shmps_records_skipped_total", "counter", "records skipped as already applied before a server restart",
           one(s.records_skipped));
  e.family("shmps_records_discarded_total", "counter", "records of a BSP step their worker died in", one(s.records_discarded));
  e.family("shmps_apply_busy_seconds_total", "counter", "time the servers spent in apply rounds that applied something",
           one(static_cast<double>(s.apply_busy_ns) / 1e9));
  e.family("shmps_apply_latency_samples_total", "counter", "pushes whose commit-to-applied latency was sampled",
           one(s.latency_samples));
  e.family("shmps_apply_latency_p50_seconds", "gauge",
           "median commit-to-applied latency over the monitor's last interval (all samples if none in it)",
           one(m.latency.p50_ns ? Value(*m.latency.p50_ns / 1e9) : Value()));
  e.family("shmps_apply_latency_p99_seconds", "gauge",
           "99th percentile commit-to-applied latency over the monitor's last interval (all samples if none in it)",
           one(m.latency.p99_ns ? Value(*m.latency.p99_ns / 1e9) : Value()));
  e.family("shmps_checkpoints_total", "counter", "checkpoints written", one(s.checkpoints));
  e.family("shmps_checkpoint_failures_total", "counter", "checkpoints that failed", one(s.checkpoint_failures));
  e.family("shmps_last_checkpoint_age_seconds", "gauge", "time since the last checkpoint was taken", one(from(m.checkpoint_age_s)));
  e.family("shmps_last_checkpoint_duration_seconds", "gauge", "how long the last checkpoint took until durable",
           one(from(m.checkpoint_duration_s)));

  // Server groups (also on several hosts): the sync, and its lag per peer group.
  if (s.server_groups > 1) {
    e.family("shmps_server_group", "gauge", "the server group this replica belongs to (of shmps_server_groups)",
             one(u(s.server_group)));
    e.family("shmps_server_groups", "gauge", "server groups of the job", one(u(s.server_groups)));
    e.family("shmps_sync_rounds_total", "counter", "sync rounds begun", one(s.sync_rounds));
    e.family("shmps_sync_deltas_sent_total", "counter", "slice deltas sent to their home groups", one(s.sync_sent));
    e.family("shmps_sync_answers_taken_total", "counter", "home values taken back", one(s.sync_taken));
    e.family("shmps_sync_deltas_added_total", "counter", "other groups' deltas added as home", one(s.sync_added));
    e.family("shmps_sync_duplicates_total", "counter", "deltas answered again without adding (sent twice)",
             one(s.sync_duplicates));
    e.family("shmps_sync_bytes_sent_total", "counter", "bytes of deltas and answers sent", one(s.sync_bytes));
    e.family("shmps_sync_in_flight", "gauge", "slices whose delta awaits its answer", one(s.sync_in_flight));
    e.family("shmps_sync_last_round_age_seconds", "gauge", "time since a sync round last had every answer back",
             one(from(m.sync_age_s)));
    std::vector<std::pair<Labels, Value>> lag, in_flight;
    for (std::size_t i = 0; i < s.peers.size() && i < m.peers.size(); ++i) {
      const Labels peer{{"segment", s.segment}, {"peer_group", std::to_string(s.peers[i].group)}};
      lag.push_back({peer, from(m.peers[i].lag_s)});
      in_flight.push_back({peer, u(s.peers[i].in_flight)});
    }
    e.family("shmps_sync_peer_lag_seconds", "gauge",
             "age of this replica's copy of the slices homed at the peer group (since the round whose answer came "
             "back last began)",
             std::move(lag));
    e.family("shmps_sync_peer_in_flight", "gauge", "slices whose delta to the peer group awaits its answer",
             std::move(in_flight));
  }

  // Worker slots (the used ones).
  using W = WorkerMetrics;
  const std::vector<Family<W>> worker_families{
      {"shmps_worker_pid", "gauge", "pid of the slot's (last) worker", [](const W& w) { return Value(u(static_cast<std::uint64_t>(w.now.pid))); }},
      {"shmps_worker_generation", "gauge", "attach generation of the slot", [](const W& w) { return Value(w.now.generation); }},
      {"shmps_worker_clock", "gauge", "the worker's step (clock)", [](const W& w) { return Value(w.now.clock); }},
      {"shmps_worker_pushes_total", "counter", "pushes committed by the slot, all generations", [](const W& w) { return Value(w.now.published); }},
      {"shmps_worker_pushes_applied_total", "counter", "pushes of the slot the server is done with", [](const W& w) { return Value(w.now.applied); }},
      {"shmps_worker_push_bytes_total", "counter", "gradient bytes pushed", [](const W& w) { return Value(w.now.push_bytes); }},
      {"shmps_worker_pulls_total", "counter", "pulls", [](const W& w) { return Value(w.now.pulls); }},
      {"shmps_worker_pull_bytes_total", "counter", "bytes pulled", [](const W& w) { return Value(w.now.pull_bytes); }},
      {"shmps_worker_pushes_rejected_total", "counter", "pushes refused for NaN/Inf gradients", [](const W& w) { return Value(w.now.pushes_rejected); }},
      {"shmps_worker_staleness", "gauge", "clocks ahead of the slowest live worker at the last pull", [](const W& w) { return Value(w.now.last_staleness); }},
      {"shmps_worker_max_staleness", "gauge", "the largest staleness seen", [](const W& w) { return Value(w.now.max_staleness); }},
      {"shmps_worker_wait_seconds_total", "counter", "time pulls waited (barrier, staleness bound)",
       [](const W& w) { return Value(static_cast<double>(w.now.wait_ns) / 1e9); }},
      {"shmps_worker_backpressure_seconds_total", "counter", "time pushes waited for room in the ring",
       [](const W& w) { return Value(static_cast<double>(w.now.backpressure_ns) / 1e9); }},
      {"shmps_worker_heartbeat_age_seconds", "gauge", "time since the worker's last heartbeat", [](const W& w) { return from(w.heartbeat_age_s); }},
      {"shmps_worker_ring_depth_bytes", "gauge", "bytes committed to the ring and not yet applied", [](const W& w) { return Value(w.ring_depth); }},
      {"shmps_worker_ring_capacity_bytes", "gauge", "capacity of the slot's ring", [](const W& w) { return Value(w.now.ring_capacity); }},
  };
  std::vector<const W*> used;
  for (const auto& w : m.workers)
    if (w.now.status != "free") used.push_back(&w);
  {
    std::vector<std::pair<Labels, Value>> rows;
    for (const W* w : used)
      for (const char* state : {"alive", "suspect", "dead", "left", "evicted"})
        rows.push_back({{{"segment", s.segment}, {"rank", std::to_string(w->now.rank)}, {"state", state}},
                        u(w->now.status == state ? 1 : 0)});
    e.family("shmps_worker_state", "gauge", "the slot's state (1 for the current one), as shmps-ctl workers says", rows);
  }
  for (const auto& f : worker_families) {
    std::vector<std::pair<Labels, Value>> rows;
    for (const W* w : used) rows.push_back({{{"segment", s.segment}, {"rank", std::to_string(w->now.rank)}}, f.value(*w)});
    e.family(f.name, f.type, f.help, rows);
  }

  // Parameters.
  using P = ParamMetrics;
  const std::vector<Family<P>> param_families{
      {"shmps_param_elements", "gauge", "elements of the parameter", [](const P& p) { return Value(p.now.elements); }},
      {"shmps_param_version_min", "gauge", "fewest updates applied to any of its slices", [](const P& p) { return Value(p.now.version_min); }},
      {"shmps_param_version_max", "gauge", "most updates applied to any of its slices", [](const P& p) { return Value(p.now.version_max); }},
      {"shmps_param_clock_min", "gauge", "lowest clock of its slices", [](const P& p) { return Value(p.now.clock_min); }},
      {"shmps_param_clock_max", "gauge", "highest clock of its slices", [](const P& p) { return Value(p.now.clock_max); }},
      {"shmps_param_updates_total", "counter", "optimizer steps applied to its slices", [](const P& p) { return Value(p.now.slice_updates); }},
      {"shmps_param_pushes_total", "counter", "push records applied to it", [](const P& p) { return Value(p.now.pushes); }},
      {"shmps_param_floats_applied_total", "counter", "gradient elements applied to it", [](const P& p) { return Value(p.now.floats_applied); }},
      {"shmps_param_grad_norm", "gauge", "L2 norm of the newest push's gradient", [](const P& p) { return Value(p.grad_norm); }},
      {"shmps_param_norm", "gauge", "L2 norm of its values (sampled by the server)", [](const P& p) { return Value(p.value_norm); }},
      {"shmps_param_rejected_total", "counter", "NaN/Inf gradients refused for it, over all workers", [](const P& p) { return Value(p.now.rejected); }},
  };
  for (const auto& f : param_families) {
    std::vector<std::pair<Labels, Value>> rows;
    for (const auto& p : m.params) rows.push_back({{{"segment", s.segment}, {"param", p.now.name}}, f.value(p)});
    e.family(f.name, f.type, f.help, rows);
  }
  // Tables only.
  const std::vector<Family<P>> table_families{
      {"shmps_table_rows_updated_total", "counter", "rows of the table updated (one per distinct row per round)",
       [](const P& p) { return Value(p.now.rows_updated); }},
      {"shmps_table_round_rows", "gauge", "distinct rows updated by the newest round that touched the table",
       [](const P& p) { return Value(p.now.round_rows); }},
  };
  for (const auto& f : table_families) {
    std::vector<std::pair<Labels, Value>> rows;
    for (const auto& p : m.params)
      if (p.now.table_rows != 0) rows.push_back({{{"segment", s.segment}, {"param", p.now.name}}, f.value(p)});
    if (!rows.empty()) e.family(f.name, f.type, f.help, rows);
  }
  // Tables with keys = "u64" only.
  const std::vector<Family<P>> key_families{
      {"shmps_table_keys_held", "gauge", "keys holding a slot of the table now", [](const P& p) { return Value(p.now.keys_held); }},
      {"shmps_table_keys_admitted_total", "counter", "keys given a slot", [](const P& p) { return Value(p.now.keys_admitted); }},
      {"shmps_table_keys_evicted_total", "counter", "keys evicted to make room (the least recently updated)",
       [](const P& p) { return Value(p.now.keys_evicted); }},
      {"shmps_table_keys_refused_rows_total", "counter", "pushed rows dropped because their key was not admitted",
       [](const P& p) { return Value(p.now.keys_refused_rows); }},
  };
  for (const auto& f : key_families) {
    std::vector<std::pair<Labels, Value>> rows;
    for (const auto& p : m.params)
      if (p.now.keyed) rows.push_back({{{"segment", s.segment}, {"param", p.now.name}}, f.value(p)});
    if (!rows.empty()) e.family(f.name, f.type, f.help, rows);
  }
  return e.take();
}

}  // namespace shmps::top
