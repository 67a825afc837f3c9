// The two views of a WorkerSlot (worker_slot.hpp), on a slot in ordinary memory: what each side
// writes arrives on the other, and each writes only its own lines.
#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <vector>

#include <shmps/shm/membership.hpp>
#include <shmps/shm/worker_slot.hpp>

using namespace shmps::shm;

namespace {
// A WorkerSlot in ordinary memory, zeroed as a new segment's are, so that a write to any byte of
// it shows in a comparison of the bytes.
struct TestSlot {
  alignas(WorkerSlot) std::array<std::byte, sizeof(WorkerSlot)> bytes;
  TestSlot() { bytes.fill(std::byte{0}); }
  WorkerSlot& slot() { return *reinterpret_cast<WorkerSlot*>(bytes.data()); }
  std::vector<std::byte> range(std::size_t from, std::size_t to) const {
    return {bytes.begin() + static_cast<std::ptrdiff_t>(from), bytes.begin() + static_cast<std::ptrdiff_t>(to)};
  }
};

// The worker's lines are the bytes before `applied`; the server's from there on (layout.hpp).
constexpr std::size_t kServerLines = offsetof(WorkerSlot, applied);

std::vector<std::byte> blob(std::initializer_list<int> values) {
  std::vector<std::byte> b;
  for (int v : values) b.push_back(static_cast<std::byte>(v));
  return b;
}
}  // namespace

TEST(WorkerSlotViews, AttachIsSeenByTheServer) {
  TestSlot t;
  WorkerSlotWorkerView worker(t.slot());
  WorkerSlotServerView server(t.slot());
  EXPECT_EQ(server.state(), SlotState::free);
  worker.attach({.generation = 3, .pid = 4242, .start_time = 7, .attached_unix_ns = 8, .published = 11, .clock = 5,
                 .heartbeat_ns = 9});
  EXPECT_EQ(server.state(), SlotState::attached);
  EXPECT_EQ(server.generation(), 3u);
  EXPECT_EQ(server.pid(), 4242);
  EXPECT_EQ(server.published(), 11u);
  EXPECT_EQ(server.clock(), 5u);
  EXPECT_EQ(load_acquire(t.slot().start_time), 7u);
  EXPECT_EQ(load_acquire(t.slot().attached_unix_ns), 8u);
  EXPECT_EQ(load_acquire(t.slot().heartbeat_ns), 9u);
  EXPECT_EQ(worker.previous_generation(), 3u);
  worker.leave();
  EXPECT_EQ(server.state(), SlotState::left);
}

TEST(WorkerSlotViews, PublishedPushesAndTheirCommitTimeReachTheServer) {
  TestSlot t;
  WorkerSlotWorkerView worker(t.slot());
  WorkerSlotServerView server(t.slot());
  EXPECT_FALSE(server.last_commit().has_value());  // nothing committed yet
  worker.publish(12, 34000);
  ASSERT_TRUE(server.last_commit().has_value());
  EXPECT_EQ(server.last_commit()->seq, 12u);
  EXPECT_EQ(server.last_commit()->ns, 34000u);
  EXPECT_EQ(server.published(), 12u);
  worker.set_clock(6);
  EXPECT_EQ(server.clock(), 6u);
}

TEST(WorkerSlotViews, AdmissionAndRoundsReachTheWorkerAndWakeIt) {
  TestSlot t;
  WorkerSlotWorkerView worker(t.slot());
  WorkerSlotServerView server(t.slot());
  const std::uint32_t progress = load_acquire(worker.progress_word());
  server.admit(2, 40);
  EXPECT_EQ(worker.admitted_generation(), 2u);
  EXPECT_EQ(worker.admitted_clock(), 40u);
  EXPECT_EQ(server.admitted_generation(), 2u);
  EXPECT_EQ(load_acquire(worker.progress_word()), progress + 1);  // a waiting worker would wake
  server.count_round(3, 1, 17);
  EXPECT_EQ(worker.applied(), 17u);
  EXPECT_EQ(load_acquire(t.slot().records_applied), 3u);
  EXPECT_EQ(load_acquire(t.slot().records_discarded), 1u);
  server.count_round(2, 0, 15);  // an older sequence number: `applied` does not move back
  EXPECT_EQ(worker.applied(), 17u);
  EXPECT_EQ(load_acquire(t.slot().records_applied), 5u);
  // The waiting flag is set by the worker's futex wait; the server's wake still bumps progress.
  store_own(worker.waiting_flag(), 1U);
  server.wake_worker();
  EXPECT_EQ(load_acquire(worker.progress_word()), progress + 2);
}

TEST(WorkerSlotViews, ConsumedClockOnlyMovesForward) {
  TestSlot t;
  WorkerSlotServerView server(t.slot());
  server.raise_consumed_clock(9);
  server.raise_consumed_clock(4);
  EXPECT_EQ(server.consumed_clock(), 9u);
}

TEST(WorkerSlotViews, AHolderMarkedDeadNoLongerCounts) {
  TestSlot t;
  SegmentHeader header;
  store_release(header.on_worker_death, static_cast<std::uint32_t>(shmps::OnWorkerDeath::proceed));
  WorkerSlotWorkerView worker(t.slot());
  WorkerSlotServerView server(t.slot());
  worker.attach({.generation = 1});
  EXPECT_FALSE(counts_for_group(header, t.slot()));  // not admitted yet
  server.admit(1, 0);
  EXPECT_TRUE(counts_for_group(header, t.slot()));
  server.mark_dead(1);
  EXPECT_EQ(server.dead_generation(), 1u);
  EXPECT_FALSE(counts_for_group(header, t.slot()));
}

TEST(WorkerSlotViews, TheResumeBlobTheServerKeepsIsWhatTheWorkerReads) {
  TestSlot t;
  WorkerSlotWorkerView worker(t.slot());
  WorkerSlotServerView server(t.slot());
  EXPECT_TRUE(worker.resume_blob().empty());
  const auto state = blob({1, 2, 3, 250});
  server.keep_resume(state, 8);
  EXPECT_EQ(worker.resume_blob(), state);
  EXPECT_EQ(load_acquire(t.slot().resume_clock), 8u);
  EXPECT_EQ(load_acquire(t.slot().resume_version), 2u);  // even: a complete write
  server.keep_resume(blob({9}), 9);
  EXPECT_EQ(worker.resume_blob(), blob({9}));
  EXPECT_EQ(load_acquire(t.slot().resume_version), 4u);
}

TEST(WorkerSlotViews, WorkerStatisticsAccumulate) {
  TestSlot t;
  WorkerSlotWorkerView worker(t.slot());
  worker.count_pull(400);
  worker.count_pull(100);
  worker.count_push_bytes(64);
  worker.count_rejected_push();
  worker.add_backpressure_ns(5);
  worker.add_wait_ns(6);
  worker.record_staleness(3);
  worker.record_staleness(1);
  const WorkerSlot& s = worker.slot();
  EXPECT_EQ(load_counter(s.pulls), 2u);
  EXPECT_EQ(load_counter(s.pull_bytes), 500u);
  EXPECT_EQ(load_counter(s.push_bytes), 64u);
  EXPECT_EQ(load_counter(s.pushes_rejected), 1u);
  EXPECT_EQ(load_counter(s.backpressure_ns), 5u);
  EXPECT_EQ(load_counter(s.wait_ns), 6u);
  EXPECT_EQ(load_counter(s.last_staleness), 1u);
  EXPECT_EQ(load_counter(s.max_staleness), 3u);
}

TEST(WorkerSlotViews, EachSideWritesOnlyItsOwnLines) {
  TestSlot t;
  WorkerSlotWorkerView worker(t.slot());
  WorkerSlotServerView server(t.slot());
  std::vector<std::byte> server_lines = t.range(kServerLines, sizeof(WorkerSlot));
  std::vector<std::byte> worker_lines = t.range(0, kServerLines);
  // Every write the worker's view offers.
  worker.attach({.generation = 1, .pid = 2, .start_time = 3, .attached_unix_ns = 4, .published = 5, .clock = 6,
                 .heartbeat_ns = 7});
  worker.set_clock(8);
  worker.publish(9, 10);
  store_own(worker.waiting_flag(), 1U);
  worker.heartbeat(11);
  worker.count_pull(12);
  worker.count_push_bytes(13);
  worker.count_rejected_push();
  worker.add_backpressure_ns(14);
  worker.add_wait_ns(15);
  worker.record_staleness(16);
  worker.leave();
  EXPECT_EQ(t.range(kServerLines, sizeof(WorkerSlot)), server_lines) << "the worker wrote a server line";
  EXPECT_NE(t.range(0, kServerLines), worker_lines);
  // Every write the server's view offers during a job (restore() is the documented exception).
  worker_lines = t.range(0, kServerLines);
  server_lines = t.range(kServerLines, sizeof(WorkerSlot));
  server.mark_dead(1);
  server.admit(1, 2);
  server.raise_consumed_clock(3);
  server.count_round(4, 5, 6);
  server.wake_worker();
  server.keep_resume(blob({7, 8}), 9);
  EXPECT_EQ(t.range(0, kServerLines), worker_lines) << "the server wrote a worker line";
  EXPECT_NE(t.range(kServerLines, sizeof(WorkerSlot)), server_lines);
}

TEST(WorkerSlotViews, ARestoredSlotIsAGoneHolderThatTheNextWorkerContinues) {
  TestSlot t;
  WorkerSlotServerView server(t.slot());
  WorkerSlotWorkerView worker(t.slot());
  const auto state = blob({5, 6});
  server.restore({.state = static_cast<std::uint32_t>(SlotState::attached),
                  .generation = 4,
                  .applied = 30,
                  .consumed_clock = 12,
                  .records_applied = 29,
                  .records_discarded = 1,
                  .resume = state,
                  .resume_clock = 11});
  EXPECT_EQ(server.state(), SlotState::attached);
  EXPECT_EQ(server.dead_generation(), 4u);  // its holder is gone
  EXPECT_EQ(server.admitted_generation(), 4u);
  EXPECT_EQ(worker.previous_generation(), 4u);
  EXPECT_EQ(worker.previous_published(), 30u);
  EXPECT_EQ(worker.applied(), 30u);
  EXPECT_EQ(worker.previous_clock(), 12u);
  EXPECT_EQ(worker.admitted_clock(), 12u);
  EXPECT_EQ(server.consumed_clock(), 12u);
  EXPECT_EQ(worker.resume_blob(), state);
}
