#include "commands.hpp"

#include <chrono>
#include <cstdlib>

#include <spdlog/spdlog.h>

#include <shmps/shm/atomics.hpp>
#include <shmps/shm/mailbox.hpp>
#include <shmps/shm/membership.hpp>

#include "checkpoint_scheduler.hpp"
#include "consistency.hpp"
#include "sync_engine.hpp"

namespace shmps::server {

using namespace shmps::shm;

// Answers the mailbox's request and logs it (request, status, reply).
void Commands::answer(int status, const std::string& reply) {
  SegmentHeader& h = segment_->header();
  const std::string request = mailbox::take_request(h).value_or("");
  mailbox::answer(h, status, reply);
  spdlog::info("event=command segment={} request=\"{}\" status={} reply=\"{}\"", h.name, request, status, reply);
}

bool Commands::waiting() const {
  if (checkpoints_->has_outcome()) return true;     // to be answered
  if (checkpoints_->request_open()) return false;  // being done
  if (sync_ && sync_->full_sync_open()) return false;  // answered by poll() once done
  return mailbox::take_request(segment_->header()).has_value();
}

void Commands::answer_checkpoint() {
  auto done = checkpoints_->take_outcome();
  if (!done) return;
  if (part_pending_ && done->status == 0 && !(sync_ && sync_->paused())) {
    // The lease ran out before the part was durable: adds and takes may have happened after
    // another rank's part was taken, so the parts would not be one cut.
    done->status = 1;
    done->reply = "the sync pause ended before this part was durable, so the parts may not be one consistent cut: "
                  "take the checkpoint again (with a longer pause)";
  }
  part_pending_ = false;
  answer(done->status, done->reply);
}

void Commands::poll() {
  answer_checkpoint();
  if (checkpoints_->request_open()) return;  // answered when the file is durable
  if (sync_ && sync_->full_sync_open()) {
    if (sync_->take_full_sync_done())
      answer(0, "synced: every slice this group is not home of sent to its home group, and its values taken back "
                "(sync round " + std::to_string(shm::load_counter(segment_->header().sync_seq)) + ")");
    return;
  }
  const SegmentHeader& h = segment_->header();
  const std::optional<std::string> request = mailbox::take_request(h);
  if (!request) return;
  const auto eq = request->find('=');
  const std::string key = request->substr(0, eq), value = eq == std::string::npos ? "" : request->substr(eq + 1);
  if (key == "sync") {
    if (!sync_)
      answer(1, "segment '" + std::string(h.name) + "' has no server groups: there is nothing to sync (shmps-launch "
                "--server-groups S starts a job with S of them)");
    else
      sync_->request_full_sync();  // answered once its answers are back
    return;
  }
  if (key == "sync_pause" || key == "sync_resume") {
    // A checkpoint of a job on several hosts (shmps-ctl checkpoint --mpi): no group adds a delta
    // or takes an answer between the first part's snapshot and the last one's, so the parts are
    // one consistent cut. The pause ends by itself after its lease, should its caller die.
    if (!sync_) {
      answer(1, "segment '" + std::string(h.name) + "' has no server groups: there is no sync to pause");
    } else if (key == "sync_resume") {
      sync_->resume();
      answer(0, "sync resumed");
    } else {
      char* end = nullptr;
      const unsigned long ms = std::strtoul(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || ms == 0 || ms > 600'000) {
        answer(1, "sync_pause=MS: a lease in milliseconds, 1 to 600000, got '" + value + "'");
      } else {
        sync_->pause_for(std::chrono::milliseconds(ms));
        answer(0, "sync paused for at most " + std::to_string(ms) + " ms");
      }
    }
    return;
  }
  if (key == "checkpoint_part") {
    // A part of a multi-host checkpoint (shmps-ctl checkpoint --mpi): only while this group's
    // sync is paused, which a restarted server's is not.
    if (!sync_ || !sync_->paused()) {
      answer(1, "this server's sync is not paused (was it restarted since the pause?): a part of a multi-host "
                "checkpoint is taken only while every rank's sync is paused; take the checkpoint again");
    } else if (value.empty() || value.front() != '/') {
      answer(1, "checkpoint_part path must be absolute, got '" + value + "'");
    } else {
      part_pending_ = true;
      checkpoints_->request(value);
    }
    return;
  }
  if (key == "checkpoint") {
    // "checkpoint" (into the checkpoint directory) or "checkpoint=/absolute/path".
    if (value.empty() && !checkpoints_->has_directory()) {
      answer(1, "this server has no checkpoint directory (shmps-server --checkpoint-dir DIR): give the file, "
                "shmps-ctl checkpoint " + std::string(h.name) + " PATH");
    } else if (!value.empty() && value.front() != '/') {
      answer(1, "checkpoint path must be absolute, got '" + value + "'");
    } else {
      checkpoints_->request(value);  // started as soon as the writer is free
    }
    return;
  }
  int status = 1;
  std::string reply;
  if (eq == std::string::npos)
    reply = "expected KEY=VALUE (consistency=bsp|ssp:N|asp, bsp_aggregate=sum|mean, on_worker_death=proceed|wait, "
            "straggler_timeout=10s|off), got '" +
            *request + "'";
  else
    reply = set(key, value, status);
  answer(status, reply);
}

// A setting: the reply, and status 0 if it was changed.
std::string Commands::set(const std::string& key, const std::string& value, int& status) {
  SegmentHeader& h = segment_->header();
  if (key == "consistency") {
    Consistency mode{};
    std::uint32_t bound = 0;
    if (std::string problem = parse_consistency(value, mode, bound); !problem.empty()) return "consistency: " + problem;
    if (mode == Consistency::bsp && segment_->has_server_groups() && h.group_count > 1)
      return "consistency: server groups in BSP need one worker group per server group (a server group writes synced "
             "values at its step boundary, which must be every worker's); this replica has " +
             std::to_string(h.group_count) + " worker groups";
    const auto old = static_cast<Consistency>(load_own(h.consistency));
    switch_consistency(*segment_, mode, bound);
    status = 0;
    std::string reply = "consistency is now " + value + " (was " + std::string(to_string(old)) + ")" +
                        (mode == Consistency::bsp ? ", from " + group_clocks_text(*segment_) : "");
    if (mode == Consistency::bsp) {
      if (const std::string note = bsp_ring_note(*segment_); !note.empty()) reply += "; note: " + note;
    }
    return reply;
  }
  if (key == "bsp_aggregate") {
    BspAggregate a{};
    if (std::string problem = parse_bsp_aggregate(value, a); !problem.empty()) return "bsp_aggregate: " + problem;
    store_release(h.bsp_aggregate, static_cast<std::uint32_t>(a));
    status = 0;
    return "bsp_aggregate is now " + value;
  }
  if (key == "on_worker_death") {
    OnWorkerDeath d{};
    if (std::string problem = parse_on_worker_death(value, d); !problem.empty()) return "on_worker_death: " + problem;
    store_release(h.on_worker_death, static_cast<std::uint32_t>(d));
    status = 0;
    return "on_worker_death is now " + value;
  }
  if (key == "straggler_timeout") {
    std::chrono::milliseconds t{};
    if (std::string problem = parse_straggler_timeout(value, t); !problem.empty()) return "straggler_timeout: " + problem;
    store_release(h.straggler_timeout_ms, static_cast<std::uint32_t>(t.count()));
    status = 0;
    return "straggler_timeout is now " + straggler_timeout_text(t) + " (until the server restarts)";
  }
  return "unknown setting '" + key + "': settable are consistency, bsp_aggregate, on_worker_death, straggler_timeout";
}

}  // namespace shmps::server
