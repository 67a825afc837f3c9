// shmps-top: a live view of one shmps job, in the manner of htop.
//
//   shmps-top NAME                    terminal UI, refreshed every --interval (1 s)
//   shmps-top NAME --once             one plain-text snapshot
//   shmps-top NAME --json             one JSON document (schema in docs/monitoring.md)
//   shmps-top NAME --prometheus       the Prometheus text exposition format
//   shmps-top NAME --listen HOST:PORT serve it over HTTP at /metrics (port 0: any free port)
//
// The snapshots take two samples --interval apart (0.2 s by default) so that rates mean something.
//
// Safety: the segment is mapped read-only and no lock is ever taken (the lock files are only
// probed), so the monitor can never corrupt or block the job; it creates no file, so killing it at
// any moment leaves nothing behind.
#include <clocale>
#include <cmath>
#include <iostream>
#include <optional>
#include <thread>

#include <CLI/CLI.hpp>

#include <shmps/error.hpp>
#include <shmps/shm/names.hpp>

#include "metrics.hpp"
#include "modes.hpp"
#include "render.hpp"
#include "sample.hpp"

using namespace shmps;
using namespace shmps::top;

namespace {

// "127.0.0.1:9184", "[::1]:9184", "0.0.0.0:9184" (every address: only when asked for), and
// ":9184" or "9184", which mean 127.0.0.1: the metrics name the job's parameters and workers, so
// they are served to this machine only unless an address says otherwise (SECURITY.md).
bool parse_listen(const std::string& text, std::string& host, int& port) {
  const auto colon = text.rfind(':');
  host = colon == std::string::npos ? "" : text.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host.empty()) host = "127.0.0.1";
  const std::string digits = colon == std::string::npos ? text : text.substr(colon + 1);
  if (digits.empty() || digits.size() > 5 || digits.find_first_not_of("0123456789") != std::string::npos) return false;
  port = std::stoi(digits);
  return port <= 65535;
}

std::chrono::milliseconds millis(double seconds) {
  return std::chrono::milliseconds(static_cast<long long>(std::llround(seconds * 1000)));
}

}  // namespace

int main(int argc, char** argv) {
  std::setlocale(LC_ALL, "");  // the terminal's encoding: UTF-8 block characters or ASCII
  CLI::App app{"shmps-top: a live view of a shmps job (terminal UI, text, JSON or Prometheus)"};
  std::string name, listen;
  bool once = false, json = false, prometheus = false;
  std::optional<double> interval;
  app.add_option("name", name, "segment name (see `shmps-ctl list`)")->required();
  auto* once_opt = app.add_flag("--once", once, "print one plain-text snapshot and exit");
  auto* json_opt = app.add_flag("--json", json, "print one JSON document and exit");
  auto* prom_opt = app.add_flag("--prometheus", prometheus, "print the Prometheus text exposition format and exit");
  auto* listen_opt = app.add_option("--listen", listen, "serve the Prometheus metrics over HTTP at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1; 0.0.0.0 serves every address)");
  once_opt->excludes(json_opt, prom_opt, listen_opt);
  json_opt->excludes(prom_opt, listen_opt);
  prom_opt->excludes(listen_opt);
  app.add_option("--interval", interval,
                 "seconds between two samples (terminal UI: 1; --once, --json, --prometheus: 0.2)")
      ->check(CLI::Range(0.05, 3600.0));
  CLI11_PARSE(app, argc, argv);

  try {
    shm::check_segment_name(name);
    std::string host;
    int port = 0;
    if (!listen.empty() && !parse_listen(listen, host, port))
      throw Error("--listen " + listen + ": expected [HOST:]PORT (e.g. 9184 or :9184 for 127.0.0.1:9184, [::1]:9184, 0.0.0.0:9184 for every address)");

    Source source(name);
    Sample first = source.sample();
    // A segment that is not there, or not usable by this build, is an error at the start (later,
    // the long-running modes wait for it instead).
    if (first.presence == Presence::missing || first.presence == Presence::unreadable) throw Error(first.problem);

    if (once || json || prometheus) {
      std::this_thread::sleep_for(millis(interval.value_or(0.2)));
      const Sample second = source.sample();
      const Metrics m = compute_metrics(&first, second);
      std::cout << (json ? render_json(m) : prometheus ? render_prometheus(m) : render_text(m)) << std::flush;
      return second.presence == Presence::missing || second.presence == Presence::unreadable ? 1 : 0;
    }
    if (!listen.empty()) return serve_http(source, host, port, std::chrono::seconds(1));
    return run_tui(source, millis(interval.value_or(1.0)));
  } catch (const std::exception& e) {
    std::cerr << "shmps-top: error: " << e.what() << "\n";
    return 1;
  }
}
