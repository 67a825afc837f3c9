#include "table.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "format.hpp"

namespace shmps::top {

namespace {

double num(const std::optional<double>& v) { return v.value_or(-1.0); }
double num(std::uint64_t v) { return static_cast<double>(v); }

template <class Row>
void sort_by(const std::vector<Column<Row>>& columns, std::vector<Row>& rows, std::size_t sort, bool descending) {
  if (sort >= columns.size()) return;
  const Column<Row>& c = columns[sort];
  auto key = [&](const Row& r) {  // NaN would break the ordering: it sorts first
    const double v = c.key(r);
    return std::isnan(v) ? -std::numeric_limits<double>::infinity() : v;
  };
  std::stable_sort(rows.begin(), rows.end(), [&](const Row& a, const Row& b) {
    if (c.key) return descending ? key(b) < key(a) : key(a) < key(b);
    return descending ? c.cell(b) < c.cell(a) : c.cell(a) < c.cell(b);
  });
}

template <class Row>
TextTable layout_text(const std::vector<Column<Row>>& columns, const std::vector<Row>& rows) {
  std::vector<std::vector<std::string>> cells(rows.size());
  std::vector<std::size_t> width(columns.size());
  for (std::size_t j = 0; j < columns.size(); ++j) width[j] = columns[j].title.size();
  for (std::size_t i = 0; i < rows.size(); ++i)
    for (std::size_t j = 0; j < columns.size(); ++j) {
      cells[i].push_back(printable(columns[j].cell(rows[i])));
      width[j] = std::max(width[j], cells[i][j].size());
    }
  auto line = [&](auto text_of) {
    std::string out;
    for (std::size_t j = 0; j < columns.size(); ++j) {
      const std::string text = text_of(j);
      const std::string pad(width[j] - std::min(width[j], text.size()), ' ');
      if (j) out += "  ";
      out += columns[j].left ? text + (j + 1 < columns.size() ? pad : "") : pad + text;
    }
    return out;
  };
  TextTable t;
  t.header = line([&](std::size_t j) { return columns[j].title; });
  for (std::size_t i = 0; i < rows.size(); ++i) t.lines.push_back(line([&](std::size_t j) { return cells[i][j]; }));
  return t;
}

}  // namespace

const std::vector<Column<WorkerMetrics>>& worker_columns() {
  using W = WorkerMetrics;
  static const std::vector<Column<W>> columns{
      {"RANK", false, [](const W& w) { return std::to_string(w.now.rank); }, [](const W& w) { return num(w.now.rank); }},
      {"STATE", true, [](const W& w) { return w.now.status; }, {}},
      {"PID", false, [](const W& w) { return w.now.pid ? std::to_string(w.now.pid) : "-"; },
       [](const W& w) { return static_cast<double>(w.now.pid); }},
      {"GEN", false, [](const W& w) { return std::to_string(w.now.generation); }, [](const W& w) { return num(w.now.generation); }},
      {"CLOCK", false, [](const W& w) { return std::to_string(w.now.clock); }, [](const W& w) { return num(w.now.clock); }},
      {"PUSHES", false, [](const W& w) { return std::to_string(w.now.published); }, [](const W& w) { return num(w.now.published); }},
      {"PUSH/S", false, [](const W& w) { return opt(w.pushes_per_s, human_count); }, [](const W& w) { return num(w.pushes_per_s); }},
      {"PUSH B/S", false, [](const W& w) { return opt(w.push_bytes_per_s, human_bytes); },
       [](const W& w) { return num(w.push_bytes_per_s); }},
      {"PULLS", false, [](const W& w) { return std::to_string(w.now.pulls); }, [](const W& w) { return num(w.now.pulls); }},
      {"PULL/S", false, [](const W& w) { return opt(w.pulls_per_s, human_count); }, [](const W& w) { return num(w.pulls_per_s); }},
      {"PULL B/S", false, [](const W& w) { return opt(w.pull_bytes_per_s, human_bytes); },
       [](const W& w) { return num(w.pull_bytes_per_s); }},
      {"STALE", false, [](const W& w) { return std::to_string(w.now.last_staleness) + "/" + std::to_string(w.now.max_staleness); },
       [](const W& w) { return num(w.now.last_staleness); }},
      {"WAIT%", false, [](const W& w) { return opt(w.wait_fraction, percent); }, [](const W& w) { return num(w.wait_fraction); }},
      {"BKPR%", false, [](const W& w) { return opt(w.backpressure_fraction, percent); },
       [](const W& w) { return num(w.backpressure_fraction); }},
      {"HEARTBEAT", false, [](const W& w) { return opt(w.heartbeat_age_s, human_duration); },
       [](const W& w) { return num(w.heartbeat_age_s); }},
      {"REJ", false, [](const W& w) { return std::to_string(w.now.pushes_rejected); },
       [](const W& w) { return num(w.now.pushes_rejected); }},
      {"RING", false, [](const W& w) { return human_bytes(static_cast<double>(w.ring_depth)); },
       [](const W& w) { return num(w.ring_depth); }},
      {"RING%", false, [](const W& w) { return percent(w.ring_fill); }, [](const W& w) { return w.ring_fill; }},
      {"APPLIED", false, [](const W& w) { return std::to_string(w.now.applied); }, [](const W& w) { return num(w.now.applied); }},
  };
  return columns;
}

const std::vector<Column<ParamMetrics>>& param_columns() {
  using P = ParamMetrics;
  static const std::vector<Column<P>> columns{
      {"NAME", true, [](const P& p) { return p.now.name; }, {}},
      {"SHAPE", true, [](const P& p) { return shape_text(p.now.shape); }, [](const P& p) { return num(p.now.elements); }},
      {"VERSION", false, [](const P& p) { return range_text(p.now.version_min, p.now.version_max); },
       [](const P& p) { return num(p.now.version_min); }},
      {"CLOCK", false, [](const P& p) { return range_text(p.now.clock_min, p.now.clock_max); },
       [](const P& p) { return num(p.now.clock_min); }},
      {"UPD/S", false, [](const P& p) { return opt(p.updates_per_s, human_count); }, [](const P& p) { return num(p.updates_per_s); }},
      {"PUSH/S", false, [](const P& p) { return opt(p.pushes_per_s, human_count); }, [](const P& p) { return num(p.pushes_per_s); }},
      {"PUSHES", false, [](const P& p) { return std::to_string(p.now.pushes); }, [](const P& p) { return num(p.now.pushes); }},
      // Tables: rows updated per second, and the distinct rows of the newest round.
      {"ROWS/S", false, [](const P& p) { return p.now.table_rows ? opt(p.rows_per_s, human_count) : std::string("-"); },
       [](const P& p) { return num(p.rows_per_s); }},
      {"RND ROWS", false, [](const P& p) { return p.now.table_rows ? std::to_string(p.now.round_rows) : std::string("-"); },
       [](const P& p) { return num(p.now.round_rows); }},
      {"GRAD NORM", false, [](const P& p) { return fixed(p.grad_norm, 4); }, [](const P& p) { return p.grad_norm; }},
      {"NORM", false, [](const P& p) { return fixed(p.value_norm, 4); }, [](const P& p) { return p.value_norm; }},
      {"REJ", false, [](const P& p) { return std::to_string(p.now.rejected); }, [](const P& p) { return num(p.now.rejected); }},
  };
  return columns;
}

void sort_rows(std::vector<WorkerMetrics>& rows, std::size_t sort, bool descending) {
  sort_by(worker_columns(), rows, sort, descending);
}
void sort_rows(std::vector<ParamMetrics>& rows, std::size_t sort, bool descending) {
  sort_by(param_columns(), rows, sort, descending);
}
TextTable layout(const std::vector<WorkerMetrics>& rows) { return layout_text(worker_columns(), rows); }
TextTable layout(const std::vector<ParamMetrics>& rows) { return layout_text(param_columns(), rows); }

}  // namespace shmps::top
