// The server's half of the command mailbox (the protocol, both halves: shm/mailbox.hpp): what
// shmps-ctl may ask a live server, and how each request is answered. Looked at once per loop,
// between apply rounds, so a switch of consistency happens at a clock boundary.
//
//   consistency=asp|bsp|ssp:N      switch the live job (consistency.hpp)
//   bsp_aggregate=sum|mean         how a BSP step combines its workers' gradients
//   on_worker_death=proceed|wait   whether barriers wait for a dead worker's slot to be retaken
//   straggler_timeout=10s|off      when a BSP straggler is evicted (until the server restarts)
//   checkpoint[=/absolute/path]    a checkpoint now (checkpoint_scheduler.hpp), answered when durable
//   sync                           server groups: a full sync round (sync_engine.hpp), answered
//                                  when every answer of it is back
//   sync_pause=MS, sync_resume     server groups: no delta added and no answer taken for at most
//                                  MS ms (a multi-host checkpoint's consistent cut)
//   checkpoint_part=/absolute/path a part of a multi-host checkpoint: refused unless the sync is
//                                  paused, and failed if the pause ended before it was durable
#pragma once

#include <string>

#include <shmps/shm/segment.hpp>

namespace shmps::server {

class CheckpointScheduler;
class SyncEngine;

class Commands {
 public:
  Commands(shm::Segment& segment, CheckpointScheduler& checkpoints, SyncEngine* sync = nullptr)
      : segment_(&segment), checkpoints_(&checkpoints), sync_(sync) {}

  // Answers a checkpoint request whose file is now durable (or failed); then does the request
  // waiting in the mailbox, if any, and answers it (a checkpoint is answered once durable, by a
  // later poll() or answer_checkpoint()).
  void poll();

  // Answers a checkpoint request whose file is now durable (or failed), if there is one.
  void answer_checkpoint();

  // A request is waiting that poll() has not taken yet.
  bool waiting() const;

 private:
  std::string set(const std::string& key, const std::string& value, int& status);
  void answer(int status, const std::string& reply);
  shm::Segment* segment_;
  CheckpointScheduler* checkpoints_;
  SyncEngine* sync_;  // null: no server groups
  bool part_pending_ = false;  // the checkpoint requested is a part of a multi-host one
};

}  // namespace shmps::server
