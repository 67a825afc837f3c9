// The non-interactive views of a Metrics: plain text (--once), JSON (--json, its schema is in
// docs/monitoring.md) and the Prometheus text exposition format (--prometheus, and /metrics of --listen).
#pragma once

#include <string>
#include <vector>

#include "metrics.hpp"

namespace shmps::top {

std::string render_text(const Metrics& m);
std::string render_json(const Metrics& m);        // one JSON document, pretty-printed, with a final newline
std::string render_prometheus(const Metrics& m);  // text format 0.0.4

// The header block (segment, server, job, apply, checkpoints), shared with the terminal UI.
std::vector<std::string> summary_lines(const Metrics& m);

}  // namespace shmps::top
