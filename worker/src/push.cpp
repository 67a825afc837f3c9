// The push protocol (ARCHITECTURE.md "Push"): a gradient goes into the worker's own ring as one
// record, as a borrowed buffer committed in place, or, when bigger than a record, streamed in
// chunks that are each committed on their own.
#include "shmps/worker.hpp"

#include <cmath>
#include <optional>
#include <string>

#include <shmps/shm/killpoint.hpp>

#include "gradient_copy.hpp"
#include "worker_impl.hpp"

namespace shmps {

using namespace shmps::shm;
using worker_detail::check_gradient;
using worker_detail::copy_gradient;

std::uint64_t Worker::push(std::string_view name, std::span<const float> grad) {
  impl_->check_whole_push(name, grad.size());
  return push(name, 0, grad);
}

void Worker::Impl::check_whole_push(std::string_view name, std::size_t size) const {
  const std::uint32_t i = find(name);
  refuse_kind("push to", i, false);
  if (size != params[i].size)
    throw Error("push to '" + std::string(name) + "': the gradient has " + std::to_string(size) +
                " elements but the parameter has " + std::to_string(params[i].size) + " " +
                shape_string(segment.param(i)) + "; nothing was pushed");
}

std::uint64_t Worker::push(std::string_view name, std::size_t offset, std::span<const float> grad) {
  Impl& s = *impl_;
  if (grad.size() > s.ring.max_record_floats()) return s.push_streamed(s.find(name), offset, grad);
  float* dst = s.claim_push("push to", name, offset, grad.size());
  double sum_sq = 0.0;
  const std::size_t bad = copy_gradient(dst, grad.data(), grad.size(), sum_sq);
  if (bad != grad.size()) s.reject_push("push to", bad, grad[bad]);
  return s.commit_push(sum_sq);
}

// A push bigger than one record streams through the ring: consecutive records of whole chunks
// (chunk_end), each committed on its own as soon as it is written, so the ring never has to hold
// the whole push, and the server applies each chunk as it comes. What stays whole:
// - the checks: the whole gradient is checked (finite) and its norm summed before the first
//   chunk is written, so a rejected push publishes nothing, and every chunk carries the whole
//   push's squared norm (clipping by norm scales every chunk alike);
// - exactly once: each chunk has its own sequence number;
// - a push cut short by the death of its worker is finished by the slot's next process: the slot
//   keeps the push's parameter, range and first sequence number, so that process's push of the
//   same parameter and range sends only the chunks not yet committed (unfinished_push()).
std::uint64_t Worker::Impl::push_streamed(std::uint32_t i, std::size_t offset, std::span<const float> grad) {
  refuse_if_detached("push");
  if (borrower != nullptr) refuse_if_borrowed("push to '" + params[i].name + "'", "nothing was pushed");
  check_range("push to", i, offset, grad.size());
  refuse_push_before_put("push to", i, offset, grad.size());  // the whole range, before the first chunk
  double sum_sq = 0.0;
  const std::size_t bad = check_gradient(grad.data(), grad.size(), sum_sq);
  if (bad != grad.size()) refuse_non_finite("push to", i, offset + bad, grad[bad]);
  const std::uint64_t end = offset + grad.size();
  std::uint64_t begin = offset;
  const bool resumes = unfinished && unfinished->name == params[i].name && unfinished->offset == offset &&
                       unfinished->count == grad.size();
  std::uint64_t chunks_done = 0;
  if (resumes)
    for (; begin < offset + unfinished->committed; ++chunks_done) begin = chunk_end(begin, end);
  const std::optional<UnfinishedPush> resumed = resumes ? unfinished : std::nullopt;
  if (resumes) unfinished.reset();
  // The chunks' sequence numbers are consecutive from first_seq (a resumed push counts the
  // chunks its predecessor committed as if this process had sent them).
  slot.begin_stream({.first_seq = published + 1 - chunks_done, .param = i, .offset = offset, .count = grad.size()});
  stream_words_open = false;  // they describe this push now
  std::uint64_t seq = published;
  const std::uint64_t first = begin;
  try {
    while (begin < end) {
      const std::uint64_t stop = chunk_end(begin, end);
      float* dst = claim_push("push to", params[i].name, begin, stop - begin);
      double ignored = 0.0;
      copy_gradient(dst, grad.data() + (begin - offset), stop - begin, ignored);  // checked above
      seq = commit_push(sum_sq);
      begin = stop;
      if (begin < end) kill_point("push.mid_stream");
    }
  } catch (const Error& e) {
    stream_words_open = true;  // the next other push must clear them
    if (begin == offset) throw;  // nothing of it is committed
    if (begin == first) {  // a resumed push that got no further
      unfinished = resumed;
      throw;
    }
    // Cut short (the server gone for the whole timeout): what was committed stays committed.
    unfinished = UnfinishedPush{params[i].name, offset, grad.size(), begin - offset};
    const std::string message = std::string(e.what()) + " (this push streams through the ring in chunks: elements [" +
                                std::to_string(offset) + ", " + std::to_string(begin) +
                                ") were committed; push the same gradient again to send only the rest, see "
                                "unfinished_push())";
    // An interrupted wait stays an Interrupted (Python raises KeyboardInterrupt for it).
    if (dynamic_cast<const Interrupted*>(&e) != nullptr) throw Interrupted(message);
    throw Error(message);
  }
  return seq;
}

std::optional<UnfinishedPush> Worker::unfinished_push() const { return impl_->unfinished; }

PushBuffer Worker::borrow_push(std::string_view name) {
  return borrow_push(name, 0, impl_->params[impl_->find(name)].size);
}

PushBuffer Worker::borrow_push(std::string_view name, std::size_t offset, std::size_t count) {
  Impl& s = *impl_;
  float* data = s.claim_push("borrowed push to", name, offset, count);
  return PushBuffer(&s, data, count, offset);
}

// Checks the range, waits for room as the consistency model allows, and claims a record (for a
// push, or with `put` for Worker::put).
float* Worker::Impl::claim_push(const char* what, std::string_view name, std::size_t offset, std::size_t count,
                                bool put, std::size_t rows) {
  refuse_if_detached("push");
  const std::uint32_t i = find(name);
  if (borrower != nullptr) refuse_if_borrowed(std::string(what) + " '" + std::string(name) + "'", "nothing was pushed");
  if (rows == 0) {
    check_range(what, i, offset, count, put);  // a put may cover a table's rows, a push may not
    if (!put) refuse_push_before_put(what, i, offset, count);
  }
  await_admission();
  // A rows record holds its ids after the rows: its bytes, in floats, for the size checks.
  const std::uint64_t need = rows != 0 ? rows_record_bytes(rows, count) : record_bytes_for(count);
  if (rows != 0 && need > record_bytes_for(ring.max_record_floats()))
    throw Error(std::string(what) + " '" + std::string(name) + "': " + std::to_string(rows) + " rows (" +
                std::to_string(need) + " bytes with their ids) do not fit one ring record (at most " +
                std::to_string(record_bytes_for(ring.max_record_floats())) + " bytes, half of ring_bytes = " +
                std::to_string(ring.capacity()) +
                "): push the rows in several smaller push_rows calls, or raise ring_bytes in the model spec; nothing "
                "was pushed");
  if (count > ring.max_record_floats())
    throw Error(std::string(what) + " '" + std::string(name) + "': " + std::to_string(count) +
                " elements do not fit one ring record (at most " + std::to_string(ring.max_record_floats()) +
                " with ring_bytes = " + std::to_string(ring.capacity()) +
                "); a borrowed buffer is one record: borrow ranges (offset, count), or use push(), which streams a "
                "gradient of any size through the ring; nothing was pushed");

  // Claim room (back-pressure: wait for the server, never drop). In BSP the server takes a
  // step's pushes only once the step has ended: if the ring holds nothing but this worker's open
  // step and is still full, waiting would never end.
  const auto step_overflows = [&] {
    return !segment.streams_bsp_steps() &&
           load_acquire(segment.header().consistency) == static_cast<std::uint32_t>(Consistency::bsp) &&
           ring.head() >= ring.past_start_over(step_start);
  };
  PushRecord* record = ring.try_claim_bytes(need);
  if (record == nullptr) {
    const std::uint64_t waited_from = monotonic_ns();
    bool overflow = false;
    const bool ok = wait_for(
        [&] {
          if ((record = ring.try_claim_bytes(need)) != nullptr) return true;
          if (!step_overflows()) return false;
          // The server may have freed the room between the claim and that look: claim once more
          // before calling it an overflow (once the ring holds only this step, nothing frees it).
          if ((record = ring.try_claim_bytes(need)) != nullptr) return true;
          return overflow = true;
        },
        deadline(), &slot.progress_word(), &slot.waiting_flag());
    slot.add_backpressure_ns(monotonic_ns() - waited_from);
    if (overflow)
      throw Error(std::string(what) + " '" + std::string(name) + "': the pushes of this BSP step (" +
                  std::to_string(ring.tail() - ring.past_start_over(step_start)) + " bytes so far) fill the whole ring of " +
                  std::to_string(ring.capacity()) +
                  " bytes, and the server takes them only once the step ends: end steps sooner (clock()), push less "
                  "per step, or raise ring_bytes in the model spec; nothing was pushed");
    if (!ok)
      throw Error(std::string(what) + " '" + std::string(name) + "': the ring of worker " + std::to_string(rank) +
                  " has been full for " + std::to_string(options.timeout.count()) + " ms; " + server_state() +
                  "; nothing was pushed");
  }
  claim = Claim{record, i, rows != 0 ? rows : offset, count, rows};
  return record_payload(record);
}

// Fills the claimed record's header (a push, or a put: put.cpp); returns its sequence number.
std::uint64_t Worker::Impl::fill_claimed(RecordKind kind, double sum_sq) {
  PushRecord* record = claim.record;
  const std::uint64_t seq = published + 1;
  record->kind = kind;
  record->param = claim.param;
  record->offset = claim.offset;
  record->count = claim.count;
  record->seq = seq;
  record->generation = generation;
  record->clock = clock;
  record->grad_sq_norm = sum_sq;
  return seq;
}

// Publishes the filled record `seq` with one release store, after letting go of the claim (and
// of an unfinished streamed push's words, which another record in between no longer adds up to).
void Worker::Impl::publish_claimed(std::uint64_t seq, const char* point) {
  const std::uint64_t bytes = claim.count * sizeof(float);
  claim = {};
  if (stream_words_open) {
    slot.end_stream();
    stream_words_open = false;
  }
  kill_point(point);
  ring.commit();  // one release store: the record now exists, whole
  published = seq;
  slot.publish(seq, monotonic_ns());
  slot.count_push_bytes(bytes);
  heartbeat();
  wake_server();
}

std::uint64_t Worker::Impl::commit_push(double sum_sq, RecordKind kind) {
  const std::uint64_t seq = fill_claimed(kind, sum_sq);
  if (step_skip != 0) {  // committed by this slot's previous process, and in the step sums already
    --step_skip;
    give_back();
    pushed_in_step = true;
    return skipped_seq++;
  }
  if (!pushed_in_step && !step_first_written) {
    slot.set_step_first_seq(seq);  // before the commit: a successor must find it with the push
    step_first_written = true;
  }
  publish_claimed(seq, "push.before_commit");
  pushed_in_step = true;
  return seq;
}

// Refuses the claimed record because of the non-finite `value` at index `bad` of its payload:
// counts it, gives the room back (the record was never committed: it does not exist), throws.
void Worker::Impl::reject_push(const char* what, std::size_t bad, float value) {
  const Claim refused = claim;
  give_back();
  if (refused.rows != 0) {  // a rows record: say which of the given rows
    const std::uint64_t dim = refused.count / refused.rows;
    slot.count_rejected_push();
    bump_counter(segment.rejected(static_cast<unsigned>(rank), refused.param));
    throw Error(std::string(what) + " '" + params[refused.param].name + "' rejected: element " +
                std::to_string(bad % dim) + " of row " + std::to_string(bad / dim) + " (the " +
                std::to_string(bad / dim) + "th id given) is " + (std::isnan(value) ? "NaN" : "infinite") +
                "; nothing was pushed (check the loss and learning rate, or clip gradients before pushing)");
  }
  refuse_non_finite(what, refused.param, refused.offset + bad, value);
}

void Worker::Impl::refuse_non_finite(const char* what, std::uint32_t param, std::uint64_t element, float value) {
  slot.count_rejected_push();
  bump_counter(segment.rejected(static_cast<unsigned>(rank), param));
  throw Error(std::string(what) + " '" + params[param].name + "' rejected: element " + std::to_string(element) +
              " is " + (std::isnan(value) ? "NaN" : "infinite") +
              "; nothing was pushed (check the loss and learning rate, or clip gradients before pushing)");
}

PushBuffer::PushBuffer(Worker::Impl* owner, float* data, std::size_t size, std::size_t offset, std::uint64_t* ids,
                       std::size_t rows) noexcept
    : owner_(owner), data_(data), size_(size), offset_(offset), ids_(ids), rows_(rows) {
  owner_->borrower = this;
}

PushBuffer::PushBuffer(PushBuffer&& other) noexcept
    : owner_(other.owner_), data_(other.data_), size_(other.size_), offset_(other.offset_), ids_(other.ids_),
      rows_(other.rows_) {
  if (owner_ != nullptr) owner_->borrower = this;
  other.detach();
}

PushBuffer& PushBuffer::operator=(PushBuffer&& other) noexcept {
  if (this == &other) return *this;
  drop();
  owner_ = other.owner_;
  data_ = other.data_;
  size_ = other.size_;
  offset_ = other.offset_;
  ids_ = other.ids_;
  rows_ = other.rows_;
  if (owner_ != nullptr) owner_->borrower = this;
  other.detach();
  return *this;
}

PushBuffer::~PushBuffer() { drop(); }

void PushBuffer::detach() noexcept {
  owner_ = nullptr;
  data_ = nullptr;
  size_ = 0;
  offset_ = 0;
  ids_ = nullptr;
  rows_ = 0;
}

void PushBuffer::drop() noexcept {
  if (owner_ == nullptr) return;
  owner_->give_back();
  detach();
}

std::uint64_t PushBuffer::commit() {
  if (owner_ == nullptr)
    throw Error("commit() of a push buffer that holds nothing (committed or dropped already, moved from, or its "
                "Worker is gone); borrow another with Worker::borrow_push; nothing was pushed");
  Worker::Impl& s = *owner_;
  if (s.forked_away) {  // a buffer borrowed before fork(): the room is the parent's
    drop();
    s.refuse_if_detached("push");
  }
  const std::size_t n = size_;
  const bool rows = ids_ != nullptr;
  if (rows) {
    try {
      s.check_ids("borrowed push_rows to", s.claim.param, {ids_, rows_});
    } catch (const Error&) {
      s.borrower = nullptr;
      detach();
      s.give_back();
      throw;
    }
  }
  double sum_sq = 0.0;
  const std::size_t bad = check_gradient(data_, n, sum_sq);
  const float value = bad != n ? data_[bad] : 0.0f;
  s.borrower = nullptr;  // this buffer is done with, whatever happens next
  detach();
  if (bad != n) s.reject_push(rows ? "borrowed push_rows to" : "borrowed push to", bad, value);
  return s.commit_push(sum_sq, rows ? RecordKind::rows : RecordKind::push);
}

}  // namespace shmps
