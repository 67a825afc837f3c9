// SyncTransport over MPI (sync_transport.hpp), for server groups on several hosts: group K is
// MPI rank K. Records keep the rings' framing (a 64-byte PushRecord header, the payload padded to
// 64 bytes) and are packed into batches of up to kBatchBytes per peer and channel, so that a
// round's many small slices travel as a few large messages. Deltas go with tag 0, answers with
// tag 1, as the shared-memory transport's two channels: a receiver always takes answers, and
// holds off deltas while it is behind, which pushes back on their senders.
//
// The engine's thread only packs and unpacks; the communication thread (mpi_comm.hpp) makes
// every MPI call.
#include <spdlog/spdlog.h>

#include <array>
#include <atomic>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/shm/futex.hpp>
#include <shmps/shm/layout.hpp>
#include <shmps/shm/ring.hpp>

#include "mpi_comm.hpp"
#include "sync_transport.hpp"

namespace shmps::server {

using namespace shmps::shm;

namespace {

constexpr int channel_of(RecordKind kind) { return kind == RecordKind::sync_fresh ? 1 : 0; }
constexpr RecordKind kind_of(int channel) { return channel == 1 ? RecordKind::sync_fresh : RecordKind::sync_delta; }

class MpiSyncTransport final : public SyncTransport {
 public:
  MpiSyncTransport(MpiComm& comm, std::string name, std::uint64_t spec_hash, std::atomic<std::uint32_t>& wake_word,
                   std::uint64_t budget_bytes)
      : comm_(comm), name_(std::move(name)), group_(static_cast<std::uint32_t>(comm.rank())),
        groups_(static_cast<std::uint32_t>(comm.size())), budget_(budget_bytes), out_(groups_), in_(groups_) {
    // Every rank must serve the same model: its slices are what the records name.
    const std::vector<std::uint64_t> hashes = comm_.allgather(spec_hash);
    for (std::uint32_t k = 0; k < groups_; ++k)
      if (hashes[k] != spec_hash)
        throw Error("MPI rank " + std::to_string(k) + " serves another model than rank " + std::to_string(group_) +
                    " (spec hash " + std::to_string(hashes[k]) + " against " + std::to_string(spec_hash) +
                    "): give every rank the same model spec (and remove a replica left by another job)");
    comm_.set_receive_limit(0, budget_bytes);
    comm_.on_received([&word = wake_word] {
      word.fetch_add(1, std::memory_order_acq_rel);
      futex_wake_all(word);
    });
  }
  ~MpiSyncTransport() override { comm_.on_received(nullptr); }

  float* try_claim(std::uint32_t to, RecordKind kind, std::uint64_t slice, std::uint64_t seq, std::uint64_t count,
                   std::uint64_t version) override {
    if (to >= groups_ || to == group_) return nullptr;
    const int c = channel_of(kind);
    Batch& open = out_[to][static_cast<std::size_t>(c)];
    const std::uint64_t need = record_bytes_for(count);
    if (open && open.size + need > open.capacity()) send(to, c);
    const std::uint64_t pending = comm_.bytes_pending(static_cast<int>(to), c) + (open ? open.size : 0);
    if (pending != 0 && pending + need > budget_) return nullptr;  // one record always goes, however large
    if (!open) open = comm_.batch(std::max<std::uint64_t>(kBatchBytes, need));
    auto* record = reinterpret_cast<PushRecord*>(open.data() + open.size);
    std::memset(static_cast<void*>(record), 0, sizeof(PushRecord));
    record->kind = kind;
    record->record_bytes = need;
    record->offset = slice;
    record->count = count;
    record->seq = seq;
    record->generation = group_;
    record->clock = version;
    claimed_ = need;
    return record_payload(record);
  }

  void commit(std::uint32_t to, RecordKind kind) override {
    const int c = channel_of(kind);
    Batch& open = out_[to][static_cast<std::size_t>(c)];
    open.size += claimed_;
    claimed_ = 0;
    if (open.size >= kBatchBytes) send(to, c);
  }

  void flush() override {
    for (std::uint32_t to = 0; to < groups_; ++to)
      for (int c = 0; c < MpiComm::kTags; ++c)
        if (out_[to][static_cast<std::size_t>(c)].size != 0) send(to, c);
  }

  std::uint64_t receive(const Handler& handler) override {
    std::uint64_t handled = 0;
    for (std::uint32_t from = 0; from < groups_; ++from) {
      if (from == group_) continue;
      for (int c : {1, 0}) {  // answers first: taking them frees room for the peer's answers to come
        Incoming& in = in_[from][static_cast<std::size_t>(c)];
        // Deltas held here count toward the receive limit: while as many wait as the budget, the
        // communication thread's inbox fills, it stops receiving, and the sender's budget fills.
        if (c == 1 || in.bytes < budget_) {
          const std::size_t had = in.batches.size();
          comm_.take(static_cast<int>(from), c, in.batches);
          for (std::size_t i = had; i < in.batches.size(); ++i) in.bytes += in.batches[i].capacity();
        }
        while (!in.batches.empty()) {
          Batch& b = in.batches.front();
          bool stopped = false;
          while (in.position < b.size) {
            const PushRecord* r = well_formed(b, in.position, c);
            if (r == nullptr) {
              spdlog::error("event=sync_record_malformed segment={} from_group={} channel={} position={} reason=\"a "
                            "batch from group {} holds a record that is not well formed; the rest of the batch is "
                            "skipped\"", name_, from, c, in.position, from);
              in.position = b.size;
              break;
            }
            if (!handler(from, *r)) {
              stopped = true;
              break;
            }
            ++handled;
            in.position += r->record_bytes;
          }
          if (stopped) break;
          in.bytes -= in.batches.front().capacity();
          comm_.recycle(std::move(in.batches.front()));
          in.batches.pop_front();
          in.position = 0;
        }
      }
    }
    return handled;
  }

  bool waiting() override {
    if (comm_.received_waiting()) return true;
    for (const auto& peer : in_)
      for (const Incoming& in : peer)
        if (!in.batches.empty()) return true;
    return false;
  }

 private:
  // Records of one batch are packed up to this size (a message of about a megabyte reaches MPI's
  // bandwidth; a slice bigger than that travels alone).
  static constexpr std::uint64_t kBatchBytes = 1ULL << 20;

  struct Incoming {
    std::deque<Batch> batches;
    std::size_t position = 0;  // in batches.front()
    std::uint64_t bytes = 0;   // the batches' capacities: the memory they hold
  };

  void send(std::uint32_t to, int c) {
    Batch& open = out_[to][static_cast<std::size_t>(c)];
    comm_.send(static_cast<int>(to), c, std::move(open));
    open = Batch{};
  }

  // The record at `position` of `b`, if its header and payload lie inside the batch and it is of
  // the channel's kind; nullptr otherwise (a peer's bug must not make this server read past it).
  static const PushRecord* well_formed(const Batch& b, std::size_t position, int channel) {
    if (position % alignof(PushRecord) != 0 || b.size - position < sizeof(PushRecord)) return nullptr;
    const auto* r = reinterpret_cast<const PushRecord*>(b.data() + position);
    if (r->kind != kind_of(channel) || r->count > (b.size - position) / sizeof(float) ||
        r->record_bytes != record_bytes_for(r->count) || r->record_bytes > b.size - position)
      return nullptr;
    return r;
  }

  MpiComm& comm_;
  std::string name_;
  std::uint32_t group_, groups_;
  std::uint64_t budget_;
  std::uint64_t claimed_ = 0;
  std::vector<std::array<Batch, MpiComm::kTags>> out_;
  std::vector<std::array<Incoming, MpiComm::kTags>> in_;
};

}  // namespace

std::unique_ptr<SyncTransport> make_mpi_sync_transport(MpiComm& comm, const std::string& name, std::uint64_t spec_hash,
                                                       std::atomic<std::uint32_t>& wake_word, std::uint64_t budget_bytes) {
  return std::make_unique<MpiSyncTransport>(comm, name, spec_hash, wake_word, budget_bytes);
}

}  // namespace shmps::server
