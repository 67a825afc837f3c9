// --listen HOST:PORT: the Prometheus metrics over HTTP (cpp-httplib), for scraping.
//
//   GET /metrics   the text exposition format: one fresh sample per scrape, or the previous
//                  scrape's answer if it is younger than max_age (1 s)
//   GET /          a short text saying what is served
//
// Rates and the latency quantiles are over the time since the previous scrape.
#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <iostream>
#include <mutex>
#include <optional>
#include <thread>

#include <httplib.h>

#include "metrics.hpp"
#include "modes.hpp"
#include "render.hpp"

namespace shmps::top {

namespace {

class MetricsCache {
 public:
  MetricsCache(Source& source, std::chrono::milliseconds max_age) : source_(source), max_age_(max_age) {}

  std::string get() {
    std::lock_guard lock(mutex_);
    const auto now = std::chrono::steady_clock::now();
    if (!text_.empty() && now - taken_ < max_age_) return text_;
    Sample s = source_.sample();
    text_ = render_prometheus(compute_metrics(previous_ ? &*previous_ : nullptr, s));
    previous_ = std::move(s);
    taken_ = now;
    return text_;
  }

 private:
  std::mutex mutex_;
  Source& source_;
  std::chrono::milliseconds max_age_;
  std::optional<Sample> previous_;
  std::string text_;
  std::chrono::steady_clock::time_point taken_{};
};

}  // namespace

int serve_http(Source& source, const std::string& host, int port, std::chrono::milliseconds max_age) {
  // SIGINT and SIGTERM go to one thread that stops the server; block them everywhere else
  // (httplib's threads inherit this mask).
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  MetricsCache cache(source, max_age);
  httplib::Server server;
  server.Get("/metrics", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(cache.get(), "text/plain; version=0.0.4; charset=utf-8");
  });
  server.Get("/", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content("shmps-top: metrics of shmps segment '" + source.name() +
                        "' in the Prometheus text format at /metrics\n",
                    "text/plain; charset=utf-8");
  });

  int bound = port;
  if (port == 0) {
    bound = server.bind_to_any_port(host);
  } else if (!server.bind_to_port(host, port)) {
    bound = -1;
  }
  if (bound <= 0) {
    std::cerr << "shmps-top: error: cannot listen on " << host << ":" << port
              << " (address in use, or not an address of this machine)\n";
    return 1;
  }
  const bool v6 = host.find(':') != std::string::npos;
  std::cout << "shmps-top: serving http://" << (v6 ? "[" + host + "]" : host) << ":" << bound << "/metrics for segment '"
            << source.name() << "'" << std::endl;

  // A stop before listen_after_bind() runs would be lost: stop until the listening has ended.
  std::atomic<bool> ended{false};
  std::thread stopper([&] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    while (!ended) {
      server.stop();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  const bool ok = server.listen_after_bind();
  ended = true;
  pthread_kill(stopper.native_handle(), SIGTERM);  // if it still waits (the server stopped on its own)
  stopper.join();
  if (!ok) {
    std::cerr << "shmps-top: error: the HTTP server on " << host << ":" << bound << " stopped\n";
    return 1;
  }
  return 0;
}

}  // namespace shmps::top
