// shmps-top, the live monitor, against real jobs: its JSON and Prometheus snapshots, the HTTP
// /metrics endpoint, the terminal UI driven through tmux, and its safety (a read-only mapping,
// nothing left behind when it is killed, no harm to the job, a server that dies and comes back).
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include <shmps/shm/layout.hpp>
#include <shmps/shm/names.hpp>

#include "../support/exact.hpp"
#include "../support/expect.hpp"
#include "../support/harness.hpp"
#include "../support/pattern.hpp"

using namespace std::chrono_literals;
using nlohmann::json;
using shmps::test::Job;
using shmps::test::Process;
using shmps::test::Ran;
using shmps::test::run;
using shmps::test::Watchdog;
namespace shm = shmps::shm;

namespace {

// A job of pattern_spec() ("w" [3, 40000], "b" [7]) whose rank 0 has pushed `pushes` patterns
// (push k goes to "b" when k % 3 == 2) and left.
constexpr std::uint64_t kPushes = 40;
std::uint64_t pushes_to_b(std::uint64_t pushes) {
  std::uint64_t n = 0;
  for (std::uint64_t k = 0; k < pushes; ++k)
    n += std::string(shmps::test::plan_push(0, k, shmps::test::kPatternW, shmps::test::kPatternB).param) == "b";
  return n;
}

void start_job_with_pushes(Job& job) {
  job.start_server();
  job.wait_ready();
  Process& pusher = job.start({"shmps-test-pusher", "exact", "--pushes", std::to_string(kPushes)}, {{"SHMPS_RANK", "0"}});
  ASSERT_EQ(pusher.wait(20s), 0) << pusher.output();
}

// Polls `ok` every 50 ms until it holds or `limit` passes.
bool eventually(const std::function<bool()>& ok, std::chrono::milliseconds limit = 5s) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (ok()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return ok();
}

// ---------------------------------------------------------------------------------------------
// A strict parser of the Prometheus text exposition format (what shmps-top must produce): every
// line a comment or `name{label="value",...} value`; names [a-zA-Z_:][a-zA-Z0-9_:]*; every family
// announced by HELP and TYPE before its samples, its samples adjacent; counters end in _total.
struct Exposition {
  std::map<std::string, double> values;        // "name{a=x,b=y}" (labels sorted) -> value
  std::map<std::string, std::string> types;    // family -> type
  std::vector<std::string> errors;
};

bool valid_name(const std::string& s, bool colon_ok) {
  if (s.empty()) return false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool ok = std::isalpha(static_cast<unsigned char>(c)) || c == '_' || (colon_ok && c == ':') ||
                    (i > 0 && std::isdigit(static_cast<unsigned char>(c)));
    if (!ok) return false;
  }
  return true;
}

std::string series_key(const std::string& name, const std::map<std::string, std::string>& labels) {
  std::string key = name + "{";
  bool first = true;
  for (const auto& [k, v] : labels) {
    key += (first ? "" : ",") + k + "=" + v;
    first = false;
  }
  return key + "}";
}

Exposition parse_exposition(const std::string& text, const std::string& segment) {
  Exposition e;
  std::set<std::string> helped, finished;
  std::string current;  // the family whose samples are being read
  std::istringstream in(text);
  int number = 0;
  for (std::string line; std::getline(in, line);) {
    ++number;
    auto error = [&](const std::string& what) { e.errors.push_back("line " + std::to_string(number) + ": " + what + ": " + line); };
    if (line.empty()) continue;
    if (line[0] == '#') {
      std::istringstream words(line);
      std::string hash, kind, name, rest;
      words >> hash >> kind >> name;
      if (kind != "HELP" && kind != "TYPE") continue;  // a plain comment
      if (!valid_name(name, true)) error("bad metric name in " + kind);
      if (kind == "HELP") {
        std::getline(words, rest);
        if (rest.size() < 2) error("empty HELP");
        if (helped.count(name)) error("second HELP for " + name);
        helped.insert(name);
      } else {
        words >> rest;
        if (rest != "counter" && rest != "gauge" && rest != "histogram" && rest != "summary" && rest != "untyped")
          error("bad TYPE " + rest);
        if (!helped.count(name)) error("TYPE before HELP for " + name);
        if (e.types.count(name)) error("second TYPE for " + name);
        e.types[name] = rest;
        if (rest == "counter" && name.size() < 6) error("counter " + name);
        if (rest == "counter" && name.substr(name.size() - 6) != "_total") error("counter not ending in _total");
      }
      continue;
    }
    // name{labels} value
    std::size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    const std::string name = line.substr(0, i);
    if (!valid_name(name, true)) error("bad metric name");
    if (name.rfind("shmps_", 0) != 0) error("name without the shmps_ prefix");
    std::map<std::string, std::string> labels;
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        std::size_t eq = line.find('=', i);
        if (eq == std::string::npos) {
          error("label without '='");
          break;
        }
        const std::string label = line.substr(i, eq - i);
        if (!valid_name(label, false)) error("bad label name '" + label + "'");
        if (eq + 1 >= line.size() || line[eq + 1] != '"') {
          error("label value not quoted");
          break;
        }
        std::string value;
        std::size_t j = eq + 2;
        for (; j < line.size() && line[j] != '"'; ++j) {
          if (line[j] == '\\' && j + 1 < line.size()) {
            ++j;
            value += line[j] == 'n' ? '\n' : line[j];
            if (line[j] != 'n' && line[j] != '\\' && line[j] != '"') error("bad escape");
          } else {
            value += line[j];
          }
        }
        if (j >= line.size()) {
          error("unterminated label value");
          break;
        }
        if (labels.count(label)) error("label twice");
        labels[label] = value;
        i = j + 1;
        if (i < line.size() && line[i] == ',') ++i;
      }
      if (i >= line.size() || line[i] != '}') {
        error("no closing brace");
        continue;
      }
      ++i;
    }
    if (i >= line.size() || line[i] != ' ') {
      error("no space before the value");
      continue;
    }
    const std::string number_text = line.substr(i + 1);
    double value = 0;
    if (number_text == "NaN") value = std::nan("");
    else if (number_text == "+Inf") value = HUGE_VAL;
    else if (number_text == "-Inf") value = -HUGE_VAL;
    else {
      char* end = nullptr;
      value = std::strtod(number_text.c_str(), &end);
      if (number_text.empty() || *end != '\0') error("bad value '" + number_text + "'");
    }
    if (!helped.count(name) || !e.types.count(name)) error("sample before its HELP and TYPE");
    if (name != current) {
      if (finished.count(name)) error("samples of " + name + " not adjacent");
      if (!current.empty()) finished.insert(current);
      current = name;
    }
    if (labels["segment"] != segment) error("segment label is not '" + segment + "'");
    const std::string key = series_key(name, labels);
    if (e.values.count(key)) error("series twice");
    e.values[key] = value;
  }
  return e;
}

// The value of a series (the segment label is added), or NaN if it is missing.
double metric(const Exposition& e, const std::string& segment, const std::string& name,
              std::map<std::string, std::string> labels = {}) {
  labels["segment"] = segment;
  const auto it = e.values.find(series_key(name, labels));
  return it == e.values.end() ? std::nan("") : it->second;
}

// ---------------------------------------------------------------------------------------------
// HTTP: a tiny client (GET, HTTP/1.1 with Connection: close) and the monitor's --listen mode.
struct HttpReply {
  int status = 0;
  std::string headers, body;
};

HttpReply http_get(int port, const std::string& path) {
  HttpReply reply;
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return reply;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return reply;
  }
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(request.size())) {
    ::close(fd);
    return reply;
  }
  std::string raw;
  char buf[4096];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) raw.append(buf, static_cast<std::size_t>(n));
  ::close(fd);
  const auto split = raw.find("\r\n\r\n");
  if (split == std::string::npos || raw.rfind("HTTP/1.", 0) != 0) return reply;
  reply.status = std::atoi(raw.c_str() + raw.find(' ') + 1);
  reply.headers = raw.substr(0, split);
  reply.body = raw.substr(split + 4);
  return reply;
}

// shmps-top NAME --listen 127.0.0.1:0, and the port it says it serves.
struct Listener {
  Process* process = nullptr;
  int port = 0;
};

Listener start_listener(Job& job) {
  Listener l;
  l.process = &job.start({"shmps-top", job.name(), "--listen", "127.0.0.1:0"});
  const std::string marker = "serving http://127.0.0.1:";
  eventually([&] { return shmps::test::has(l.process->output(), marker); });
  const std::string out = l.process->output();
  const auto at = out.find(marker);
  if (at != std::string::npos) l.port = std::atoi(out.c_str() + at + marker.size());
  return l;
}

Exposition scrape(const Listener& l, const std::string& segment) {
  const HttpReply r = http_get(l.port, "/metrics");
  Exposition e;
  if (r.status != 200) {
    e.errors.push_back("GET /metrics: status " + std::to_string(r.status));
    return e;
  }
  e = parse_exposition(r.body, segment);
  if (!shmps::test::has(r.headers, "text/plain; version=0.0.4")) e.errors.push_back("content type: " + r.headers);
  return e;
}

// The permissions of the process's mappings of `path` ("r--s", ...), one per mapping.
std::vector<std::string> mapping_permissions(pid_t pid, const std::string& path) {
  std::vector<std::string> perms;
  std::ifstream maps("/proc/" + std::to_string(pid) + "/maps");
  for (std::string line; std::getline(maps, line);) {
    std::istringstream fields(line);
    std::string range, perm, offset, dev, inode, file;
    fields >> range >> perm >> offset >> dev >> inode >> file;
    if (file == path) perms.push_back(perm);
  }
  return perms;
}

// The files of segment `name` in /dev/shm, with their inodes.
std::map<std::string, std::uint64_t> segment_files(const std::string& name) {
  std::map<std::string, std::uint64_t> files;
  const std::string prefix = std::string(shm::kShmPrefix) + name;
  for (const auto& entry : std::filesystem::directory_iterator(shm::kShmDir)) {
    const std::string file = entry.path().filename().string();
    if (file.rfind(prefix, 0) != 0) continue;
    struct stat st {};
    ::stat(entry.path().c_str(), &st);
    files[file] = st.st_ino;
  }
  return files;
}

// ---------------------------------------------------------------------------------------------
// tmux, on a server of our own (-L), killed however the test ends.
bool have_tmux() { return std::system("command -v tmux >/dev/null 2>&1") == 0; }

class Tmux {
 public:
  Tmux() : socket_("shmps-test-" + std::to_string(::getpid())), session_("top") {}
  ~Tmux() { tmux({"kill-server"}); }
  Tmux(const Tmux&) = delete;
  Tmux& operator=(const Tmux&) = delete;

  Ran tmux(std::vector<std::string> args) const {
    std::vector<std::string> argv{"/usr/bin/env", "tmux", "-L", socket_};
    argv.insert(argv.end(), args.begin(), args.end());
    return run(argv, 10s);
  }
  // Starts `command` in a detached 120x40 window; the pane stays after it exits (its status).
  Ran start(const std::string& command) const {
    return tmux({"new-session", "-d", "-s", session_, "-x", "120", "-y", "40", command, ";", "set-option", "-t", session_,
                 "remain-on-exit", "on"});
  }
  // Runs `command` again in the (dead) pane.
  Ran respawn(const std::string& command) const { return tmux({"respawn-pane", "-k", "-t", session_, command}); }
  std::string screen() const { return tmux({"capture-pane", "-p", "-t", session_}).out; }
  std::string pane(const std::string& format) const {
    std::string out = tmux({"display-message", "-p", "-t", session_, format}).out;
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    return out;
  }
  // The exit status of the pane's process `pid` once it has ended: "0", "signal N", or "" if it
  // still runs after 5 s. tmux may mark the pane dead long before it reaps the process; a zombie's
  // exit status is in field 52 of its /proc/<pid>/stat.
  std::string exit_status(pid_t pid) const {
    std::string status;
    eventually([&] {
      if (pane("#{pane_dead}") == "1" && !(status = pane("#{pane_dead_status}")).empty()) return true;
      std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
      const std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      const auto paren = stat.rfind(')');
      if (paren == std::string::npos) return false;
      std::istringstream fields(stat.substr(paren + 1));
      std::vector<std::string> f;
      for (std::string word; fields >> word;) f.push_back(word);
      if (f.size() < 50 || f[0] != "Z") return false;
      const int code = std::stoi(f[49]);  // field 52: the exit status as waitpid() reports it
      status = WIFEXITED(code) ? std::to_string(WEXITSTATUS(code)) : "signal " + std::to_string(WTERMSIG(code));
      return true;
    });
    return status;
  }
  void keys(const std::string& key) const { tmux({"send-keys", "-t", session_, key}); }
  void resize(int x, int y) const { tmux({"resize-window", "-t", session_, "-x", std::to_string(x), "-y", std::to_string(y)}); }

 private:
  std::string socket_, session_;
};

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// Whether a line of the screen starts with `word` followed by a space.
bool has_row(const std::string& screen, const std::string& word) {
  for (const auto& line : lines_of(screen))
    if (line.rfind(word + " ", 0) == 0) return true;
  return false;
}

}  // namespace

// --json after pushes: the schema's keys, and values that say what the test did.
TEST(Top, JsonSnapshotOfAJob) {
  Watchdog watchdog(60s);
  Job job("top-json", shmps::test::pattern_spec(4));
  start_job_with_pushes(job);
  if (HasFatalFailure()) return;

  const Ran r = run({"shmps-top", job.name(), "--json"});
  ASSERT_EQ(r.code, 0) << r.out;
  const json doc = json::parse(r.out);
  auto keys = [](const json& object) {
    std::set<std::string> k;
    for (auto it = object.begin(); it != object.end(); ++it) k.insert(it.key());
    return k;
  };
  using Keys = std::set<std::string>;
  EXPECT_EQ(keys(doc), (Keys{"schema", "segment", "path", "presence", "problem", "taken_unix_ns", "interval_s", "server", "job",
                             "apply", "checkpoints", "workers", "params"}));
  EXPECT_EQ(keys(doc["server"]), (Keys{"alive", "pid", "epoch", "started_unix_ns", "uptime_s", "heartbeat_age_s"}));
  EXPECT_EQ(keys(doc["job"]), (Keys{"state", "size_bytes", "layout_version", "created_unix_ns", "max_workers", "workers_alive",
                                    "slices", "slice_bytes", "ring_bytes", "consistency", "workers_per_group", "groups",
                                    "server_groups", "optimizer"}));
  EXPECT_TRUE(doc["job"]["server_groups"].is_null()) << "a job without server groups";
  EXPECT_EQ(keys(doc["job"]["consistency"]), (Keys{"mode", "staleness", "bsp_aggregate", "on_worker_death", "straggler_timeout_ms", "stragglers_evicted", "model_clock", "steps"}));
  EXPECT_EQ(keys(doc["job"]["optimizer"]), (Keys{"kind", "lr", "momentum", "weight_decay", "clip_value", "clip_norm", "state_dtype"}));
  EXPECT_EQ(keys(doc["apply"]), (Keys{"records_applied", "records_per_s", "floats_applied", "floats_per_s", "rounds",
                                      "records_skipped", "records_discarded", "busy_ns", "busy_fraction", "latency"}));
  EXPECT_EQ(keys(doc["apply"]["latency"]), (Keys{"window", "samples", "p50_ns", "p99_ns", "buckets"}));
  EXPECT_EQ(keys(doc["checkpoints"]), (Keys{"count", "failures", "last_unix_ns", "last_age_s", "last_duration_s", "last_clock"}));

  EXPECT_EQ(doc["schema"], "shmps-top/1");
  EXPECT_EQ(doc["segment"], job.name());
  EXPECT_EQ(doc["path"], shm::segment_path(job.name()));
  EXPECT_EQ(doc["presence"], "ready");
  EXPECT_TRUE(doc["problem"].is_null());
  EXPECT_GT(doc["interval_s"].get<double>(), 0.1);
  EXPECT_EQ(doc["server"]["alive"], true);
  EXPECT_EQ(doc["server"]["pid"], job.server().pid());
  EXPECT_EQ(doc["server"]["epoch"], 1);
  EXPECT_GE(doc["server"]["uptime_s"].get<double>(), 0.0);
  EXPECT_EQ(doc["job"]["state"], "ready");
  EXPECT_EQ(doc["job"]["max_workers"], 4);
  EXPECT_EQ(doc["job"]["slice_bytes"], 65536);
  EXPECT_EQ(doc["job"]["consistency"]["mode"], "asp");
  EXPECT_EQ(doc["job"]["optimizer"]["kind"], "sgd");
  EXPECT_EQ(doc["job"]["optimizer"]["lr"], 1.0);
  EXPECT_EQ(doc["job"]["optimizer"]["state_dtype"], "f32");
  EXPECT_EQ(doc["apply"]["records_applied"], kPushes);
  EXPECT_EQ(doc["apply"]["latency"]["buckets"].size(), shm::kLatencyBuckets);
  EXPECT_EQ(doc["checkpoints"]["count"], 0);
  EXPECT_TRUE(doc["checkpoints"]["last_age_s"].is_null());

  ASSERT_EQ(doc["workers"].size(), 4u);
  const Keys worker_keys{"rank", "group", "state", "pid", "generation", "clock", "pushes", "pushes_per_s", "push_bytes",
                         "push_bytes_per_s", "pulls", "pulls_per_s", "pull_bytes", "pull_bytes_per_s", "applied",
                         "pushes_rejected", "last_staleness", "max_staleness", "wait_ns", "wait_fraction",
                         "backpressure_ns", "backpressure_fraction", "heartbeat_age_s", "ring_depth_bytes",
                         "ring_capacity_bytes", "ring_fill"};
  for (const auto& w : doc["workers"]) EXPECT_EQ(keys(w), worker_keys);
  const json& w0 = doc["workers"][0];
  EXPECT_EQ(w0["rank"], 0);
  EXPECT_EQ(w0["state"], "left");  // the pusher left the job when it ended
  EXPECT_EQ(w0["generation"], 1);
  EXPECT_EQ(w0["pushes"], kPushes);
  EXPECT_EQ(w0["applied"], kPushes);
  EXPECT_GT(w0["push_bytes"].get<std::uint64_t>(), 0u);
  EXPECT_EQ(w0["pushes_per_s"], 0.0);  // nothing moves any more
  EXPECT_EQ(w0["ring_depth_bytes"], 0);
  EXPECT_GT(w0["ring_capacity_bytes"].get<std::uint64_t>(), 0u);
  EXPECT_EQ(doc["workers"][1]["state"], "free");
  EXPECT_TRUE(doc["workers"][1]["heartbeat_age_s"].is_null());

  ASSERT_EQ(doc["params"].size(), 2u);
  const Keys param_keys{"name", "shape", "elements", "slices", "version_min", "version_max", "clock_min", "clock_max",
                        "updates", "updates_per_s", "pushes", "pushes_per_s", "floats_applied", "grad_norm", "norm",
                        "rejected"};
  const json& w = doc["params"][0];
  const json& b = doc["params"][1];
  EXPECT_EQ(keys(w), param_keys);
  EXPECT_EQ(keys(b), param_keys);
  EXPECT_EQ(w["name"], "w");
  EXPECT_EQ(w["shape"], json::array({3, 40000}));
  EXPECT_EQ(w["elements"], 120000);
  EXPECT_EQ(b["name"], "b");
  EXPECT_EQ(b["shape"], json::array({7}));
  const std::uint64_t to_b = pushes_to_b(kPushes);
  EXPECT_EQ(b["version_min"], to_b);  // one slice, one update per push (ASP)
  EXPECT_EQ(b["version_max"], to_b);
  EXPECT_EQ(b["pushes"], to_b);
  EXPECT_EQ(w["pushes"], kPushes - to_b);
  EXPECT_GE(w["version_max"].get<std::uint64_t>(), w["version_min"].get<std::uint64_t>());
  EXPECT_LE(w["version_max"].get<std::uint64_t>(), kPushes - to_b);
  EXPECT_GT(b["grad_norm"].get<double>(), 0.0);
  EXPECT_EQ(b["rejected"], 0);

  // --once: the same job as text.
  const Ran text = run({"shmps-top", job.name(), "--once"});
  ASSERT_EQ(text.code, 0) << text.out;
  EXPECT_HAS(text.out, "segment     " + job.name());
  EXPECT_HAS(text.out, "alive, pid " + std::to_string(job.server().pid()) + ", epoch 1");
  EXPECT_HAS(text.out, "RANK  STATE");
  EXPECT_TRUE(has_row(text.out, "w") && has_row(text.out, "b")) << text.out;
}

// --prometheus parses strictly and holds the job's numbers; /metrics of --listen says the same.
TEST(Top, PrometheusSnapshotAndHttpEndpoint) {
  Watchdog watchdog(60s);
  Job job("top-prom", shmps::test::pattern_spec(4));
  start_job_with_pushes(job);
  if (HasFatalFailure()) return;
  const std::string& name = job.name();

  const Ran r = run({"shmps-top", name, "--prometheus"});
  ASSERT_EQ(r.code, 0) << r.out;
  const Exposition e = parse_exposition(r.out, name);
  EXPECT_TRUE(e.errors.empty()) << ::testing::PrintToString(e.errors) << "\n" << r.out;
  const std::string b_pushes = std::to_string(pushes_to_b(kPushes));
  EXPECT_EQ(metric(e, name, "shmps_segment_up"), 1);
  EXPECT_EQ(metric(e, name, "shmps_server_up"), 1);
  EXPECT_EQ(metric(e, name, "shmps_server_epoch"), 1);
  EXPECT_EQ(metric(e, name, "shmps_server_pid"), job.server().pid());
  EXPECT_EQ(metric(e, name, "shmps_segment_state", {{"state", "ready"}}), 1);
  EXPECT_EQ(metric(e, name, "shmps_segment_state", {{"state", "stopped"}}), 0);
  EXPECT_EQ(metric(e, name, "shmps_records_applied_total"), kPushes);
  EXPECT_EQ(metric(e, name, "shmps_workers_max"), 4);
  EXPECT_EQ(metric(e, name, "shmps_worker_pushes_total", {{"rank", "0"}}), kPushes);
  EXPECT_EQ(metric(e, name, "shmps_worker_pushes_applied_total", {{"rank", "0"}}), kPushes);
  EXPECT_EQ(metric(e, name, "shmps_worker_state", {{"rank", "0"}, {"state", "left"}}), 1);
  EXPECT_EQ(metric(e, name, "shmps_worker_state", {{"rank", "0"}, {"state", "alive"}}), 0);
  EXPECT_EQ(metric(e, name, "shmps_worker_ring_depth_bytes", {{"rank", "0"}}), 0);
  EXPECT_TRUE(std::isnan(metric(e, name, "shmps_worker_pushes_total", {{"rank", "1"}}))) << "a free slot is left out";
  EXPECT_EQ(metric(e, name, "shmps_param_version_max", {{"param", "b"}}), std::stod(b_pushes));
  EXPECT_EQ(metric(e, name, "shmps_param_version_min", {{"param", "b"}}), std::stod(b_pushes));
  EXPECT_EQ(metric(e, name, "shmps_param_pushes_total", {{"param", "b"}}), std::stod(b_pushes));
  EXPECT_EQ(metric(e, name, "shmps_param_elements", {{"param", "w"}}), 120000);
  EXPECT_EQ(e.types.at("shmps_worker_pushes_total"), "counter");
  EXPECT_EQ(e.types.at("shmps_server_up"), "gauge");

  // The same over HTTP.
  const Listener l = start_listener(job);
  ASSERT_GT(l.port, 0) << l.process->output();
  const Exposition h = scrape(l, name);
  EXPECT_TRUE(h.errors.empty()) << ::testing::PrintToString(h.errors);
  EXPECT_EQ(h.types, e.types);
  std::set<std::string> series_cli, series_http;
  for (const auto& [key, v] : e.values) series_cli.insert(key);
  for (const auto& [key, v] : h.values) series_http.insert(key);
  EXPECT_EQ(series_http, series_cli);
  for (const auto& [key, v] : e.values) {
    // Ages and the uptime move with time; everything else stands still in a job that is idle.
    if (key.find("age_seconds") != std::string::npos || key.find("uptime") != std::string::npos) continue;
    const auto it = h.values.find(key);
    if (it != h.values.end()) {
      EXPECT_EQ(it->second, v) << key;
    }
  }
  const HttpReply root = http_get(l.port, "/");
  EXPECT_EQ(root.status, 200);
  EXPECT_HAS(root.body, "/metrics");
  EXPECT_EQ(http_get(l.port, "/nothing").status, 404);
  l.process->kill(SIGTERM);
  EXPECT_EQ(l.process->wait(5s), 0) << l.process->output();
}

// The monitor's mapping of the segment is read-only (and it does map it).
TEST(Top, MapsTheSegmentReadOnly) {
  Watchdog watchdog(60s);
  Job job("top-ro", shmps::test::pattern_spec(4));
  job.start_server();
  job.wait_ready();
  const Listener l = start_listener(job);
  ASSERT_GT(l.port, 0) << l.process->output();
  EXPECT_EQ(scrape(l, job.name()).errors.size(), 0u);
  const auto perms = mapping_permissions(l.process->pid(), shm::segment_path(job.name()));
  ASSERT_FALSE(perms.empty()) << "shmps-top does not map " << shm::segment_path(job.name());
  for (const auto& p : perms) EXPECT_EQ(p.find('w'), std::string::npos) << p;
  // For comparison: the server maps it writable.
  const auto server_perms = mapping_permissions(job.server().pid(), shm::segment_path(job.name()));
  ASSERT_FALSE(server_perms.empty());
  EXPECT_NE(server_perms[0].find('w'), std::string::npos);
}

// SIGKILL of a monitor in the middle of a running job: no file appears or changes, the job goes
// on, its sums are exact, and a new worker still completes.
TEST(Top, KilledMonitorLeavesTheJobUntouched) {
  Watchdog watchdog(60s);
  Job job("top-kill", shmps::test::pattern_spec(8));
  job.start_server();
  job.wait_ready();
  const auto files_before = segment_files(job.name());
  ASSERT_EQ(files_before.size(), 3u);  // the segment and its two lock files

  Process& pusher = job.start({"shmps-test-pusher", "exact", "--pushes", "600"}, {{"SHMPS_RANK", "1"}});
  const Listener l = start_listener(job);
  ASSERT_GT(l.port, 0) << l.process->output();
  EXPECT_TRUE(scrape(l, job.name()).errors.empty());
  std::thread scraper([&] {  // keep it busy reading while it is killed
    for (int i = 0; i < 20; ++i) http_get(l.port, "/metrics");
  });
  std::this_thread::sleep_for(100ms);
  l.process->kill(SIGKILL);
  EXPECT_EQ(l.process->wait(5s), 128 + SIGKILL);
  scraper.join();

  EXPECT_EQ(pusher.wait(30s), 0) << pusher.output();
  Process& second = job.start({"shmps-test-pusher", "exact", "--pushes", "20"}, {{"SHMPS_RANK", "2"}});
  EXPECT_EQ(second.wait(30s), 0) << second.output();
  EXPECT_TRUE(job.server().running());
  EXPECT_EQ(segment_files(job.name()), files_before);
  shmps::test::expect_exact_sum(job.name(), {0, 600, 20});
}

// A segment that does not exist, and one of another layout version: exit 1, saying so.
TEST(Top, MissingOrForeignSegment) {
  Watchdog watchdog(60s);
  const std::string missing = shmps::test::unique_segment("top-missing");
  for (std::vector<std::string> mode : {std::vector<std::string>{"--json"}, {"--once"}, {"--prometheus"},
                                        {"--listen", "127.0.0.1:0"}, {}}) {
    std::vector<std::string> argv{"shmps-top", missing};
    argv.insert(argv.end(), mode.begin(), mode.end());
    const Ran r = run(argv, 10s);
    EXPECT_EQ(r.code, 1) << r.out;
    EXPECT_HAS(r.out, "segment '" + missing + "' does not exist (no " + shm::segment_path(missing) + "); see `shmps-ctl list`");
  }
  shmps::test::expect_no_files(missing);

  // A segment written by "another shmps version": layout version 99.
  const std::string foreign = shmps::test::unique_segment("top-foreign");
  struct Cleanup {
    std::string name;
    ~Cleanup() { shmps::test::remove_segment(name); }
  } cleanup{foreign};
  {
    std::vector<char> bytes(sizeof(shm::SegmentHeader) + 4096, 0);
    const std::uint64_t magic = shm::kMagic;
    const std::uint32_t version = 99, ready = static_cast<std::uint32_t>(shm::SegmentState::ready);
    std::memcpy(bytes.data() + offsetof(shm::SegmentHeader, magic), &magic, sizeof magic);
    std::memcpy(bytes.data() + offsetof(shm::SegmentHeader, layout_version), &version, sizeof version);
    std::memcpy(bytes.data() + offsetof(shm::SegmentHeader, state), &ready, sizeof ready);
    std::ofstream out(shm::segment_path(foreign), std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  ::chmod(shm::segment_path(foreign).c_str(), 0600);
  const Ran r = run({"shmps-top", foreign, "--json"}, 10s);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_HAS(r.out, "layout version 99");
  EXPECT_HAS(r.out, "shmps-top: error:");
}

// The terminal UI, driven through tmux: what it shows, its keys, a tiny window, q.
TEST(Top, TerminalUiInTmux) {
  if (!have_tmux()) GTEST_SKIP() << "tmux is not installed (apt-get install tmux): the terminal UI is not tested";
  Watchdog watchdog(60s);
  Job job("top-tui", shmps::test::pattern_spec(4));
  start_job_with_pushes(job);
  if (HasFatalFailure()) return;
  Tmux tmux;
  const Ran started = tmux.start("exec " + shmps::test::bin("shmps-top") + " " + job.name() + " --interval 0.2");
  ASSERT_EQ(started.code, 0) << started.out;

  std::string screen;
  auto shows = [&](const std::function<bool(const std::string&)>& ok) {
    return eventually([&] { return ok(screen = tmux.screen()); });
  };
  // Wait for a whole frame: tmux may capture the screen while shmps-top is still drawing it.
  ASSERT_TRUE(shows([](const std::string& s) {
    return shmps::test::has(s, "PARAMETERS") && has_row(s, "b") && has_row(s, "w");
  })) << screen;
  EXPECT_HAS(screen, "shmps-top  " + job.name());
  EXPECT_HAS(screen, "alive, pid " + std::to_string(job.server().pid()) + ", epoch 1");
  EXPECT_HAS(screen, "WORKERS  1 of 4 slots used");
  EXPECT_HAS(screen, "RANK  STATE");
  EXPECT_HAS(screen, "NAME  SHAPE");
  EXPECT_TRUE(has_row(screen, "w") && has_row(screen, "b")) << screen;
  EXPECT_HAS(screen, "push/s");

  // Its mapping is read-only here too.
  const pid_t pid = std::stoi(tmux.pane("#{pane_pid}"));
  const auto perms = mapping_permissions(pid, shm::segment_path(job.name()));
  ASSERT_FALSE(perms.empty());
  for (const auto& p : perms) EXPECT_EQ(p.find('w'), std::string::npos) << p;

  // Tab: the workers view (no parameters table); s: sorted by the next column.
  tmux.keys("Tab");
  EXPECT_TRUE(shows([](const std::string& s) {
    return shmps::test::has(s, "view: workers ") && !shmps::test::has(s, "PARAMETERS") && shmps::test::has(s, "sort: RANK asc");
  })) << screen;
  tmux.keys("s");
  EXPECT_TRUE(shows([](const std::string& s) { return shmps::test::has(s, "sort: STATE asc"); })) << screen;
  tmux.keys("r");
  EXPECT_TRUE(shows([](const std::string& s) { return shmps::test::has(s, "sort: STATE desc"); })) << screen;
  // Tab again: the parameters view; s there sorts the parameters.
  tmux.keys("Tab");
  EXPECT_TRUE(shows([](const std::string& s) { return shmps::test::has(s, "PARAMETERS") && !shmps::test::has(s, "RANK  STATE"); }))
      << screen;
  tmux.keys("s");
  EXPECT_TRUE(shows([](const std::string& s) { return shmps::test::has(s, "PARAMETERS  2   sort: SHAPE asc"); })) << screen;
  tmux.keys("h");
  EXPECT_TRUE(shows([](const std::string& s) { return shmps::test::has(s, "shmps-top keys"); })) << screen;
  tmux.keys("x");  // any key closes the help
  EXPECT_TRUE(shows([](const std::string& s) { return !shmps::test::has(s, "shmps-top keys"); })) << screen;

  // Small windows: it still draws, within the window, and lives.
  tmux.resize(40, 10);
  EXPECT_TRUE(shows([](const std::string& s) {
    const auto lines = lines_of(s);
    return !lines.empty() && lines.size() <= 10 && shmps::test::has(lines[0], "shmps-top");
  })) << screen;
  for (const auto& line : lines_of(screen)) EXPECT_LE(line.size(), 40u) << line;
  tmux.resize(12, 3);
  EXPECT_TRUE(shows([](const std::string& s) { return shmps::test::has(s, "terminal to"); })) << screen;
  EXPECT_EQ(tmux.pane("#{pane_dead}"), "0");
  tmux.resize(120, 40);
  EXPECT_TRUE(shows([](const std::string& s) { return shmps::test::has(s, "PARAMETERS"); })) << screen;

  // q: it exits, with status 0.
  tmux.keys("q");
  EXPECT_EQ(tmux.exit_status(pid), "0") << tmux.screen();

  // Ctrl-C: a clean exit too (status 0, not killed by the signal).
  tmux.respawn("exec " + shmps::test::bin("shmps-top") + " " + job.name() + " --interval 0.2");
  ASSERT_TRUE(shows([](const std::string& s) { return shmps::test::has(s, "PARAMETERS"); })) << screen;
  const pid_t second = std::stoi(tmux.pane("#{pane_pid}"));
  tmux.keys("C-c");
  EXPECT_EQ(tmux.exit_status(second), "0") << tmux.screen();
}

// The server is SIGKILLed and started again under a running monitor: /metrics shows it gone, then
// the new epoch; the monitor never stops.
TEST(Top, FollowsAServerRestart) {
  Watchdog watchdog(60s);
  Job job("top-restart", shmps::test::pattern_spec(4));
  job.start_server();
  job.wait_ready();
  const std::string& name = job.name();
  const Listener l = start_listener(job);
  ASSERT_GT(l.port, 0) << l.process->output();
  Exposition e;
  EXPECT_TRUE(eventually([&] {
    e = scrape(l, name);
    return metric(e, name, "shmps_server_up") == 1 && metric(e, name, "shmps_server_epoch") == 1;
  })) << ::testing::PrintToString(e.errors);

  job.server().kill(SIGKILL);
  EXPECT_EQ(job.server().wait(5s), 128 + SIGKILL);
  EXPECT_TRUE(eventually([&] {
    e = scrape(l, name);
    return metric(e, name, "shmps_server_up") == 0;
  })) << ::testing::PrintToString(e.errors);
  EXPECT_TRUE(e.errors.empty()) << ::testing::PrintToString(e.errors);
  EXPECT_EQ(metric(e, name, "shmps_segment_up"), 1);
  EXPECT_EQ(metric(e, name, "shmps_server_epoch"), 1);
  EXPECT_TRUE(l.process->running());

  job.start_server();
  job.wait_ready();
  EXPECT_TRUE(eventually([&] {
    e = scrape(l, name);
    return metric(e, name, "shmps_server_up") == 1 && metric(e, name, "shmps_server_epoch") == 2;
  })) << ::testing::PrintToString(e.errors);
  EXPECT_TRUE(e.errors.empty()) << ::testing::PrintToString(e.errors);
  EXPECT_EQ(metric(e, name, "shmps_server_pid"), job.server().pid());

  // A worker after the restart: the monitor counts it.
  Process& pusher = job.start({"shmps-test-pusher", "exact", "--pushes", "9"}, {{"SHMPS_RANK", "3"}});
  EXPECT_EQ(pusher.wait(20s), 0) << pusher.output();
  EXPECT_TRUE(eventually([&] {
    e = scrape(l, name);
    return metric(e, name, "shmps_worker_pushes_total", {{"rank", "3"}}) == 9;
  }));
  EXPECT_TRUE(l.process->running()) << l.process->output();
  l.process->kill(SIGINT);
  EXPECT_EQ(l.process->wait(5s), 0) << l.process->output();
}
