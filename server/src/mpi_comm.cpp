#include "mpi_comm.hpp"

#include <mpi.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <new>

#include <shmps/error.hpp>
#include <shmps/shm/proc.hpp>

// Under ThreadSanitizer: what MPI reads of a batch it sends and writes of one it receives,
// declared on this thread (Open MPI is not instrumented, and its own reports are suppressed,
// tests/sanitizers/tsan.supp): a batch touched by the engine while MPI has it is then reported
// with shmps's stacks only.
#if defined(__SANITIZE_THREAD__)
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);
#define SHMPS_MPI_READS(p, n) __tsan_read_range(p, n)
#define SHMPS_MPI_WRITES(p, n) __tsan_write_range(p, n)
#else
#define SHMPS_MPI_READS(p, n) ((void)(p), (void)(n))
#define SHMPS_MPI_WRITES(p, n) ((void)(p), (void)(n))
#endif

namespace shmps::server {

namespace {
constexpr std::align_val_t kAlign{64};
constexpr std::size_t kMiB = std::size_t{1} << 20;
// Whole MiB, at least one.
std::size_t batch_capacity(std::size_t bytes) { return std::max<std::size_t>(1, (bytes + kMiB - 1) / kMiB) * kMiB; }
}  // namespace

Batch::Batch(std::size_t capacity)
    : data_(static_cast<std::byte*>(::operator new[](std::max<std::size_t>(capacity, 64), kAlign))),
      capacity_(std::max<std::size_t>(capacity, 64)) {}

void Batch::Free::operator()(std::byte* p) const noexcept { ::operator delete[](p, kAlign); }

struct MpiComm::Impl {
  mutable std::mutex mutex;  // guards everything below up to `thread only`; never held across an MPI call
  std::condition_variable started_cv, finalized_cv;
  bool started = false, stop = false, finalized = false;
  std::string start_error;
  struct Out {
    int to, tag;
    Batch batch;
  };
  std::deque<Out> to_send;
  std::vector<std::array<std::uint64_t, kTags>> pending_bytes;
  std::vector<std::array<std::deque<Batch>, kTags>> inbox;
  std::array<std::uint64_t, kTags> inbox_bytes{}, limit{};
  std::deque<std::function<void()>> tasks;
  std::function<void()> wake;
  std::vector<PeerTraffic> traffic;
  // Batches for reuse. Capacities come in whole MiB (batch_capacity), so that a batch received
  // (as big as its message) serves a batch to send and the other way round; at most kMaxFreeBytes
  // are kept.
  std::vector<Batch> free;
  std::size_t free_bytes = 0;
  static constexpr std::size_t kMaxFreeBytes = std::size_t{64} << 20;

  Batch reuse(std::size_t capacity) {  // with the mutex held
    const std::size_t want = batch_capacity(capacity);
    for (std::size_t i = free.size(); i-- > 0;)
      if (free[i].capacity() == want) {
        Batch b = std::move(free[i]);
        free.erase(free.begin() + static_cast<std::ptrdiff_t>(i));
        free_bytes -= b.capacity();
        b.size = 0;
        return b;
      }
    return Batch(want);
  }
  void keep(Batch b) {  // with the mutex held
    if (free_bytes + b.capacity() > kMaxFreeBytes) return;
    free_bytes += b.capacity();
    free.push_back(std::move(b));
  }

  // thread only
  struct InFlight {
    MPI_Request request;
    int to, tag;
    Batch batch;
  };
  std::vector<InFlight> in_flight;
};

MpiComm::MpiComm() : impl_(std::make_unique<Impl>()) {
  thread_ = std::thread([this] { loop(); });
  std::unique_lock lock(impl_->mutex);
  impl_->started_cv.wait(lock, [this] { return impl_->started; });
  if (!impl_->start_error.empty()) {
    lock.unlock();
    thread_.join();
    throw Error(impl_->start_error);
  }
}

MpiComm::~MpiComm() {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->stop = true;
    impl_->wake = nullptr;
  }
  if (!thread_.joinable()) return;
  // MPI_Finalize waits for every rank. When the whole job stops (mpirun forwards the signal to
  // every rank) they all get there; a server stopped alone would wait forever, holding its lock,
  // and its peers would wait for its answers. So it leaves without finalising after a while, and
  // mpirun ends the job, which the launcher starts again.
  std::unique_lock lock(impl_->mutex);
  if (!impl_->finalized_cv.wait_for(lock, std::chrono::seconds(10), [this] { return impl_->finalized; })) {
    std::fprintf(stderr, "shmps-server: MPI_Finalize did not return within 10 s (the other ranks go on): leaving "
                         "without it (exit code 3); mpirun ends the job\n");
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(3);
  }
  lock.unlock();
  thread_.join();
}

std::vector<std::uint64_t> MpiComm::allgather(std::uint64_t value) {
  std::vector<std::uint64_t> all(static_cast<std::size_t>(size_));
  run([&] { MPI_Allgather(&value, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD); });
  return all;
}

void MpiComm::run(const std::function<void()>& task) {
  std::promise<void> done;
  {
    std::lock_guard lock(impl_->mutex);
    impl_->tasks.push_back([&] {
      task();
      done.set_value();
    });
  }
  done.get_future().wait();
}

Batch MpiComm::batch(std::size_t capacity) {
  std::lock_guard lock(impl_->mutex);
  return impl_->reuse(capacity);
}

void MpiComm::recycle(Batch batch) {
  std::lock_guard lock(impl_->mutex);
  impl_->keep(std::move(batch));
}

void MpiComm::send(int to, int tag, Batch batch) {
  std::lock_guard lock(impl_->mutex);
  impl_->pending_bytes[static_cast<std::size_t>(to)][static_cast<std::size_t>(tag)] += batch.size;
  impl_->to_send.push_back({to, tag, std::move(batch)});
}

std::uint64_t MpiComm::bytes_pending(int to, int tag) const {
  std::lock_guard lock(impl_->mutex);
  return impl_->pending_bytes[static_cast<std::size_t>(to)][static_cast<std::size_t>(tag)];
}

void MpiComm::take(int from, int tag, std::deque<Batch>& out) {
  std::lock_guard lock(impl_->mutex);
  auto& in = impl_->inbox[static_cast<std::size_t>(from)][static_cast<std::size_t>(tag)];
  for (Batch& b : in) {
    impl_->inbox_bytes[static_cast<std::size_t>(tag)] -= b.capacity();
    out.push_back(std::move(b));
  }
  received_waiting_.fetch_sub(in.size(), std::memory_order_acq_rel);
  in.clear();
}

void MpiComm::set_receive_limit(int tag, std::uint64_t bytes) {
  std::lock_guard lock(impl_->mutex);
  impl_->limit[static_cast<std::size_t>(tag)] = bytes;
}

void MpiComm::on_received(std::function<void()> wake) {
  std::lock_guard lock(impl_->mutex);
  impl_->wake = std::move(wake);
}

std::vector<PeerTraffic> MpiComm::traffic() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->traffic;
}

void MpiComm::loop() {
  Impl& s = *impl_;
  int provided = 0;
  int initialised = 0;
  MPI_Initialized(&initialised);
  const int rc = initialised ? MPI_SUCCESS : MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  if (initialised) MPI_Query_thread(&provided);
  {
    std::lock_guard lock(s.mutex);
    if (rc != MPI_SUCCESS) {
      s.start_error = "MPI_Init_thread failed (code " + std::to_string(rc) +
                      "): start the servers with mpirun (shmps-launch --mpi does), and check the Open MPI installation";
    } else if (provided < MPI_THREAD_FUNNELED) {
      s.start_error = "this MPI library gives thread level " + std::to_string(provided) +
                      " where the server needs MPI_THREAD_FUNNELED (one thread makes every MPI call while others run): "
                      "use an MPI built with thread support (Debian's Open MPI is)";
    } else {
      MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
      MPI_Comm_size(MPI_COMM_WORLD, &size_);
      std::array<char, MPI_MAX_PROCESSOR_NAME> name{};
      int length = 0;
      MPI_Get_processor_name(name.data(), &length);
      host_.assign(name.data(), static_cast<std::size_t>(length));
      s.pending_bytes.assign(static_cast<std::size_t>(size_), {});
      s.inbox = decltype(s.inbox)(static_cast<std::size_t>(size_));  // (resize would need to copy deques)
      s.traffic.assign(static_cast<std::size_t>(size_), {});
    }
    s.started = true;
  }
  s.started_cv.notify_all();
  if (rc != MPI_SUCCESS || provided < MPI_THREAD_FUNNELED) {
    if (rc == MPI_SUCCESS) MPI_Finalize();
    return;
  }

  auto idle_since = std::chrono::steady_clock::now();
  bool stopping = false;
  std::chrono::steady_clock::time_point stop_deadline{};
  for (;;) {
    std::deque<std::function<void()>> tasks;
    std::deque<Impl::Out> outs;
    std::array<bool, kTags> may_receive{};
    {
      std::lock_guard lock(s.mutex);
      if (s.stop && !stopping) {
        stopping = true;
        stop_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
      }
      tasks.swap(s.tasks);
      outs.swap(s.to_send);
      for (int t = 0; t < kTags; ++t)
        may_receive[static_cast<std::size_t>(t)] =
            s.limit[static_cast<std::size_t>(t)] == 0 || s.inbox_bytes[static_cast<std::size_t>(t)] < s.limit[static_cast<std::size_t>(t)];
    }
    bool did = !tasks.empty() || !outs.empty();
    // Sends first: a task (a collective) may wait for a peer that waits for them.
    for (auto& out : outs) {
      s.in_flight.push_back({MPI_REQUEST_NULL, out.to, out.tag, std::move(out.batch)});
      Impl::InFlight& f = s.in_flight.back();
      SHMPS_MPI_READS(f.batch.data(), f.batch.size);
      MPI_Isend(f.batch.data(), static_cast<int>(f.batch.size), MPI_BYTE, f.to, f.tag, MPI_COMM_WORLD, &f.request);
    }
    // Stopping: what is queued is given up to a second to leave; what does not is sent again by
    // the next server (its segment says what is in flight).
    if (stopping && (s.in_flight.empty() || std::chrono::steady_clock::now() > stop_deadline)) break;
    for (auto& task : tasks) task();
    // Completed sends.
    for (std::size_t i = 0; i < s.in_flight.size();) {
      int flag = 0;
      MPI_Test(&s.in_flight[i].request, &flag, MPI_STATUS_IGNORE);
      if (!flag) {
        ++i;
        continue;
      }
      SHMPS_MPI_READS(s.in_flight[i].batch.data(), s.in_flight[i].batch.size);  // MPI read it until now
      {
        std::lock_guard lock(s.mutex);
        const auto to = static_cast<std::size_t>(s.in_flight[i].to);
        s.pending_bytes[to][static_cast<std::size_t>(s.in_flight[i].tag)] -= s.in_flight[i].batch.size;
        s.traffic[to].bytes_sent += s.in_flight[i].batch.size;
        ++s.traffic[to].batches_sent;
        s.keep(std::move(s.in_flight[i].batch));
      }
      s.in_flight[i] = std::move(s.in_flight.back());
      s.in_flight.pop_back();
      did = true;
    }
    // Arrived batches, as long as the receiver keeps up.
    bool received = false;
    for (int tag = 0; tag < kTags && !stopping; ++tag) {
      for (int n = 0; may_receive[static_cast<std::size_t>(tag)] && n < 64; ++n) {
        int flag = 0;
        MPI_Message message;
        MPI_Status status;
        MPI_Improbe(MPI_ANY_SOURCE, tag, MPI_COMM_WORLD, &flag, &message, &status);
        if (!flag) break;
        int bytes = 0;
        MPI_Get_count(&status, MPI_BYTE, &bytes);
        Batch batch;
        {
          std::lock_guard lock(s.mutex);
          batch = s.reuse(static_cast<std::size_t>(bytes));
        }
        MPI_Mrecv(batch.data(), bytes, MPI_BYTE, &message, MPI_STATUS_IGNORE);
        SHMPS_MPI_WRITES(batch.data(), static_cast<unsigned long>(bytes));
        batch.size = static_cast<std::size_t>(bytes);
        std::lock_guard lock(s.mutex);
        const auto from = static_cast<std::size_t>(status.MPI_SOURCE);
        auto& inbox_bytes = s.inbox_bytes[static_cast<std::size_t>(tag)];
        inbox_bytes += batch.capacity();  // what it holds, not what it carries
        s.traffic[from].bytes_received += batch.size;
        ++s.traffic[from].batches_received;
        s.traffic[from].last_received_unix_ns = shm::unix_ns();
        s.inbox[from][static_cast<std::size_t>(tag)].push_back(std::move(batch));
        received_waiting_.fetch_add(1, std::memory_order_acq_rel);
        received = true;
        const auto limit = s.limit[static_cast<std::size_t>(tag)];
        may_receive[static_cast<std::size_t>(tag)] = limit == 0 || inbox_bytes < limit;
      }
    }
    if (received) {
      // Under the mutex: the transport's destructor clears `wake` before its server's segment
      // goes, and must not race with a call under way.
      std::lock_guard lock(s.mutex);
      if (s.wake) s.wake();
    }
    did |= received;
    // Idle: poll often for a while (a sync round's records come in bursts), then back off to a
    // millisecond. Sends under way are polled more eagerly (a large message moves only while its
    // sender calls into MPI, rendezvous): yielding for 2 ms after the last progress, then every
    // 50 us (a receiver holding deltas back can keep them waiting for long).
    const auto now = std::chrono::steady_clock::now();
    if (did) {
      idle_since = now;
    } else if (!s.in_flight.empty()) {
      if (now - idle_since < std::chrono::milliseconds(2))
        std::this_thread::yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(50));
    } else {
      std::this_thread::sleep_for(now - idle_since < std::chrono::milliseconds(20) ? std::chrono::microseconds(20)
                                                                                   : std::chrono::microseconds(1000));
    }
  }
  MPI_Finalize();
  {
    std::lock_guard lock(s.mutex);
    s.finalized = true;
  }
  s.finalized_cv.notify_all();
}

}  // namespace shmps::server
