#include "shmps/shm/mailbox.hpp"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/futex.hpp>

namespace shmps::shm::mailbox {

namespace {

constexpr auto kFree = static_cast<std::uint32_t>(MailboxState::free);
constexpr auto kClaimed = static_cast<std::uint32_t>(MailboxState::claimed);
constexpr auto kSubmitted = static_cast<std::uint32_t>(MailboxState::submitted);
constexpr auto kDone = static_cast<std::uint32_t>(MailboxState::done);

void claim(SegmentHeader& h, std::string_view segment_name) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (true) {
    std::uint32_t expected = kFree;
    if (h.mailbox_state.compare_exchange_strong(expected, kClaimed, std::memory_order_acq_rel)) break;
    const pid_t holder_pid = load_acquire(h.mailbox_pid);
    if (holder_pid > 0 && ::kill(holder_pid, 0) != 0 && errno == ESRCH &&
        h.mailbox_state.compare_exchange_strong(expected, kClaimed, std::memory_order_acq_rel))
      break;  // its holder died: take the claim over
    if (std::chrono::steady_clock::now() > deadline)
      throw Error("the command mailbox of '" + std::string(segment_name) + "' stayed busy for 10 s (another shmps-ctl, pid " +
                  std::to_string(holder_pid) + "); try again");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  store_release(h.mailbox_pid, static_cast<std::int32_t>(::getpid()));
}

}  // namespace

Answer ask(SegmentHeader& h, std::string_view segment_name, const std::string& request,
           std::optional<std::chrono::seconds> limit, const std::function<bool()>& server_alive) {
  if (request.size() >= kMailboxBytes) throw Error("the request is too long (" + std::to_string(request.size()) + " bytes)");
  const std::string name(segment_name);
  claim(h, segment_name);
  std::memset(h.mailbox_request, 0, kMailboxBytes);
  std::memcpy(h.mailbox_request, request.data(), request.size());
  store_release(h.mailbox_state, kSubmitted);
  futex_wake_all(h.server_wake);
  const auto started = std::chrono::steady_clock::now();
  auto next_probe = started;
  while (load_acquire(h.mailbox_state) != kDone) {
    const auto now = std::chrono::steady_clock::now();
    if (limit && now - started > *limit) {
      store_release(h.mailbox_state, kFree);
      throw Error("the server of '" + name + "' did not answer within " + std::to_string(limit->count()) + " s; '" +
                  request + "' may not have been done");
    }
    if (now >= next_probe) {  // a server that died leaves the request to its successor
      if (!server_alive()) {
        store_release(h.mailbox_state, kFree);
        throw Error("the server of '" + name + "' stopped before answering; '" + request + "' may not have been done");
      }
      next_probe = now + std::chrono::milliseconds(200);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  Answer result{h.mailbox_status, std::string(h.mailbox_reply, ::strnlen(h.mailbox_reply, kMailboxBytes))};
  store_release(h.mailbox_pid, 0);
  store_release(h.mailbox_state, kFree);
  return result;
}

std::optional<std::string> take_request(const SegmentHeader& h) {
  if (load_acquire(h.mailbox_state) != kSubmitted) return std::nullopt;
  return std::string(h.mailbox_request, ::strnlen(h.mailbox_request, kMailboxBytes));
}

void answer(SegmentHeader& h, int status, std::string_view reply) {
  h.mailbox_status = status;
  std::memset(h.mailbox_reply, 0, kMailboxBytes);
  std::memcpy(h.mailbox_reply, reply.data(), std::min(reply.size(), kMailboxBytes - 1));
  store_release(h.mailbox_state, kDone);
}

}  // namespace shmps::shm::mailbox
