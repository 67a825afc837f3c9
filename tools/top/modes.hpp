// The long-running modes of shmps-top. Both keep following the segment: a server that dies, a
// segment that goes away or is made again, and a new epoch are shown, never fatal.
#pragma once

#include <chrono>
#include <string>

#include "sample.hpp"

namespace shmps::top {

// The terminal UI; returns the exit code. `interval` is the time between two samples.
int run_tui(Source& source, std::chrono::milliseconds interval);

// Serves GET /metrics (Prometheus text format, one sample per scrape, cached at most `max_age`)
// and GET / on host:port (port 0: any free port). Prints the address it serves, then runs until
// SIGINT/SIGTERM. Returns the exit code.
int serve_http(Source& source, const std::string& host, int port, std::chrono::milliseconds max_age);

}  // namespace shmps::top
