// shmps-ctl: operators' view of the segments on this machine.
//
//   shmps-ctl list                 segments, their servers alive or not
//   shmps-ctl inspect NAME         header, parameters and slice versions, worker slots, memory
//   shmps-ctl workers NAME         every worker slot: free, alive, suspect, dead or left
//   shmps-ctl set NAME KEY=VALUE   change consistency (bsp, ssp:N, asp), bsp_aggregate or
//                                  on_worker_death of a live job, through the server
//   shmps-ctl export NAME FILE     every parameter to a safetensors file, from the live job
//   shmps-ctl checkpoint NAME [FILE]  a full checkpoint by the live server (into its
//                                  --checkpoint-dir, or FILE); returns once the file is durable.
//                                  For a job with server groups (NAME.g0, ...): synced first,
//                                  then one file from group 0's replica
//   shmps-ctl sync NAME            server groups: make every replica of job NAME equal
//   shmps-ctl destroy NAME         remove a segment (refused while its server lives, unless --force);
//                                  for a job with server groups, every replica
//   mpirun ... shmps-ctl sync|checkpoint|destroy --mpi NAME ...
//                                  the same for a job on several hosts (ctl_mpi.hpp)
//
// list and inspect map segments read-only and take no lock: they can never block or corrupt a job.
#include <algorithm>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>
#include <iomanip>
#include <map>
#include <optional>
#include <iostream>
#include <sstream>
#include <string_view>
#include <vector>

#include <CLI/CLI.hpp>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/dtype.hpp>
#include <shmps/shm/futex.hpp>
#include <shmps/shm/liveness.hpp>
#include <shmps/shm/mailbox.hpp>
#include <shmps/shm/membership.hpp>
#include <shmps/shm/memory.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/pages.hpp>
#include <shmps/server/safetensors.hpp>
#include <shmps/shm/proc.hpp>
#include <shmps/shm/reader.hpp>
#include <shmps/shm/segment.hpp>

#include "status.hpp"  // holder, state_name, slot_status (shared with shmps-top)
#include "ctl_mpi.hpp"
#include "sync_job.hpp"

using namespace shmps;
using namespace shmps::shm;
using namespace shmps::tools;

namespace {

std::string age(std::uint64_t then_ns) {
  if (then_ns == 0) return "-";
  const std::uint64_t now = monotonic_ns();
  if (then_ns > now) return "0.0s";
  std::ostringstream out;
  out << std::fixed << std::setprecision(1) << static_cast<double>(now - then_ns) / 1e9 << "s";
  return out.str();
}

std::string seconds(std::uint64_t ns);
std::string age_unix(std::uint64_t then_unix_ns) {
  const std::uint64_t now = unix_ns();
  return seconds(then_unix_ns > now ? 0 : now - then_unix_ns);
}

std::string seconds(std::uint64_t ns) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(1) << static_cast<double>(ns) / 1e9 << "s";
  return out.str();
}

// "bsp (sum, model clock 12, 12 steps), on worker death: proceed, stragglers: evicted after 10.0s
// (0 evicted)", "ssp:3, ...", "asp, ...";
// with several worker groups "bsp (sum, group clocks 12, 9, 21 steps), ...".
std::string consistency_text(const Segment& seg) {
  const SegmentHeader& h = seg.header();
  const auto mode = static_cast<Consistency>(load_acquire(h.consistency));
  std::string text(to_string(mode));
  if (mode == Consistency::ssp) text += ":" + std::to_string(load_acquire(h.staleness));
  if (mode == Consistency::bsp)
    text += " (" + std::string(to_string(static_cast<BspAggregate>(load_acquire(h.bsp_aggregate)))) + ", " +
            (h.group_count == 1 ? "model " : "") + group_clocks_text(seg) + ", " +
            std::to_string(load_counter(h.steps)) + " steps)";
  text += ", on worker death: " + std::string(to_string(static_cast<OnWorkerDeath>(load_acquire(h.on_worker_death))));
  // BSP and SSP: "stragglers: evicted after 10.0s (1 evicted)", or "stragglers: never evicted (0 evicted)".
  const std::uint32_t straggler_ms = load_acquire(h.straggler_timeout_ms);
  if (mode != Consistency::asp || load_counter(h.stragglers_evicted) != 0)
    text += ", stragglers: " +
            (straggler_ms == 0 ? std::string("never evicted")
                               : "evicted after " + seconds(std::uint64_t{straggler_ms} * 1'000'000ULL)) +
            " (" + std::to_string(load_counter(h.stragglers_evicted)) + " evicted)";
  return text;
}

// "one (every worker)" or "2 of 2 workers: 0 at clock 12 (12 steps, 24 pushes), 1 at clock 9 (...)".
std::string groups_text(const Segment& seg) {
  const SegmentHeader& h = seg.header();
  if (h.group_count == 1) return "one (all " + std::to_string(h.max_workers) + " worker slots)";
  std::string text = std::to_string(h.group_count) + " of " + std::to_string(h.workers_per_group) +
                     " workers (rank r in group r / " + std::to_string(h.workers_per_group) + ")";
  for (std::uint32_t g = 0; g < h.group_count; ++g) {
    const GroupEntry& e = seg.group(g);
    text += "\n             group " + std::to_string(g) + ": ranks " + std::to_string(seg.group_first_rank(g)) + ".." +
            std::to_string(seg.group_end_rank(g) - 1) + ", clock " + std::to_string(load_acquire(e.clock)) + ", " +
            std::to_string(load_counter(e.steps)) + " steps of " + std::to_string(load_counter(e.records)) + " pushes" +
            (load_counter(e.discarded) ? ", " + std::to_string(load_counter(e.discarded)) + " discarded" : std::string());
  }
  return text;
}

// The width of a text column: at least `minimum`, and wide enough for the longest value plus a
// space, so that a long name never runs into the next column.
template <class Values>
int column_width(const Values& values, std::size_t minimum) {
  std::size_t width = minimum;
  for (const auto& v : values) width = std::max(width, std::string_view(v).size() + 2);
  return static_cast<int>(width);
}

// The worker slots: status from the kernel's locks and the server's verdict (never from time
// alone: a stale heartbeat only makes a live worker "suspect"), and what each slot has done.
void print_slots(const Segment& seg, const LockFile* slots, bool all) {
  const auto& h = seg.header();
  const bool groups = h.group_count > 1;
  std::cout << std::left << std::setw(6) << "RANK" << (groups ? "GROUP " : "") << std::setw(9) << "STATUS" << std::setw(9) << "PID" << std::setw(6)
            << "GEN" << std::setw(12) << "PUBLISHED" << std::setw(12) << "APPLIED" << std::setw(12) << "RING"
            << std::setw(10) << "REJECTED" << std::setw(8) << "CLOCK" << std::setw(10) << "STALENESS"
            << std::setw(10) << "WAITED" << "HEARTBEAT\n";
  for (unsigned r = 0; r < h.max_workers; ++r) {
    const WorkerSlot& slot = seg.slot(r);
    const std::string status = slot_status(seg, r, slots);
    if (status == "free" && !all) continue;
    const std::uint64_t depth = load_acquire(seg.ring(r).tail) - load_acquire(seg.ring(r).head);
    std::cout << std::left << std::setw(6) << r;
    if (groups) std::cout << std::setw(6) << seg.group_of(r);
    std::cout << std::setw(9) << status << std::setw(9) << load_acquire(slot.pid)
              << std::setw(6) << load_acquire(slot.generation) << std::setw(12) << load_acquire(slot.published)
              << std::setw(12) << load_acquire(slot.applied) << std::setw(12) << human_bytes(depth) << std::setw(10)
              << load_counter(slot.pushes_rejected) << std::setw(8) << load_acquire(slot.clock) << std::setw(10)
              << (std::to_string(load_counter(slot.last_staleness)) + "/" + std::to_string(load_counter(slot.max_staleness)))
              << std::setw(10) << seconds(load_counter(slot.wait_ns)) << age(load_acquire(slot.heartbeat_ns)) << "\n";
  }
}

int cmd_list() {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(kShmDir)) {
    const std::string file = entry.path().filename().string();
    if (file.rfind(kShmPrefix, 0) != 0 || file.size() <= kShmPrefix.size()) continue;
    if (file.size() >= 5 && file.substr(file.size() - 5) == ".lock") continue;
    if (file.size() >= 5 && file.substr(file.size() - 5) == ".sync") continue;  // a server group's sync segment
    names.push_back(file.substr(kShmPrefix.size()));
  }
  std::sort(names.begin(), names.end());
  if (names.empty()) {
    std::cout << "no shmps segments in " << kShmDir << "\n";
    return 0;
  }
  const int name_width = column_width(names, 24);
  std::cout << std::left << std::setw(name_width) << "NAME" << std::setw(10) << "STATE" << std::setw(18) << "SERVER"
            << std::setw(8) << "EPOCH" << std::setw(10) << "WORKERS" << std::setw(12) << "SIZE" << "PARAMS\n";
  for (const auto& name : names) {
    bool server_alive = false;
    holder(server_lock_path(name), 0, server_alive);
    std::cout << std::left << std::setw(name_width) << name;
    try {
      Segment seg = Segment::open(name, Access::read_only);
      const auto& h = seg.header();
      const std::uint32_t state = load_acquire(h.state);
      if (state == static_cast<std::uint32_t>(SegmentState::creating)) {
        std::cout << std::setw(10) << "creating" << (server_alive ? "alive" : "none (died while creating)") << "\n";
        continue;
      }
      std::unique_ptr<LockFile> slots;
      if (std::filesystem::exists(slots_lock_path(name)))
        slots = std::make_unique<LockFile>(LockFile::open_for_probe(slots_lock_path(name)));
      unsigned live = 0;
      for (unsigned r = 0; r < h.max_workers; ++r)
        if (slot_status(seg, r, slots.get()) == "alive" || slot_status(seg, r, slots.get()) == "suspect") ++live;
      std::ostringstream server;
      server << (server_alive ? "alive pid " + std::to_string(load_acquire(h.server_pid)) : std::string("none"));
      std::cout << std::setw(10) << state_name(state) << std::setw(18) << server.str() << std::setw(8)
                << load_acquire(h.server_epoch) << std::setw(10)
                << (std::to_string(live) + "/" + std::to_string(h.max_workers)) << std::setw(12)
                << human_bytes(h.total_bytes) << h.param_count << "\n";
    } catch (const Error& e) {
      std::cout << "unreadable: " << e.what() << "\n";
    }
  }
  return 0;
}

// Server groups: which group this replica is, how many slices it is home of, and its sync state.
std::string server_groups_text(const Segment& seg) {
  const SegmentHeader& h = seg.header();
  if (!seg.has_server_groups()) return {};
  std::uint64_t homed = 0, in_flight = 0;
  for (std::uint64_t s = 0; s < h.slice_count; ++s) {
    const SyncSlice& sync = seg.sync_slice(s);
    homed += sync.home == h.server_group;
    in_flight += load_acquire(sync.sent_seq) > load_acquire(sync.synced_seq);
  }
  const std::uint64_t last = load_acquire(h.last_sync_unix_ns);
  std::ostringstream out;
  out << "server group " << h.server_group << " of " << h.server_groups << ", home of " << homed << " of " << h.slice_count
      << " slices (slice s is homed at group s mod " << h.server_groups << ")\n"
      << "sync         round " << load_counter(h.sync_seq) << ", " << load_counter(h.sync_sent) << " deltas sent, "
      << load_counter(h.sync_taken) << " answers taken, " << in_flight << " in flight; as home: "
      << load_counter(h.sync_added) << " deltas added, " << load_counter(h.sync_duplicates) << " duplicates answered; "
      << human_bytes(load_counter(h.sync_bytes)) << " sent; last complete round "
      << (last == 0 ? std::string("never") : age_unix(last) + " ago") << "\n";
  return out.str();
}

int cmd_inspect(const std::string& name) {
  if (!Segment::exists(name) && tools::server_groups_of(name) > 1)
    throw Error("'" + name + "' is a job with " + std::to_string(tools::server_groups_of(name)) +
                " server groups: inspect one of its replicas, e.g. shmps-ctl inspect " + replica_name(name, 0));
  Segment seg = Segment::open(name, Access::read_only);
  const auto& h = seg.header();
  if (load_acquire(h.state) == static_cast<std::uint32_t>(SegmentState::creating)) {
    std::cout << "segment '" << name << "' is being created (or its creator died midway)\n";
    return 0;
  }
  bool server_alive = false;
  holder(server_lock_path(name), 0, server_alive);
  std::unique_ptr<LockFile> slots;
  if (std::filesystem::exists(slots_lock_path(name)))
    slots = std::make_unique<LockFile>(LockFile::open_for_probe(slots_lock_path(name)));

  std::cout << "segment      " << name << " (" << segment_path(name) << ", " << human_bytes(h.total_bytes) << ")\n"
            << "layout       version " << h.layout_version << ", fingerprint 0x" << std::hex << h.fingerprint << std::dec
            << "\n"
            << "state        " << state_name(load_acquire(h.state)) << ", epoch " << load_acquire(h.server_epoch) << "\n"
            << "server       " << (server_alive ? "alive" : "not running") << ", pid " << load_acquire(h.server_pid)
            << ", heartbeat " << age(load_acquire(h.server_heartbeat_ns)) << " ago\n"
            << "consistency  " << consistency_text(seg) << "\n"
            << "groups       " << groups_text(seg) << "\n"
            << server_groups_text(seg)
            << "optimizer    " << to_string(h.optimizer.kind) << " lr=" << h.optimizer.lr
            << " weight_decay=" << h.optimizer.weight_decay << " clip_value=" << h.optimizer.clip_value
            << " clip_norm=" << h.optimizer.clip_norm
            << (h.state_arrays > 0 ? " state_dtype=" + std::string(to_string(h.optimizer.state_dtype)) : std::string())
            << "\n"
            << "slices       " << h.slice_count << " of " << h.slice_floats << " floats ("
            << human_bytes(h.slice_floats * 4) << ")\n"
            << "applied      " << load_counter(h.records_applied) << " pushes, " << load_counter(h.floats_applied)
            << " floats, " << load_counter(h.apply_rounds) << " rounds\n"
            << "huge pages   "
            << (load_acquire(h.huge_mount) == 0
                    ? std::string("unknown (the server has not reported yet)")
                    : huge_page_text(HugePageSupport{static_cast<HugeSetting>(load_acquire(h.huge_mount)),
                                                     static_cast<HugeSetting>(load_acquire(h.huge_sysfs))},
                                     load_acquire(h.huge_bytes), h.total_bytes))
            << "\n\n";

  std::vector<std::string> param_names, shapes;
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    param_names.emplace_back(param_name(seg.param(i)));
    shapes.push_back(shape_string(seg.param(i)));
  }
  const int param_width = column_width(param_names, 20), shape_width = column_width(shapes, 16);
  std::cout << std::left << std::setw(param_width) << "PARAM" << std::setw(shape_width) << "SHAPE" << std::setw(12) << "ELEMENTS"
            << std::setw(8) << "SLICES" << "VERSIONS (min..max updates per slice)\n";
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const ParamEntry& p = seg.param(i);
    std::uint64_t lo = UINT64_MAX, hi = 0;
    for (std::uint64_t k = 0; k < p.slice_count; ++k) {
      const std::uint64_t v = load_acquire(seg.slice(p.first_slice + k).version) / 2;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    std::cout << std::left << std::setw(param_width) << param_names[i] << std::setw(shape_width) << shapes[i] << std::setw(12)
              << p.size << std::setw(8) << p.slice_count << lo << ".." << hi;
    // Server groups: each slice's home group (SINGA's slice2group), e.g. "homes 0,1,0,1".
    if (seg.has_server_groups()) {
      std::cout << "  homes ";
      const std::uint64_t shown = std::min<std::uint64_t>(p.slice_count, 16);
      for (std::uint64_t k = 0; k < shown; ++k) std::cout << (k ? "," : "") << seg.sync_slice(p.first_slice + k).home;
      if (shown < p.slice_count) std::cout << ",... (" << p.slice_count << " slices)";
    }
    // Values stored in 2 bytes (dtype = "bf16" / "fp16"); float32 says nothing.
    if (p.dtype != DType::f32) std::cout << "  dtype " << to_string(p.dtype) << " (2 bytes an element)";
    // A table with its own optimizer (another kind or other settings than the job's).
    if (std::memcmp(&p.optimizer, &h.optimizer, sizeof(OptimizerSettings)) != 0)
      std::cout << "  optimizer " << to_string(p.optimizer.kind) << " lr=" << p.optimizer.lr;
    // A table with keys = "u64": its keys held of its slots, and what admission and eviction did.
    if (is_keyed(p)) {
      const ParamStats& stats = seg.param_stats(i);
      std::cout << "  keys u64: " << load_acquire(stats.keys_held) << " of " << p.shape[0] << " slots held, "
                << load_acquire(stats.keys_admitted) << " admitted, " << load_acquire(stats.keys_evicted) << " evicted";
      std::cout << ", " << load_acquire(stats.keys_refused_rows)
                << " rows dropped (key not admitted yet, admit_after " << p.admit_after << ", or no slot free)";
    }
    // Put (Worker::put): who put it; init = "put" and nobody yet: pulls of it wait.
    if (const std::uint64_t put_rank = load_acquire(seg.param_stats(i).put_rank); put_rank != 0)
      std::cout << "  put by worker " << put_rank - 1;
    else if (p.init_put != 0)
      std::cout << "  waiting for a put (init = \"put\")";
    std::cout << "\n";
  }

  std::cout << "\n";
  print_slots(seg, slots.get(), false);

  // What the segment costs, part by part (the same table as shmps-server --plan).
  std::cout << "\nmemory (of " << segment_path(name) << ")\n" << memory_table(memory_breakdown(plan_of(seg)));
  // What is allocated now: pages are allocated by their first user, so the rings of slots that
  // never had a worker, and alignment padding, cost nothing yet.
  struct stat st {};
  if (::stat(segment_path(name).c_str(), &st) == 0)
    std::cout << "allocated now " << human_bytes(static_cast<std::uint64_t>(st.st_blocks) * 512) << " of "
              << human_bytes(h.total_bytes) << " (a ring is allocated when a worker first attaches to its slot)\n";
  return 0;
}

int cmd_workers(const std::string& name) {
  Segment seg = Segment::open(name, Access::read_only);
  std::unique_ptr<LockFile> slots;
  if (std::filesystem::exists(slots_lock_path(name)))
    slots = std::make_unique<LockFile>(LockFile::open_for_probe(slots_lock_path(name)));
  print_slots(seg, slots.get(), true);
  std::cout << "\nSTATUS: alive (holds its slot lock), suspect (holds it, no heartbeat for 5 s), dead (its lock was "
               "released: the process is gone), left (left the job), free (never used)\n";
  return 0;
}

// Sends `request` through the segment's command mailbox (mailbox.hpp) and waits for the server's
// answer: up to `limit`, or, with no limit, for as long as the server lives (a checkpoint of a big
// model takes a while). The server does it between apply rounds (a clock boundary).
using mailbox::Answer;
Answer ask_server(const std::string& name, const std::string& request, std::optional<std::chrono::seconds> limit) {
  bool server_alive = false;
  holder(server_lock_path(name), 0, server_alive);
  Segment seg = Segment::open(name, Access::read_write);
  if (!server_alive) throw Error("segment '" + name + "' has no live server to do '" + request + "': start shmps-server first");
  return mailbox::ask(seg.header(), name, request, limit, [&name] {
    bool alive = false;
    holder(server_lock_path(name), 0, alive);
    return alive;
  });
}

int cmd_set(const std::string& name, const std::string& setting) {
  if (setting.rfind("checkpoint", 0) == 0)
    throw Error("'" + setting + "' is not a setting: use shmps-ctl checkpoint " + name + " [FILE]");
  const Answer a = ask_server(name, setting, std::chrono::seconds(10));
  if (a.status != 0) throw Error("the server refused '" + setting + "': " + a.reply);
  std::cout << a.reply << "\n";
  return 0;
}

// Server groups: every replica of job `job` made equal (sync_job.hpp).
int cmd_sync(const std::string& job) {
  const std::uint32_t groups = tools::server_groups_of(job);
  if (groups < 2) {
    if (Segment::exists(job))
      throw Error("segment '" + job + "' has no server groups: there is nothing to sync (shmps-launch --server-groups S "
                  "starts a job with S of them)");
    throw Error("no job '" + job + "' with server groups here (no segment " + replica_name(job, 0) +
                "): see `shmps-ctl list`");
  }
  std::cout << tools::sync_job(job, groups, std::chrono::seconds(60)) << "\n";
  return 0;
}

// Asks the live server for a checkpoint and returns once the file is durable (or failed). A job
// with server groups is synced first, and its checkpoint is group 0's replica: one file, which
// a restore gives every group.
int cmd_checkpoint(std::string name, const std::string& path) {
  if (!Segment::exists(name)) {
    if (const std::uint32_t groups = tools::server_groups_of(name); groups > 1) {
      std::cout << tools::sync_job(name, groups, std::chrono::seconds(60)) << "\n";
      name = replica_name(name, 0);
    }
  }
  std::string request = "checkpoint";
  if (!path.empty()) {
    std::error_code ec;
    const std::filesystem::path absolute = std::filesystem::absolute(path, ec);  // the server has its own cwd
    if (ec) throw Error(path + ": " + ec.message());
    if (std::filesystem::is_directory(absolute))
      throw Error(path + " is a directory: give a file name (e.g. " + (absolute / (name + ".safetensors")).string() + ")");
    if (!std::filesystem::is_directory(absolute.parent_path()))
      throw Error(path + ": directory " + absolute.parent_path().string() + " does not exist");
    request += "=" + absolute.lexically_normal().string();
  }
  const Answer a = ask_server(name, request, std::nullopt);
  if (a.status != 0) throw Error("checkpoint of '" + name + "' failed: " + a.reply);
  std::cout << a.reply << "\n";
  return 0;
}

// Writes every parameter of a live job to a safetensors file (PyTorch's and numpy's format, one
// F32 tensor per parameter under its own name; BF16 / F16 for a parameter of dtype bf16 / fp16), without stopping or slowing the job: each slice
// is copied whole (seqlock), the file is written atomically. Versions go into the metadata.
int cmd_export(const std::string& name, const std::string& path, unsigned mode) {
  Segment seg = Segment::open(name, Access::read_only);
  const auto& h = seg.header();
  if (load_acquire(h.state) == static_cast<std::uint32_t>(SegmentState::creating))
    throw Error("segment '" + name + "' is still being created; nothing to export yet");
  std::vector<std::vector<float>> values(h.param_count);
  std::vector<std::vector<std::uint16_t>> halves(h.param_count);  // bf16 / fp16 parameters: their stored bytes
  std::vector<server::safetensors::TensorView> tensors;
  std::map<std::string, std::string> metadata{
      {"shmps.segment", name},
      {"shmps.epoch", std::to_string(load_acquire(h.server_epoch))},
      {"shmps.consistency", consistency_text(seg)},
      {"shmps.model_clock", std::to_string(slowest_group_clock(seg))},
  };
  std::uint64_t bytes = 0;
  // A table with keys = "u64": its slots' keys and stamps beside its rows ("<table>/keys",
  // "<table>/key_stamps", as in a checkpoint), each slice's read together with its rows.
  std::vector<std::vector<std::int64_t>> keys(h.param_count), stamps(h.param_count);
  for (std::uint32_t i = 0; i < h.param_count; ++i) {
    const ParamEntry& p = seg.param(i);
    if (p.dtype == DType::f32)
      values[i].resize(p.size);
    else
      halves[i].resize(p.size);
    SliceReadResult read;
    if (is_keyed(p)) {
      std::vector<KeySlot> slots(p.shape[0]);
      read = read_keyed_table(seg, p, values[i], slots, std::chrono::seconds(10));
      for (const KeySlot& s : slots) {
        keys[i].push_back(static_cast<std::int64_t>(s.key));
        stamps[i].push_back(static_cast<std::int64_t>(s.stamp));
      }
    } else {
      read = p.dtype == DType::f32 ? read_param(seg, p, 0, values[i], std::chrono::seconds(10))
                                   : read_param_raw(seg, p, 0, halves[i], std::chrono::seconds(10));
    }
    if (read.stuck_slice)
      throw Error("slice " + std::to_string(*read.stuck_slice) + " of '" + std::string(param_name(p)) +
                  "' has been mid-update for 10 s (a server died while writing it): start the server again, which "
                  "repairs it, then export; nothing was written");
    std::uint64_t hi = 0;
    for (std::uint64_t k = 0; k < p.slice_count; ++k) hi = std::max(hi, load_acquire(seg.slice(p.first_slice + k).version) / 2);
    metadata["shmps.version." + std::string(param_name(p))] = std::to_string(read.min_version) + ".." + std::to_string(hi);
    std::vector<std::uint64_t> shape(p.shape, p.shape + p.ndim);
    if (p.dtype == DType::f32)
      tensors.push_back({std::string(param_name(p)), "F32", shape, std::as_bytes(std::span<const float>(values[i]))});
    else  // BF16 / F16, the stored values as they are
      tensors.push_back({std::string(param_name(p)), std::string(safetensors_dtype(p.dtype)), shape,
                         std::as_bytes(std::span<const std::uint16_t>(halves[i]))});
    bytes += p.size * dtype_bytes(p.dtype);
    if (is_keyed(p)) {
      const std::string table(param_name(p));
      tensors.push_back({table + "/keys", "I64", {p.shape[0]}, std::as_bytes(std::span<const std::int64_t>(keys[i]))});
      tensors.push_back({table + "/key_stamps", "I64", {p.shape[0]}, std::as_bytes(std::span<const std::int64_t>(stamps[i]))});
    }
  }
  server::safetensors::write_file(path, tensors, metadata, {}, mode);
  std::cout << "exported " << h.param_count << " parameters (" << human_bytes(bytes) << ") of '" << name << "' to "
            << path << "\n";
  return 0;
}

int cmd_destroy(const std::string& name, bool force);

// A job with server groups: every replica (and its sync segment), each as `destroy` would.
int cmd_destroy_job(const std::string& job, std::uint32_t groups, bool force) {
  for (std::uint32_t g = 0; g < groups; ++g) {
    bool alive = false;
    holder(server_lock_path(replica_name(job, g)), 0, alive);
    if (alive && !force)
      throw Error("'" + job + "' is a job with " + std::to_string(groups) + " server groups, and the server of group " +
                  std::to_string(g) + " is alive: stop the job's servers first, or pass --force; nothing was removed");
  }
  for (std::uint32_t g = 0; g < groups; ++g)
    if (Segment::exists(replica_name(job, g))) cmd_destroy(replica_name(job, g), force);
  return 0;
}

int cmd_destroy(const std::string& name, bool force) {
  check_segment_name(name);
  // In the sticky /dev/shm only a file's owner (or root) can remove it: say so first, before
  // anything else is looked at (another user cannot probe the job's locks either).
  if (struct stat st {}; ::lstat(segment_path(name).c_str(), &st) == 0 && st.st_uid != ::geteuid() && ::geteuid() != 0)
    throw Error("segment '" + name + "' (" + segment_path(name) + ") belongs to another user (uid " +
                std::to_string(st.st_uid) + "): only its owner can destroy it; nothing was removed");
  if (!Segment::exists(name))
    if (const std::uint32_t groups = tools::server_groups_of(name); groups > 1) return cmd_destroy_job(name, groups, force);
  bool server_alive = false;
  holder(server_lock_path(name), 0, server_alive);
  if (!Segment::exists(name)) {
    // A server that failed before creating the segment (e.g. not enough room in /dev/shm) leaves
    // its lock file behind; `list` does not show it, so this is the one way to clean it up.
    if (!std::filesystem::exists(server_lock_path(name)) && !std::filesystem::exists(slots_lock_path(name)))
      throw Error("segment '" + name + "' does not exist (no " + segment_path(name) + "); see `shmps-ctl list`");
    if (server_alive)
      throw Error("segment '" + name + "' does not exist yet, but a live server holds its lock (it may be creating "
                  "it): stop that server first");
    Segment::remove(name);
    std::cout << "segment '" << name << "' does not exist; removed its leftover lock files\n";
    return 0;
  }
  if (server_alive && !force) {
    std::string pid = "?";
    try {
      pid = std::to_string(load_acquire(Segment::open(name, Access::read_only).header().server_pid));
    } catch (const Error&) {
    }
    throw Error("segment '" + name + "' is served by a live server (pid " + pid + "): stop it first (kill -TERM " + pid +
                "), or pass --force to remove it anyway (its processes keep their mappings until they exit)");
  }
  Segment::remove(name);
  std::cout << "removed segment '" << name << "'\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shmps-ctl: list, inspect and destroy shmps segments"};
  app.require_subcommand(1);
  auto* list = app.add_subcommand("list", "segments on this machine and whether their servers are alive");
  std::string name;
  bool force = false;
  auto* inspect = app.add_subcommand("inspect", "header, parameters, slice versions, worker slots and memory (part by "
                                                "part) of a segment");
  inspect->add_option("name", name, "segment name")->required();
  auto* workers = app.add_subcommand("workers", "every worker slot: free, alive, suspect, dead, left or evicted, and what it did");
  workers->add_option("name", name, "segment name")->required();
  std::string setting;
  auto* set = app.add_subcommand("set", "change a setting of a live job: consistency=bsp|ssp:N|asp, "
                                        "bsp_aggregate=sum|mean, on_worker_death=proceed|wait, "
                                        "straggler_timeout=10s|500ms|off");
  set->add_option("name", name, "segment name")->required();
  set->add_option("setting", setting, "KEY=VALUE")->required();
  std::string out_path;
  auto* exp = app.add_subcommand("export", "write every parameter of a live job to a safetensors file, without stopping it");
  exp->add_option("name", name, "segment name")->required();
  exp->add_option("file", out_path, "output file (.safetensors)")->required();
  bool export_group = false;
  exp->add_flag("--group", export_group, "make the file readable by the group too (0640; default 0600, the owner's only)");
  auto* ckpt = app.add_subcommand("checkpoint", "have the live server write a full checkpoint (parameters, optimizer "
                                               "state, clocks, worker resume state); returns once it is durable");
  ckpt->add_option("name", name, "segment name")->required();
  ckpt->add_option("file", out_path, "output file (default: the next file in the server's --checkpoint-dir)");
  auto* sync = app.add_subcommand("sync", "server groups: make every replica of a job equal (each group sends its "
                                          "updates home and takes the homes' values back)");
  sync->add_option("name", name, "job name (its replicas are NAME.g0, NAME.g1, ...)")->required();
  auto* destroy = app.add_subcommand("destroy", "remove a segment and its lock files");
  destroy->add_option("name", name, "segment name")->required();
  destroy->add_flag("--force", force, "remove it even while its server is alive");
  bool mpi = false;
  const char* mpi_help = "a job on several hosts (shmps-launch --mpi): run by mpirun with one rank per host, placed "
                         "as the job's servers; each rank acts on its host's replica NAME.h<rank>";
  for (auto* sub : {ckpt, sync, destroy}) sub->add_flag("--mpi", mpi, mpi_help);
  CLI11_PARSE(app, argc, argv);
  try {
    if (list->parsed()) return cmd_list();
    if (inspect->parsed()) return cmd_inspect(name);
    if (workers->parsed()) return cmd_workers(name);
    if (set->parsed()) return cmd_set(name, setting);
    if (exp->parsed()) return cmd_export(name, out_path, export_group ? 0640U : 0600U);
    if (mpi) {
      if (ckpt->parsed() && out_path.empty())
        throw Error("checkpoint --mpi NAME DIR: give the directory (on every host) for the parts and the manifest");
      if (ckpt->parsed()) return tools::mpi_checkpoint(name, out_path);
      if (sync->parsed()) return tools::mpi_sync(name);
      if (destroy->parsed()) return tools::mpi_destroy(name, [force](const std::string& replica) { cmd_destroy(replica, force); });
    }
    if (ckpt->parsed()) return cmd_checkpoint(name, out_path);
    if (sync->parsed()) return cmd_sync(name);
    if (destroy->parsed()) return cmd_destroy(name, force);
  } catch (const Error& e) {
    std::cerr << "shmps-ctl: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "shmps-ctl: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
