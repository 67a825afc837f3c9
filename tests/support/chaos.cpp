#include "chaos.hpp"

#include <signal.h>

#include <algorithm>
#include <thread>

namespace shmps::test {

ChaosKills kill_at_random(Job& job, std::vector<Process*>& pushers, int seconds, std::mt19937& rng,
                          const std::function<Process&(int rank)>& restart,
                          std::chrono::milliseconds first_server_kill, std::chrono::milliseconds server_kill_every) {
  using namespace std::chrono_literals;
  using clock = std::chrono::steady_clock;
  const auto between = [&](std::chrono::milliseconds base) {
    return base + std::chrono::milliseconds(rng() % static_cast<std::uint64_t>(2 * base.count()));
  };
  const int workers = static_cast<int>(pushers.size());
  ChaosKills kills;
  kills.done.assign(pushers.size(), false);
  const auto start = clock::now();
  auto next_server_kill = start + between(first_server_kill);
  while (clock::now() - start < std::chrono::seconds(seconds)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20 + rng() % 150));
    const int r = static_cast<int>(rng() % static_cast<unsigned>(workers));
    if (!kills.done[r] && pushers[r]->running()) {
      pushers[r]->kill(SIGKILL);
      pushers[r]->wait(10s);
      ++kills.workers;
    }
    if (!pushers[r]->running() && !kills.done[r]) {
      if (pushers[r]->wait(1s) == 0)
        kills.done[r] = true;
      else
        pushers[r] = &restart(r);
    }
    if (clock::now() > next_server_kill) {
      job.server().kill(SIGKILL);
      job.server().wait(10s);
      ++kills.server;
      job.start_server();
      job.wait_ready();
      next_server_kill = clock::now() + between(server_kill_every);
    }
    if (std::all_of(kills.done.begin(), kills.done.end(), [](bool d) { return d; })) break;
  }
  return kills;
}

}  // namespace shmps::test
