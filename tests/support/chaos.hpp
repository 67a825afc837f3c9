// The killing phase of the chaos tests (test_crash.cpp, test_tables.cpp, test_keyed_tables.cpp):
// pushers run toward their targets while workers and the server are SIGKILLed at random and
// started again.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "harness.hpp"

namespace shmps::test {

struct ChaosKills {
  std::uint64_t workers = 0, server = 0;
  std::vector<bool> done;  // per rank: its pusher finished (exit 0) while the killing went on
};

// For `seconds`, or until every pusher has finished: every 20 to 170 ms SIGKILLs a random rank's
// pusher (pushers[rank], running) and starts it again with restart(rank); SIGKILLs the server and
// starts it again after `first_server_kill` to twice that, then every `server_kill_every` to
// twice that. A pusher found finished with exit 0 is done and left alone. Afterwards pushers[r]
// is rank r's newest pusher (running, finished, or killed last and not started again: the
// caller decides, done[r] being false).
ChaosKills kill_at_random(Job& job, std::vector<Process*>& pushers, int seconds, std::mt19937& rng,
                          const std::function<Process&(int rank)>& restart,
                          std::chrono::milliseconds first_server_kill, std::chrono::milliseconds server_kill_every);

}  // namespace shmps::test
