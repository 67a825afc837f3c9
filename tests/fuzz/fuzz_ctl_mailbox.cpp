// Fuzz target ctl_mailbox: a hostile or buggy `shmps-ctl`. The fuzzer's bytes are written into
// the command mailbox of a fresh segment (a server started in this process) as the request, up
// to the mailbox's size and not necessarily NUL-terminated, the mailbox is marked submitted, and
// the server's half of the protocol (Commands::poll, as the server loop calls it between rounds)
// reads and answers it.
// Checks: poll() returns (no exception, no sanitizer report); the request is then answered
// (state done, status 0 or 1, a NUL-terminated reply) unless it is a checkpoint request, which
// is answered once its file is durable: a checkpoint into this harness's scratch directory is
// written and then answered; one anywhere else is never written (the fuzzer must not write
// files all over the machine), and the harness checks only that it is pending.
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#include <tbb/task_arena.h>

#include <shmps/error.hpp>
#include <shmps/server/checkpoint.hpp>
#include <shmps/server/model_spec.hpp>
#include <shmps/server/server.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/layout.hpp>

#include "checkpoint_scheduler.hpp"
#include "commands.hpp"
#include "fuzz_support.hpp"

namespace {

using namespace shmps;

constexpr const char* kModel = R"(
max_workers = 2
slice_bytes = 256
ring_bytes = 8192
[optimizer]
kind = "momentum"
lr = 0.5
momentum = 0.9
[[param]]
name = "p"
shape = [100]
)";

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_log();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::filesystem::path dir = fuzz::scratch_dir("ctl_mailbox");
  static tbb::task_arena arena(1);
  const std::string name = fuzz::unique_segment("ctl");
  {
    server::ServerOptions o;
    o.spec = server::parse_model_spec("name = \"" + name + "\"\n" + kModel, "<fuzz spec>");
    o.threads = 1;
    server::Server s(std::move(o));
    s.start();
    shm::Segment& seg = const_cast<shm::Segment&>(s.segment());
    shm::SegmentHeader& h = seg.header();
    server::CheckpointScheduler checkpoints(seg, arena, server::CheckpointDir(dir, name), {}, 1);
    server::Commands commands(seg, checkpoints);

    std::memset(h.mailbox_request, 0, shm::kMailboxBytes);
    std::memcpy(h.mailbox_request, data, std::min(size, shm::kMailboxBytes));
    shm::store_release(h.mailbox_state, static_cast<std::uint32_t>(shm::MailboxState::submitted));
    const std::string request(h.mailbox_request, ::strnlen(h.mailbox_request, shm::kMailboxBytes));

    commands.poll();
    if (checkpoints.request_open()) {
      SHMPS_FUZZ_CHECK(request.rfind("checkpoint", 0) == 0);
      SHMPS_FUZZ_CHECK(shm::load_acquire(h.mailbox_state) == static_cast<std::uint32_t>(shm::MailboxState::submitted));
      const auto eq = request.find('=');
      const std::string path = eq == std::string::npos ? "" : request.substr(eq + 1);
      const bool ours = path.empty() || (path.rfind(dir.string() + "/", 0) == 0 && path.find("/..") == std::string::npos);
      if (ours) {
        checkpoints.tick();
        checkpoints.finish_at_stop();
        commands.poll();
      }
    }
    if (!checkpoints.request_open()) {
      SHMPS_FUZZ_CHECK(shm::load_acquire(h.mailbox_state) == static_cast<std::uint32_t>(shm::MailboxState::done));
      SHMPS_FUZZ_CHECK(h.mailbox_status == 0 || h.mailbox_status == 1);
      SHMPS_FUZZ_CHECK(::strnlen(h.mailbox_reply, shm::kMailboxBytes) < shm::kMailboxBytes);
    }
  }
  fuzz::remove_segment(name);
  {
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(dir, ec)) std::filesystem::remove_all(e.path(), ec);
  }
  return 0;
}
