// A job with server groups, as the tools see it: its replicas (<job>.g0, <job>.g1, ...) and the
// final sync that makes them equal (shmps-ctl sync, shmps-launch at the end of a job).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

namespace shmps::tools {

// The number of server groups of job `job` (read from its replica <job>.g0), or 0 if no replica
// of it exists.
std::uint32_t server_groups_of(const std::string& job);

// Makes every replica of `job` equal, through the live servers: each group in turn does a full
// sync round (every slice it is not home of goes to its home group, and the home's values come
// back), twice: the first pass brings every group's updates home, the second every home's values
// to every group. Pushes that arrive meanwhile are synced by the groups' next rounds. Each
// group's round may take up to `limit`. `while_waiting` is called every 200 ms meanwhile (the
// launcher forwards its children's output there, and throws to give up when interrupted).
// Returns what was done; throws shmps::Error naming the group whose server is not alive or did
// not answer.
std::string sync_job(const std::string& job, std::uint32_t groups, std::chrono::seconds limit,
                     const std::function<void()>& while_waiting = {});

}  // namespace shmps::tools
