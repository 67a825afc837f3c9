// The shmps worker API: what a training process uses to join a job.
//
//   #include <shmps/worker.hpp>
//   shmps::Worker w(shmps::WorkerOptions{.segment = "mlp", .rank = 0});  // rank -1: any free slot
//   for (const auto& p : w.params()) { ... p.name, p.shape, p.size ... }
//   std::uint64_t v = w.pull("fc1.weight", values);  // consistent per slice; returns the version
//   std::span<const float> p = w.view("fc1.weight");  // zero-copy: the values in the segment itself
//   std::uint64_t s = w.push("fc1.weight", grad);    // all-or-nothing; returns the sequence number
//   w.wait_applied(s);                               // blocks until the server applied it
//
//   shmps::PushBuffer b = w.borrow_push("fc1.weight");  // zero-copy: room in the ring, invisible
//   compute_gradient_into(b.span());                  // write every element, in place
//   std::uint64_t s2 = b.commit();                    // checked, then published like push
//
// A worker maps the job's shared-memory segment and talks to the server only through it: a pull
// is a memory copy checked by per-slice version words, a push is a write into the worker's own
// ring. A worker takes no lock that anyone else waits on, so killing it at any instruction
// blocks nobody (see ARCHITECTURE.md). Every error is a shmps::Error whose message says what was wrong
// and what to do; a failed call changes nothing in the segment.
//
// Thread safety: one Worker is used by one thread at a time.
// fork(): a Worker's slot belongs to the process that attached it. In a child forked after that
// (data-loader processes, multiprocessing), the inherited Worker throws Error from every call
// and its destructor changes nothing, and the child does not keep the slot alive once the
// parent dies. A child that must push creates its own Worker.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <shmps/error.hpp>  // shmps::Error, the one exception type of the API

namespace shmps {

class PushBuffer;

struct WorkerOptions {
  // The job's segment name. Empty: taken from the environment variable SHMPS_SEGMENT (set by
  // shmps-launch).
  std::string segment;
  // The worker slot to take. -1: SHMPS_RANK from the environment if set, else the first free slot.
  int rank = -1;
  // How long a call may wait for the server (a full ring, wait_applied, a segment that is not
  // ready yet) before it fails with a clear error.
  std::chrono::milliseconds timeout{30000};
};

// A process-wide check that every wait of every Worker (a full ring, a BSP barrier, a pull that
// waits for a put or a version, wait_applied, wait_for_workers, attaching) calls about every
// 50 ms; when it returns true the waiting call throws shmps::Interrupted, having changed no more
// than a timeout would have. For interactive front ends: the Python module sets one that runs
// Python's signal handlers, so that Ctrl-C interrupts any wait. nullptr (the default): none.
// The check runs on the waiting thread, with whatever that thread holds; it must not call the
// Worker that waits.
void set_interrupt_check(bool (*check)()) noexcept;

// A push that streams through the ring (bigger than one ring record, see Worker::push) and was
// cut short: elements [offset, offset + committed) of the range [offset, offset + count) of
// parameter `name` were committed, the rest not.
struct UnfinishedPush {
  std::string name;
  std::size_t offset = 0;
  std::size_t count = 0;
  std::size_t committed = 0;
};

// How a parameter's values are stored in the segment (the model spec's `dtype`): float32, or
// 2-byte bfloat16 / IEEE half. Gradients are pushed as float32 for every dtype, or as the
// parameter's own 2-byte type (the push overloads taking std::uint16_t), which the worker widens
// exactly to float32 on its way into the ring; put() takes float32. pull() into floats works for
// every dtype (a 2-byte value widens exactly); the 2-byte forms of pull() and view_raw() hand out
// the stored bits of a bf16 / fp16 parameter as they are.
enum class ValueDType { f32 = 0, bf16 = 1, fp16 = 2 };
// "f32", "bf16", "fp16" (the spec's spelling).
std::string_view to_string(ValueDType dtype) noexcept;

struct ParamInfo {
  std::string name;
  std::vector<std::size_t> shape;
  std::size_t size = 0;  // number of elements
  ValueDType dtype = ValueDType::f32;  // how the segment stores them
  std::size_t element_bytes() const noexcept { return dtype == ValueDType::f32 ? 4 : 2; }
  // A table ([[table]] in the model spec): shape {rows, dim}, read and written by row with
  // pull_rows() / push_rows() only. 0 and 0 for a dense parameter.
  std::size_t rows = 0;
  std::size_t dim = 0;
  bool is_table() const noexcept { return dim != 0; }
  // keys = "u64" in the spec: the table's ids are any 64-bit keys, not row numbers, and `rows`
  // is how many keys it holds at once (pull_rows of a key it does not hold reads the key's init).
  bool keyed = false;
  // init = "put" in the spec: a worker puts its first values (Worker::put), and pulls wait for it.
  bool init_put = false;
};

class Worker {
 public:
  // Attaches to the segment and takes a worker slot. Throws Error if the segment does not exist,
  // is of another layout, or the slot is held by a live process.
  explicit Worker(WorkerOptions options = {});
  ~Worker();  // leaves the slot (see leave())
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  Worker(Worker&&) noexcept;
  Worker& operator=(Worker&&) noexcept;

  int rank() const;
  const std::string& segment() const;
  const std::vector<ParamInfo>& params() const;
  const ParamInfo& param(std::string_view name) const;  // throws Error for an unknown name
  // The job's consistency model now: "asp", "bsp" or "ssp:N" (it may change on a live job).
  std::string consistency() const;

  // Copies the parameter (or the range [offset, offset + out.size())) into `out`. Each slice is
  // copied whole from one version (a seqlock read). Returns the smallest slice version seen:
  // the number of updates applied to the least-updated slice of the range.
  //
  // First it waits as the job's consistency model requires (bounded by the timeout):
  //   BSP    until the server has applied step clock()-1 of every worker: the values are exactly
  //          those after that step, and stay so until this worker finishes its current step;
  //   SSP s  until every live worker's clock is at least this worker's clock minus s;
  //   ASP    not at all.
  // The staleness it saw (this worker's clock minus the slowest live worker's) is recorded in
  // its slot (shmps-ctl inspect shows it).
  //
  // A bf16 or fp16 parameter (ParamInfo::dtype) is widened into the floats exactly.
  std::uint64_t pull(std::string_view name, std::span<float> out);
  std::uint64_t pull(std::string_view name, std::size_t offset, std::span<float> out);
  // The raw form, for a bf16 or fp16 parameter only: copies its stored 2-byte values as they are
  // (bfloat16 or IEEE half bits, as ParamInfo::dtype says: torch.bfloat16 / numpy.float16
  // memory), half the bytes of a float pull; otherwise as pull() above (min_version: as the get
  // by version below). Throws Error for a float32 parameter (pull it into floats).
  std::uint64_t pull(std::string_view name, std::span<std::uint16_t> out);
  std::uint64_t pull(std::string_view name, std::size_t offset, std::span<std::uint16_t> out,
                     std::uint64_t min_version = 0);

  // Put (SINGA's Put): sets the parameter's values (or those of [offset, offset + values.size()))
  // to `values`, as a job's rank 0 sets its freshly initialised model. Allowed while the
  // parameter has had no optimizer update, for the first worker whose put the server applies:
  // that worker (its rank, also after a restart) may put it again before the first update, any
  // other worker's put is refused. Returns once the server has applied it; throws Error, saying
  // why, if it refused it (another rank put it first; an update came first). Travels through
  // the ring as records, each all-or-nothing and applied exactly once like a push; a put bigger
  // than one record goes in record-sized pieces (a worker killed between them leaves the pieces
  // it committed: put again). NaN or Inf is refused and puts nothing. In BSP, put before the
  // step's first push (after one, put() throws: the server would take the put only once the
  // step ends). A spec's init = "put" makes pulls and views of the parameter wait until it has
  // been put.
  void put(std::string_view name, std::span<const float> values);
  void put(std::string_view name, std::size_t offset, std::span<const float> values);
  // Whether every slice of the parameter has been put (or, for a parameter that is not
  // init = "put", always true): what a restarted rank 0 asks before it puts its fresh module
  // again, which would be refused once training has updated it. Does not wait.
  bool is_put(std::string_view name) const;
  // The rank whose put of the parameter the server applied first, or -1 if none yet.
  int put_rank(std::string_view name) const;

  // Get by version (SINGA's Get): as pull(), but first waits, bounded by the timeout, until every
  // slice of the range has had at least `min_version` updates (the version pull() returns), then
  // copies. Returns the smallest version it copied, which may be higher. Throws Error after the
  // timeout, naming the slice that is behind and its version; 0 waits for nothing.
  std::uint64_t pull(std::string_view name, std::span<float> out, std::uint64_t min_version);
  std::uint64_t pull(std::string_view name, std::size_t offset, std::span<float> out, std::uint64_t min_version);

  // Zero-copy read: the parameter's values (or `count` elements from `offset`) in the segment
  // itself, no copy. Waits exactly as pull() does for the job's consistency model (BSP: until
  // step clock()-1 is applied, after this worker's admission; SSP s: the bound; ASP: not at all),
  // records the same statistics (one pull and the staleness seen; no pull bytes), and checks the
  // name and range with pull()'s errors. Call it again whenever a pull would be due (every step):
  // that call is the wait, and it returns the same addresses.
  //
  // What the values are while the caller reads them:
  //   BSP    a consistent snapshot: exactly the values after step clock()-1, unchanged until this
  //          worker's next clock() (or leave()). The server never writes a step's values while
  //          a live, admitted worker is still in that step, and recovery replays only slices of
  //          a step every such worker has ended, so a server restart does not touch them either.
  //   ASP, SSP  Hogwild-style: the server keeps applying updates underneath. Each float is read
  //          whole (aligned 4-byte loads), but a range may mix updates, even within one slice
  //          (a slice may be mid-update); there is no version check. pull() when a consistent copy
  //          is needed.
  // The guarantee belongs to the mode the job is in at the time of the call, and ends with it: a
  // view taken in ASP or SSP stays Hogwild after a live switch to BSP (take it again; that call
  // waits for admission and the step), and a live switch away from BSP lets updates through at
  // once. Checkpoint restores and pretrained weights only fill a segment being created, never
  // one a worker has mapped.
  //
  // The span stays valid (readable memory) until this Worker is destroyed, also after leave()
  // and across a move of the Worker; the values are those of the segment this Worker attached.
  // Never write through it (const_cast): the values belong to the server, and a worker maps them
  // read-only, so such a write is a SIGSEGV of this process (the job survives it like any death).
  //
  // A bf16 or fp16 parameter has no float32 values to point at: view() of one throws Error
  // (saying to use view_raw(), or pull() into floats). view_raw() is view() for those: the stored
  // 2-byte values (bfloat16 or IEEE half bits, ParamInfo::dtype) in the segment itself, with every
  // rule above; it throws Error for a float32 parameter.
  std::span<const float> view(std::string_view name);
  std::span<const float> view(std::string_view name, std::size_t offset, std::size_t count);
  std::span<const std::uint16_t> view_raw(std::string_view name);
  std::span<const std::uint16_t> view_raw(std::string_view name, std::size_t offset, std::size_t count);

  // Publishes a gradient for the parameter (or for a range of it). All-or-nothing: the record
  // becomes visible to the server with one release store, or not at all. Rejects (throws, pushes
  // nothing, counts it) a gradient holding NaN or Inf. Waits while the ring is full
  // (back-pressure, never drops). Returns the push's sequence number, counted over every
  // generation of this slot.
  //
  // A gradient bigger than one ring record (half the ring) streams through the ring as chunks of
  // whole slices, each a record committed on its own and applied as it comes, so a ring of a few
  // MiB carries a push of any size. The whole gradient is checked (and its norm summed, for
  // clipping) before the first chunk, so a rejected push still publishes nothing; each chunk has
  // its own sequence number, and the push returns the last one (wait_applied() on it waits for
  // all). All-or-nothing holds per chunk; for the whole push, the equivalent is: a push cut short
  // by the death of its process is finished by the slot's next process, whose push of the same
  // parameter and range sends only the chunks not yet committed (so a restarted worker that
  // repeats its step's pushes leaves every push applied exactly once). unfinished_push() says
  // what was left.
  std::uint64_t push(std::string_view name, std::span<const float> grad);
  std::uint64_t push(std::string_view name, std::size_t offset, std::span<const float> grad);
  // A bf16 / fp16 parameter's gradient in the parameter's own type (bit patterns, as pull() into
  // std::uint16_t hands out its values, e.g. a torch.bfloat16 tensor's): widened exactly to
  // float32 into the ring, then pushed as the float overloads push (the same checks: NaN and Inf
  // refused, nothing published; the same guarantees). A float32 parameter's name throws Error:
  // push floats. The rows form is for a bf16 / fp16 table, as push_rows.
  std::uint64_t push(std::string_view name, std::span<const std::uint16_t> grad);
  std::uint64_t push(std::string_view name, std::size_t offset, std::span<const std::uint16_t> grad);
  std::uint64_t push_rows(std::string_view table, std::span<const std::uint64_t> ids,
                          std::span<const std::uint16_t> grads);
  // The streamed push an earlier process of this slot (or a push of this one cut short by an
  // error) left unfinished, if any; cleared once a push of the same parameter and range finishes it.
  std::optional<UnfinishedPush> unfinished_push() const;

  // Zero-copy push: lends the caller room for a gradient of the whole parameter (or of `count`
  // elements from `offset`) directly in this worker's ring, to be filled in place and published
  // with PushBuffer::commit(). It claims the room exactly as push() does: same checks of the name
  // and range, same wait while the ring is full (back-pressure), same timeout, same errors
  // (a record larger than half the ring; a BSP step whose pushes fill the whole ring).
  //
  // Nothing is visible to the server until commit(): a process killed while it holds the buffer,
  // or a buffer dropped without commit(), publishes nothing, and the room is reused by the next
  // push. One buffer at a time per Worker: while one is outstanding, push(), clock(), leave() and
  // another borrow_push() throw Error and change nothing (pull(), wait_applied() and save_state()
  // are fine). See PushBuffer for the rest of the rules.
  PushBuffer borrow_push(std::string_view name);
  PushBuffer borrow_push(std::string_view name, std::size_t offset, std::size_t count);

  // Tables ([[table]] in the model spec: an embedding table of `rows` rows of `dim` floats, read
  // and written by row; ParamInfo::is_table()).
  //
  // pull_rows copies rows ids[k] into out[k * dim, (k + 1) * dim) (out: ids.size() x dim,
  // row-major). Each row is copied whole from one version of its slice (a seqlock read); it
  // waits first as pull() does for the job's consistency model. Returns the smallest slice
  // version seen. Into floats for every dtype (a bf16 / fp16 table's rows widened exactly), or
  // into std::uint16_t a bf16 / fp16 table's stored values as they are (a float32 table refuses).
  //
  // push_rows publishes the gradient rows grads[k * dim, (k + 1) * dim) for rows ids[k], as one
  // record: all-or-nothing, exactly once, NaN/Inf refused, back-pressure and errors as push().
  // An id may repeat: the server sums its rows (within a push in the order given, across workers
  // in rank order) and updates each row touched in a round once. The push must fit one ring
  // record (half the ring): split a bigger one. Returns the sequence number.
  //
  // Ids are in [0, rows). Every bad input (an id out of range, a wrong row width, a dense
  // parameter's name, NaN) throws Error and changes nothing; pull() and push() of a table's name
  // throw too.
  std::uint64_t pull_rows(std::string_view table, std::span<const std::uint64_t> ids, std::span<float> out);
  std::uint64_t pull_rows(std::string_view table, std::span<const std::uint64_t> ids, std::span<std::uint16_t> out);
  std::uint64_t push_rows(std::string_view table, std::span<const std::uint64_t> ids, std::span<const float> grads);
  // Zero-copy push_rows: room for `rows` ids and their gradient rows in the ring, to be filled in
  // place (PushBuffer::ids() and span(), rows x dim) and published with commit(), which checks
  // the ids and the values first. Rules as borrow_push().
  PushBuffer borrow_push_rows(std::string_view table, std::size_t rows);

  // Blocks until the server is done with every push up to sequence number `seq` (applied; or,
  // in BSP, discarded because this slot's previous process died before finishing their step).
  void wait_applied(std::uint64_t seq);

  // A start barrier, called by every worker before its first pull or push: blocks until worker
  // slots 0 .. count-1 are each held by a live process that the server has admitted (this one
  // included), or by one that has left after ending a step at or past the one this worker entered
  // at; else throws Error after `timeout`, naming the ranks still missing. Slots of an earlier run
  // (a restored checkpoint, a kept segment) do not count. In BSP it puts every worker in step 0,
  // however late a process starts; without it the first worker up can end step 0 alone, and the
  // run is not the same run to run. Returns at once when the slots are already held, so a
  // restarted worker can call it too.
  void wait_for_workers(std::size_t count, std::chrono::milliseconds timeout);
  void wait_for_workers(std::size_t count);  // with the worker's timeout

  // Ends this worker's current step and returns the new clock. In BSP the pushes of a step count
  // only once the step is ended, so a worker killed mid-step contributes none of it. A worker
  // enters at the job's current clock (or the clock its slot had, if later).
  std::uint64_t clock();
  // The current clock: the step this worker is in.
  std::uint64_t current_clock() const;

  // Resume state: a few bytes (at most 1024) a program needs to continue after a restart, such as
  // its data cursor. save_state() stages them; the next clock() commits them together with the
  // end of the step, in the same single store, so after a crash the state always describes
  // exactly the steps that counted. load_state() gives the state last committed by this slot, by
  // this process or by an earlier one (empty if none): a restarted worker continues from there.
  void save_state(std::span<const std::byte> state);
  std::vector<std::byte> load_state() const;
  // The slot's generation: 1 for the first process that took it, +1 for every restart.
  std::uint64_t generation() const;

  // Pushes this slot committed over all its generations, and how many the server has applied.
  std::uint64_t published() const;
  std::uint64_t applied() const;

  // Leaves the group: ends the current step if anything was pushed in it, marks the slot as left
  // (barriers and staleness bounds stop counting it) and releases it. Called by the destructor;
  // idempotent. A worker that runs out of data calls it so that the others do not wait for it.
  void leave();

 private:
  friend class PushBuffer;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A gradient record lent by Worker::borrow_push(): `size()` float32 values in the worker's own
// ring, 64-byte aligned, to be written in place and published with commit(). Move-only.
//
//   shmps::PushBuffer b = w.borrow_push("fc1.weight", 1024, 512);  // a range, as push() takes
//   std::span<float> g = b.span();                                 // g[0] is element 1024
//   for (std::size_t j = 0; j < g.size(); ++j) g[j] = ...;
//   std::uint64_t seq = b.commit();                                // b is empty afterwards
//
// - The contents start unspecified (earlier records' bytes): write every element.
// - commit() checks the values in place (all finite) and sums their squares, fills the record
//   header as push() does and publishes it with one release store. It returns the sequence
//   number, as push() does. A NaN or Inf makes it throw Error (the message names the element),
//   counts the rejection as push() does, and publishes nothing; the buffer is given back either
//   way, so after commit() it is empty whether it succeeded or threw.
// - Dropping the buffer (destructor, move-assignment over it, or drop()) abandons it: nothing is
//   published, and the next push or borrow reuses the room.
// - Use it from the thread that uses its Worker (a Worker is one thread's). Moving the Worker
//   keeps the buffer valid. If the Worker is destroyed first, the buffer becomes empty: data() is
//   null, size() 0, commit() throws Error, and pointers taken from it before must not be used
//   (the ring memory is unmapped).
class PushBuffer {
 public:
  PushBuffer() noexcept = default;  // holds nothing
  PushBuffer(PushBuffer&& other) noexcept;
  PushBuffer& operator=(PushBuffer&& other) noexcept;  // drops what this one held first
  PushBuffer(const PushBuffer&) = delete;
  PushBuffer& operator=(const PushBuffer&) = delete;
  ~PushBuffer();  // drops it if not committed

  float* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::span<float> span() const noexcept { return {data_, size_}; }
  // borrow_push_rows: the ids of the rows, to be written in place (span() holds their gradient
  // rows, ids().size() x dim); empty for a dense push.
  std::span<std::uint64_t> ids() const noexcept { return {ids_, rows_}; }
  // The parameter's element that data()[0] stands for.
  std::size_t offset() const noexcept { return offset_; }
  // True while it holds a borrowed record that is neither committed nor dropped.
  bool active() const noexcept { return owner_ != nullptr; }

  // Checks and publishes the values (see above). Throws Error if the buffer is not active.
  std::uint64_t commit();
  // Gives the room back unpublished. Does nothing if the buffer is not active.
  void drop() noexcept;

 private:
  friend class Worker;
  friend struct Worker::Impl;
  PushBuffer(Worker::Impl* owner, float* data, std::size_t size, std::size_t offset,
             std::uint64_t* ids = nullptr, std::size_t rows = 0) noexcept;
  void detach() noexcept;  // forgets the worker and the memory; does not touch the ring

  Worker::Impl* owner_ = nullptr;
  float* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t offset_ = 0;
  std::uint64_t* ids_ = nullptr;  // borrow_push_rows
  std::size_t rows_ = 0;
};

}  // namespace shmps
