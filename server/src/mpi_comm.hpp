// A server's one MPI communication thread (server groups on several hosts, docs/several-hosts.md).
//
// Every MPI call of the process happens on this thread: it initialises MPI (thread level
// MPI_THREAD_FUNNELED, which is all that needs; checked, with a clear error if the library gives
// less), sends the batches others queue with non-blocking point-to-point sends, receives what
// arrives with matched probes, runs the rare collectives asked of it, and finalises MPI. The
// threads that apply updates never call MPI and never wait for it: they hand batches over and
// take received ones through short critical sections that hold no MPI call.
//
// A batch is a byte buffer aligned to 64 bytes (so that it can hold the rings' PushRecords, which
// are). Per (peer, tag), batches arrive in the order they were sent (MPI's non-overtaking rule).
// A message lost with a process is not a loss for the protocol above: Open MPI ends the whole job
// when one rank dies, and every server resumes from its segment, which says what is in flight.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace shmps::server {

// 64-byte aligned bytes: `size` used of `capacity`.
class Batch {
 public:
  Batch() = default;
  explicit Batch(std::size_t capacity);
  std::byte* data() noexcept { return data_.get(); }
  const std::byte* data() const noexcept { return data_.get(); }
  std::size_t capacity() const noexcept { return capacity_; }
  std::size_t size = 0;
  explicit operator bool() const noexcept { return data_ != nullptr; }

 private:
  struct Free {
    void operator()(std::byte* p) const noexcept;
  };
  std::unique_ptr<std::byte[], Free> data_;
  std::size_t capacity_ = 0;
};

// What a peer link has carried, for monitors (counted by the communication thread).
struct PeerTraffic {
  std::uint64_t bytes_sent = 0, bytes_received = 0, batches_sent = 0, batches_received = 0;
  std::uint64_t last_received_unix_ns = 0;
};

class MpiComm {
 public:
  static constexpr int kTags = 2;

  // Starts the thread, which initialises MPI; returns once it has (or throws shmps::Error with
  // what went wrong and what to do: not started by mpirun, thread level too low).
  MpiComm();
  ~MpiComm();  // stops the thread, which finalises MPI
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  const std::string& host() const noexcept { return host_; }
  // Every rank's `value`, by rank (MPI_Allgather on the communication thread; every rank must call
  // it, in the same order). Waits for it.
  std::vector<std::uint64_t> allgather(std::uint64_t value);
  // Runs `task` on the communication thread (where every MPI call must be made: a benchmark's
  // ping-pong, a collective) and waits for it. Sends and receives wait meanwhile.
  void run(const std::function<void()>& task);

  // A batch of at least `capacity` bytes (rounded up to whole MiB), size 0: one given back
  // earlier if there is one (fresh pages cost a fault each; a sync round moves many batches),
  // else a new one.
  Batch batch(std::size_t capacity);
  // Gives a batch whose records were handled back for reuse.
  void recycle(Batch batch);
  // Hands `batch` to the thread, to be sent to `to` with `tag` (then recycled).
  void send(int to, int tag, Batch batch);
  // Bytes handed to send() for (to, tag) whose sends have not completed.
  std::uint64_t bytes_pending(int to, int tag) const;
  // Moves the batches received from `from` with `tag` to the end of `out`.
  void take(int from, int tag, std::deque<Batch>& out);
  // Received batches not taken yet.
  bool received_waiting() const noexcept { return received_waiting_.load(std::memory_order_acquire) != 0; }
  // Stop receiving `tag` while this many bytes of it wait to be taken (0: no limit). Holding off
  // is how a slow receiver pushes back: the sender's pending bytes then stay high.
  void set_receive_limit(int tag, std::uint64_t bytes);
  // Called on the communication thread after batches arrived (to wake a sleeping server).
  void on_received(std::function<void()> wake);
  std::vector<PeerTraffic> traffic() const;

 private:
  struct Impl;
  void loop();

  std::unique_ptr<Impl> impl_;
  int rank_ = -1, size_ = 0;
  std::string host_;
  std::atomic<std::uint64_t> received_waiting_{0};
  std::thread thread_;
};

}  // namespace shmps::server
