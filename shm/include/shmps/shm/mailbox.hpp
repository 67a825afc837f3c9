// The command mailbox: both halves of the protocol by which a tool (shmps-ctl) asks the live
// server to do something ("consistency=bsp", "checkpoint=/path"). The words are in the segment
// header (layout.hpp: mailbox_*); they are the only words a tool ever writes.
//
//   tool                                   server (between two apply rounds)
//   free --CAS--> claimed                   
//   writes request, pid
//   claimed --> submitted, wakes server --> take_request(): sees submitted, reads request
//                                           ... does it (a checkpoint may take a while) ...
//   sees done, reads reply           <----- answer(): writes status + reply, submitted --> done
//   done --> free
//
// The server never waits on the mailbox (a tool can die at any point): it looks at it once per
// loop. A claim whose holder died (its pid is gone) is taken over by the next tool; a tool whose
// server dies before answering gives up with a clear message, and the request stays for the
// next server only if the tool is still waiting.
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include <shmps/shm/layout.hpp>

namespace shmps::shm::mailbox {

// ---- The tool's half --------------------------------------------------------------------------

struct Answer {
  int status;         // 0: done as asked; else refused, and `reply` says why
  std::string reply;  // what the server did, or why not
};

// Claims the mailbox (waiting up to 10 s for another tool's claim; taking over a dead tool's),
// submits `request`, wakes the server, and waits for its answer: up to `limit`, or with no limit
// for as long as `server_alive()` says the server lives (probed every 200 ms). Throws
// shmps::Error with what happened and what to do; `segment_name` is for the messages.
Answer ask(SegmentHeader& header, std::string_view segment_name, const std::string& request,
           std::optional<std::chrono::seconds> limit, const std::function<bool()>& server_alive);

// ---- The server's half ------------------------------------------------------------------------

// The submitted request, if a tool has submitted one that is not answered yet.
std::optional<std::string> take_request(const SegmentHeader& header);

// Answers the submitted request (status 0: done; else refused) and marks it done.
void answer(SegmentHeader& header, int status, std::string_view reply);

}  // namespace shmps::shm::mailbox
