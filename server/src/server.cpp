// The server: start() wires the components, run() is the loop, apply_round() is one round.
//
//   bootstrap.hpp             lock, create / restore / recover the segment, announce "ready"
//   membership.hpp            deaths (lock probes), admission, who counts for a barrier
//   consistency.hpp           ASP / BSP / SSP: which collector, sum or mean, BSP's step, live switch
//   collect.hpp               the rings into a round plan (round.hpp): as they come, or whole steps
//   apply.hpp                 the round plan into the slices (exactly once, optimizer, redo.hpp)
//   publish.hpp               ring heads, counters, applied counts, wake-ups
//   metrics.hpp               what the monitor sees besides counters
//   commands.hpp              shmps-ctl's requests (the mailbox)
//   checkpoint_scheduler.hpp  when to write checkpoints, in the background
//   sync_engine.hpp           server groups: deltas to the slices' home groups, fresh values back
//   keyed_tables.hpp          tables with keys = "u64": keys to slots, admission, eviction, the key index
//   idle.hpp                  sleeping on the server's futex word when there is nothing to do
#include "shmps/server/server.hpp"

#include <spdlog/spdlog.h>

#include <optional>
#include <thread>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/futex.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/proc.hpp>
#include <shmps/shm/ring.hpp>
#include <shmps/shm/sync_segment.hpp>

#include "apply.hpp"
#include "apply_put.hpp"
#include "keyed_tables.hpp"
#include "bootstrap.hpp"
#include "checkpoint_scheduler.hpp"
#include "collect.hpp"
#include "commands.hpp"
#include "consistency.hpp"
#include "idle.hpp"
#include "membership.hpp"
#include "metrics.hpp"
#include "publish.hpp"
#include "round.hpp"
#include "sync_engine.hpp"

namespace shmps::server {

using namespace shmps::shm;

struct Server::Impl {
  ServerOptions options;
  Bootstrapped boot;  // the server lock, the segment, the apply threads
  LockFile slots_lock;
  std::vector<RingConsumer> rings;
  RoundPlan plan;
  std::optional<Membership> membership;
  std::optional<ApplyEngine> engine;
  std::optional<Metrics> metrics;
  std::optional<CheckpointScheduler> checkpoints;
  std::optional<Commands> commands;
  std::optional<SyncEngine> sync;  // server groups only
  std::optional<KeyedTables> keyed;  // tables with keys = "u64" only
  std::atomic<bool> stop_requested{false};
  // The step sums may hold part of a step that a switch out of BSP left (consistency.hpp,
  // apply_step_sums_left_by_a_switch): looked at in the first round after each switch, and the first round.
  bool step_sums_may_hold_a_step = true;
  // BSP with several worker groups: the group whose step the next round tries first (a round
  // completes at most one group's step; starting after the last one that completed keeps a fast
  // group from starving a slow one).
  std::uint32_t next_group = 0;

  Segment& segment() { return boot.segment; }
  SegmentHeader& header() { return boot.segment.header(); }
  // Whether anything was committed since the last round looked, or a command waits (a BSP step
  // may be waiting for a slow worker with records in the rings: that is no reason to spin).
  bool work_waiting() const {
    for (std::size_t r = 0; r < rings.size(); ++r)
      if (rings[r].committed() != plan.ranks[r].seen_tail) return true;
    return commands->waiting() || (sync && sync->busy());
  }
  // Server groups: whether synced values may be written now. In BSP a step's values must stay
  // as its workers view them, so only while no worker counts (between jobs' phases, at the end);
  // the step boundary itself is handled in apply_round.
  bool sync_may_write() const {
    if (load_own(boot.segment.header().consistency) != static_cast<std::uint32_t>(Consistency::bsp)) return true;
    for (std::uint32_t r = 0; r < boot.segment.header().max_workers; ++r)
      if (membership->counts(r)) return false;
    return true;
  }
  void log_ready() {
    const SegmentHeader& h = header();
    spdlog::info("event=ready segment={} epoch={} recovered={} params={} slices={} slice_floats={} workers={} "
                 "ring_bytes={} segment_bytes={} optimizer={} lr={} threads={} consistency={} staleness={} "
                 "bsp_aggregate={} on_worker_death={} straggler_timeout={}",
                 options.spec.name, load_own(h.server_epoch), boot.recovered, h.param_count, h.slice_count,
                 h.slice_floats, h.max_workers, h.ring_bytes, h.total_bytes, to_string(h.optimizer.kind),
                 h.optimizer.lr, boot.threads, to_string(static_cast<Consistency>(load_own(h.consistency))),
                 load_own(h.staleness), to_string(static_cast<BspAggregate>(load_own(h.bsp_aggregate))),
                 to_string(static_cast<OnWorkerDeath>(load_own(h.on_worker_death))),
                 straggler_timeout_text(options.spec.straggler_timeout));
  }
};

Server::Server(ServerOptions options) : impl_(std::make_unique<Impl>()) { impl_->options = std::move(options); }
Server::~Server() = default;

const Segment& Server::segment() const noexcept { return impl_->boot.segment; }
bool Server::recovered() const noexcept { return impl_->boot.recovered; }

ServerStats Server::stats() const noexcept {
  const Impl& s = *impl_;
  const auto& h = s.boot.segment.header();
  return ServerStats{load_counter(h.records_applied), load_counter(h.floats_applied), load_counter(h.apply_rounds),
                     s.membership ? s.membership->deaths_seen() : 0, s.checkpoints ? s.checkpoints->written() : 0,
                     s.boot.restored};
}

void Server::start() {
  Impl& s = *impl_;
  s.boot = bootstrap(s.options);
  Segment& segment = s.segment();
  const std::uint32_t workers = segment.header().max_workers;
  s.slots_lock = LockFile::open(slots_lock_path(s.options.spec.name), true, s.options.mode);
  for (std::uint32_t r = 0; r < workers; ++r) s.rings.emplace_back(&segment.ring(r), segment.ring_data(r));
  s.plan.ranks.assign(workers, RankRound{});
  s.membership.emplace(segment, s.slots_lock);
  s.engine.emplace(segment, *s.boot.arena);
  // After the redo repair and any restore: the key index and the recency order from the KeySlots.
  for (std::uint32_t i = 0; i < segment.header().param_count && !s.keyed; ++i)
    if (is_keyed(segment.param(i))) s.keyed.emplace(segment);
  s.metrics.emplace(segment);
  // Checkpoint files are the owner's only (0600), or readable by the group with --group (0640:
  // the group may read the model; only the owner's server writes it).
  s.checkpoints.emplace(segment, *s.boot.arena, std::move(s.boot.checkpoint_dir), s.options.checkpoint_every,
                        s.options.keep, (s.options.mode & 0060U) != 0 ? 0640U : 0600U);
  if (s.options.server_groups > 1) {
    const std::uint64_t ring_bytes = SyncSegment::ring_bytes_for(segment.header().slice_floats);
    s.sync.emplace(segment,
                   s.options.mpi ? make_mpi_sync_transport(*s.options.mpi, s.options.spec.name,
                                                           segment.header().spec_hash, segment.header().server_wake,
                                                           mpi_sync_budget(segment.header().slice_floats))
                                 : make_shm_sync_transport(s.options.job, s.options.server_group,
                                                           s.options.server_groups, ring_bytes,
                                                           segment.header().spec_hash, !s.boot.recovered,
                                                           s.options.mode),
                   s.options.spec.sync_every);
  }
  s.commands.emplace(segment, *s.checkpoints, s.sync ? &*s.sync : nullptr);

  // The straggler policy is the running server's (spec or --straggler-timeout), not the segment's:
  // written at every start, for the tools and the waiting workers' messages.
  store_release(segment.header().straggler_timeout_ms,
                static_cast<std::uint32_t>(s.options.spec.straggler_timeout.count()));
  announce_ready(segment);
  s.membership->probe_deaths();
  if (load_own(s.header().consistency) == static_cast<std::uint32_t>(Consistency::bsp)) {
    if (const std::string note = bsp_ring_note(segment); !note.empty())
      spdlog::warn("event=bsp_ring segment={} note=\"{}\"", s.options.spec.name, note);
  }
  s.log_ready();
}

std::uint64_t Server::apply_round() {
  Impl& s = *impl_;
  Segment& segment = s.segment();
  for (std::uint32_t r = 0; r < s.rings.size(); ++r) s.plan.ranks[r].begin(s.rings[r].head(), s.rings[r].committed());
  s.plan.contributions.clear();
  s.plan.puts.clear();
  s.plan.row_refs.clear();
  s.plan.keyed_rows.clear();
  s.membership->admit_new_workers();

  const RoundPolicy policy = policy_for_round(segment);
  if (policy.streamed_steps) {
    s.step_sums_may_hold_a_step = true;
  } else if (s.step_sums_may_hold_a_step && segment.streams_bsp_steps()) {
    s.step_sums_may_hold_a_step = false;  // checked once after each switch out of BSP (and at start)
    const std::uint64_t step = load_own(segment.group(0).clock);  // step sums: one group (plan_layout)
    if (apply_step_sums_left_by_a_switch(segment, *s.engine, step))
      spdlog::info("event=step_sums_applied segment={} step={} reason=\"the job left BSP in the middle of the step: "
                   "the pushes already summed are applied as that step, the rest as they come\"",
                   s.header().name, step);
  }
  bool step_complete = false;
  std::uint32_t group = 0;     // whole steps: the worker group whose step is complete
  std::uint64_t step = policy.step;
  if (policy.whole_steps) {
    // Each group's step on its own: one optimizer step per group step, summed in rank order
    // within the group, so a group's steps are reproducible whatever the other groups do.
    const std::uint32_t groups = s.header().group_count;
    for (std::uint32_t i = 0; i < groups && !step_complete; ++i) {
      group = (s.next_group + i) % groups;
      step = load_own(segment.group(group).clock);
      step_complete = collect_step(segment, s.rings, group, step, s.plan);
    }
    if (step_complete) s.next_group = (group + 1) % groups;
  } else if (policy.streamed_steps) {
    step_complete = collect_streamed_step(segment, s.rings, policy.step, s.plan);
  } else {
    collect_as_they_come(segment, s.rings, s.plan);
  }
  if (s.keyed) s.keyed->translate(s.plan);  // a keyed table's keys into slots, once every ring is read
  RoundResult result;
  result.started_ns = s.plan.contributions.empty() && s.plan.puts.empty() && !step_complete ? 0 : monotonic_ns();
  s.metrics->count_pushes(s.plan);
  const std::uint64_t put_floats = s.plan.puts.empty() ? 0 : apply_puts(segment, s.plan, segment.redo(0));
  if (policy.streamed_steps) {
    // The step's pushes go into its sums as they come; once it is complete, one optimizer step.
    result.totals = s.engine->add_to_step_sums(s.plan.contributions, policy.step);
    if (step_complete)
      s.engine->apply_step_sums(policy.step, streamed_step_scale(segment, policy.step, s.plan));
  } else {
    result.totals = s.engine->apply(s.plan.contributions, policy.aggregation, s.plan.row_refs, s.plan.keyed_rows);
  }
  if (s.keyed) {
    // The index follows the KeySlots the apply wrote, before the round is published (a worker
    // that waits for its push to be applied then finds its keys).
    s.keyed->publish_index();
    // A round that skipped contributions re-ran one a killed server had partly applied: its
    // slices' KeySlots, not this round's choices, are the truth there.
    if (result.totals.skipped != 0) s.keyed->rebuild();
  }
  result.totals.floats += put_floats;
  // Server groups in BSP: synced values go in at the step boundary, before the new step's clock
  // lets the workers read.
  if (step_complete && s.sync) s.sync->receive();
  result.step_advanced = step_complete && complete_step(segment, group, step, s.plan);
  const std::uint64_t taken = publish_round(segment, s.rings, s.plan, result, *s.metrics);
  if (const std::uint64_t discarded = s.plan.discarded()) {
    // The group and step are known only when the round completed one; pushes of a dead worker's
    // open step found in front of a put are discarded in any round.
    if (step_complete)
      spdlog::warn("event=step_discarded segment={} group={} step={} records={} reason=\"their worker died (or was "
                   "evicted as a straggler) before finishing the step\"",
                   s.header().name, group, step, discarded);
    else
      spdlog::warn("event=step_discarded segment={} records={} reason=\"their worker died (or was "
                   "evicted as a straggler) before finishing its step\"",
                   s.header().name, discarded);
  }
  return taken + (result.step_advanced ? 1 : 0);
}

void Server::run() {
  Impl& s = *impl_;
  using clock = std::chrono::steady_clock;
  auto next_liveness = clock::now();
  clock::time_point idle_since{};  // when the rounds started finding nothing (valid while `idle`)
  bool idle = false;
  SegmentHeader& h = s.header();
  while (true) {
    store_release(h.server_heartbeat_ns, monotonic_ns());
    s.commands->poll();
    const auto now = clock::now();
    if (now >= next_liveness) {
      s.membership->probe_deaths();
      // The header's copy: the spec's or --straggler-timeout, or what shmps-ctl set since.
      s.membership->evict_stragglers(std::chrono::milliseconds(load_own(h.straggler_timeout_ms)), monotonic_ns());
      next_liveness = now + s.options.liveness_interval;
    }
    std::uint64_t applied = apply_round();
    if (s.sync && s.sync->tick(s.sync_may_write())) ++applied;
    s.checkpoints->tick();
    if (applied) {
      idle = false;
      continue;
    }
    // Drained: everything committed before the stop request has been applied (the last round
    // found nothing). Pushes committed from now on stay in the rings for the next server.
    if (s.stop_requested.load(std::memory_order_acquire)) break;
    // Idle: keep polling for options.idle_poll (a push is often microseconds away), yielding the
    // core at every turn, then sleep on the futex.
    if (!idle) {
      idle = true;
      idle_since = now;
    }
    if (now - idle_since < s.options.idle_poll) {
      std::this_thread::yield();
      continue;
    }
    sleep_until_woken(h, std::chrono::microseconds(2000),
                      [&s] { return s.work_waiting() || s.stop_requested.load(std::memory_order_acquire); });
    idle = false;
  }
  s.checkpoints->finish_at_stop();
  s.commands->answer_checkpoint();
  store_release(h.state, static_cast<std::uint32_t>(SegmentState::stopped));
  const ServerStats st = stats();
  spdlog::info("event=stopped segment={} records_applied={} floats_applied={} rounds={} removed={}", s.options.spec.name,
               st.records_applied, st.floats_applied, st.rounds, s.options.remove_on_stop);
  if (s.options.remove_on_stop) Segment::remove(s.options.spec.name);
}

void Server::stop() noexcept {
  impl_->stop_requested.store(true, std::memory_order_release);
  if (impl_->boot.segment.base()) {
    // Our own word: bump it so a sleeping run() wakes (no lost wake-up), then wake.
    auto& word = impl_->boot.segment.header().server_wake;
    word.fetch_add(1, std::memory_order_acq_rel);
    futex_wake_all(word);
  }
}

}  // namespace shmps::server
