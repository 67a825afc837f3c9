// --json: one JSON document (schema "shmps-top/1", described in docs/monitoring.md). Absent values (a rate
// without a previous sample, an age of something that never happened) are null.
#include <charconv>
#include <cstdlib>

#include <nlohmann/json.hpp>

#include <shmps/shm/names.hpp>

#include "render.hpp"

namespace shmps::top {

namespace {

using json = nlohmann::ordered_json;  // keys in the order written here (docs/monitoring.md's order)

json value(const std::optional<double>& v) { return v ? json(*v) : json(nullptr); }

// A float setting as the decimal it was written as (0.9, not 0.8999999761581421).
double decimal(float f) {
  char buf[64];
  const auto end = std::to_chars(buf, buf + sizeof buf, f).ptr;
  return std::strtod(std::string(buf, end).c_str(), nullptr);
}

// [{"group", "first_rank", "ranks", "clock", "steps", "records", "discarded"}], group 0 first.
// [{"group", "home_slices", "in_flight", "lag_s", "oldest_in_flight_s"}]: the other groups.
json peers_json(const Sample& s, const Metrics& m) {
  json out = json::array();
  for (std::size_t i = 0; i < s.peers.size(); ++i)
    out.push_back({{"group", s.peers[i].group},
                   {"home_slices", s.peers[i].home_slices},
                   {"in_flight", s.peers[i].in_flight},
                   {"lag_s", i < m.peers.size() ? value(m.peers[i].lag_s) : json(nullptr)},
                   {"oldest_in_flight_s", i < m.peers.size() ? value(m.peers[i].oldest_in_flight_s) : json(nullptr)}});
  return out;
}

// Server groups: null without them.
json server_groups_json(const Sample& s, const Metrics& m) {
  if (s.server_groups < 2) return nullptr;
  return {{"group", s.server_group},
          {"of", s.server_groups},
          {"home_slices", s.home_slices},
          {"sync",
           {{"rounds", s.sync_rounds},
            {"deltas_sent", s.sync_sent},
            {"answers_taken", s.sync_taken},
            {"in_flight", s.sync_in_flight},
            {"deltas_added", s.sync_added},
            {"duplicates_answered", s.sync_duplicates},
            {"bytes_sent", s.sync_bytes},
            {"last_age_s", value(m.sync_age_s)}}},
          {"peers", peers_json(s, m)}};
}

json groups_json(const Sample& s) {
  json groups = json::array();
  for (std::size_t g = 0; g < s.groups.size(); ++g)
    groups.push_back({{"group", g},
                      {"first_rank", g * s.workers_per_group},
                      {"ranks", std::min<std::uint64_t>(s.workers_per_group, s.max_workers - g * s.workers_per_group)},
                      {"clock", s.groups[g].clock},
                      {"steps", s.groups[g].steps},
                      {"records", s.groups[g].records},
                      {"discarded", s.groups[g].discarded}});
  return groups;
}

json worker_json(const WorkerMetrics& w) {
  const SlotSample& s = w.now;
  return {
      {"rank", s.rank},
      {"group", s.group},
      {"state", s.status},
      {"pid", s.pid},
      {"generation", s.generation},
      {"clock", s.clock},
      {"pushes", s.published},
      {"pushes_per_s", value(w.pushes_per_s)},
      {"push_bytes", s.push_bytes},
      {"push_bytes_per_s", value(w.push_bytes_per_s)},
      {"pulls", s.pulls},
      {"pulls_per_s", value(w.pulls_per_s)},
      {"pull_bytes", s.pull_bytes},
      {"pull_bytes_per_s", value(w.pull_bytes_per_s)},
      {"applied", s.applied},
      {"pushes_rejected", s.pushes_rejected},
      {"last_staleness", s.last_staleness},
      {"max_staleness", s.max_staleness},
      {"wait_ns", s.wait_ns},
      {"wait_fraction", value(w.wait_fraction)},
      {"backpressure_ns", s.backpressure_ns},
      {"backpressure_fraction", value(w.backpressure_fraction)},
      {"heartbeat_age_s", value(w.heartbeat_age_s)},
      {"ring_depth_bytes", w.ring_depth},
      {"ring_capacity_bytes", s.ring_capacity},
      {"ring_fill", w.ring_fill},
  };
}

json param_json(const ParamMetrics& p) {
  const ParamSample& s = p.now;
  json out = {
      {"name", s.name},
      {"shape", s.shape},
      {"elements", s.elements},
      {"slices", s.slices},
      {"version_min", s.version_min},
      {"version_max", s.version_max},
      {"clock_min", s.clock_min},
      {"clock_max", s.clock_max},
      {"updates", s.slice_updates},
      {"updates_per_s", value(p.updates_per_s)},
      {"pushes", s.pushes},
      {"pushes_per_s", value(p.pushes_per_s)},
      {"floats_applied", s.floats_applied},
      {"grad_norm", p.grad_norm},
      {"norm", p.value_norm},
      {"rejected", s.rejected},
  };
  if (s.table_rows != 0) {
    json hottest = json::array();
    for (const auto& h : s.hottest) hottest.push_back({{"first_row", h.first_row}, {"last_row", h.last_row}, {"updates", h.updates}});
    out["table"] = {{"rows", s.table_rows},          {"dim", s.table_dim},
                    {"rows_updated", s.rows_updated}, {"rows_per_s", value(p.rows_per_s)},
                    {"round_rows", s.round_rows},     {"hottest_slices", hottest},
                    {"optimizer", {{"kind", s.optimizer}, {"lr", decimal(s.optimizer_lr)}}}};
    if (s.keyed)
      out["table"]["keys"] = {{"kind", "u64"},          {"admit_after", s.admit_after},
                              {"held", s.keys_held},     {"admitted", s.keys_admitted},
                              {"evicted", s.keys_evicted}, {"refused_rows", s.keys_refused_rows}};
  }
  return out;
}

}  // namespace

std::string render_json(const Metrics& m) {
  const Sample& s = m.now;
  json doc{
      {"schema", "shmps-top/1"},
      {"segment", s.segment},
      {"path", shm::segment_path(s.segment)},
      {"presence", presence_name(s.presence)},
      {"problem", s.problem.empty() ? json(nullptr) : json(s.problem)},
      {"taken_unix_ns", s.unix_ns},
      {"interval_s", value(m.interval_s)},
  };
  json server{{"alive", s.server_alive}};
  if (s.presence != Presence::ready) {
    doc["server"] = server;
    doc["job"] = nullptr;
    doc["apply"] = nullptr;
    doc["checkpoints"] = nullptr;
    doc["workers"] = json::array();
    doc["params"] = json::array();
    return doc.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
  }
  server["pid"] = s.server_pid;
  server["epoch"] = s.epoch;
  server["started_unix_ns"] = s.server_started_unix_ns;
  server["uptime_s"] = value(m.uptime_s);
  server["heartbeat_age_s"] = value(m.server_heartbeat_age_s);
  doc["server"] = server;
  doc["job"] = {
      {"state", s.state},
      {"size_bytes", s.total_bytes},
      {"layout_version", s.layout_version},
      {"created_unix_ns", s.created_unix_ns},
      {"max_workers", s.max_workers},
      {"workers_alive", m.workers_alive},
      {"slices", s.slice_count},
      {"slice_bytes", s.slice_floats * sizeof(float)},
      {"ring_bytes", s.ring_bytes},
      {"consistency",
       {{"mode", std::string(to_string(s.consistency))},
        {"staleness", s.staleness},
        {"bsp_aggregate", std::string(to_string(s.bsp_aggregate))},
        {"on_worker_death", std::string(to_string(s.on_worker_death))},
        {"straggler_timeout_ms", s.straggler_timeout_ms},
        {"stragglers_evicted", s.stragglers_evicted},
        {"model_clock", s.model_clock},
        {"steps", s.steps}}},
      {"workers_per_group", s.workers_per_group},
      {"groups", groups_json(s)},
      {"server_groups", server_groups_json(s, m)},
      {"optimizer",
       {{"kind", std::string(to_string(s.optimizer.kind))},
        {"lr", decimal(s.optimizer.lr)},
        {"momentum", decimal(s.optimizer.momentum)},
        {"weight_decay", decimal(s.optimizer.weight_decay)},
        {"clip_value", decimal(s.optimizer.clip_value)},
        {"clip_norm", decimal(s.optimizer.clip_norm)},
        {"state_dtype", std::string(to_string(s.optimizer.state_dtype))}}},
  };
  doc["apply"] = {
      {"records_applied", s.records_applied},
      {"records_per_s", value(m.records_per_s)},
      {"floats_applied", s.floats_applied},
      {"floats_per_s", value(m.floats_per_s)},
      {"rounds", s.apply_rounds},
      {"records_skipped", s.records_skipped},
      {"records_discarded", s.records_discarded},
      {"busy_ns", s.apply_busy_ns},
      {"busy_fraction", value(m.apply_busy_fraction)},
      {"latency",
       {{"window", m.latency.window},
        {"samples", m.latency.samples},
        {"p50_ns", value(m.latency.p50_ns)},
        {"p99_ns", value(m.latency.p99_ns)},
        {"buckets", s.latency_buckets}}},
  };
  doc["checkpoints"] = {
      {"count", s.checkpoints},
      {"failures", s.checkpoint_failures},
      {"last_unix_ns", s.last_checkpoint_unix_ns},
      {"last_age_s", value(m.checkpoint_age_s)},
      {"last_duration_s", value(m.checkpoint_duration_s)},
      {"last_clock", s.last_checkpoint_clock},
  };
  json workers = json::array();
  for (const auto& w : m.workers) workers.push_back(worker_json(w));
  doc["workers"] = std::move(workers);
  json params = json::array();
  for (const auto& p : m.params) params.push_back(param_json(p));
  doc["params"] = std::move(params);
  return doc.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
}

}  // namespace shmps::top
