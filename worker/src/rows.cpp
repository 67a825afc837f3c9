// Tables (ARCHITECTURE.md "Tables"): rows pulled and pushed by id. A pull copies each row under
// its slice's seqlock, as pull() copies a slice; a push is one rows record in the worker's ring
// (the rows, then their ids), committed like any push, so exactly-once, back-pressure and the
// BSP step rules are push()'s.
#include "shmps/worker.hpp"

#include <algorithm>
#include <string>
#include <type_traits>

#include <shmps/shm/reader.hpp>

#include "gradient_copy.hpp"
#include "worker_impl.hpp"

namespace shmps {

using namespace shmps::shm;
using worker_detail::copy_gradient;

void Worker::Impl::refuse_kind(const char* what, std::uint32_t i, bool for_rows) const {
  const bool table = segment.param(i).table_dim != 0;
  if (table == for_rows) return;
  if (table)
    throw Error(std::string(what) + " '" + params[i].name + "': it is a table (" + std::to_string(params[i].rows) +
                " rows of " + std::to_string(params[i].dim) +
                "), reached by row: use pull_rows() and push_rows(); nothing was done");
  throw Error(std::string(what) + " '" + params[i].name + "': it is a dense parameter " + shape_string(segment.param(i)) +
              ", not a table: use pull() and push(); nothing was done");
}

void Worker::Impl::check_ids(const char* what, std::uint32_t i, std::span<const std::uint64_t> ids) const {
  if (params[i].keyed) return;  // any 64-bit key (keys = "u64")
  const std::uint64_t rows = params[i].rows;
  for (std::size_t k = 0; k < ids.size(); ++k)
    if (ids[k] >= rows)
      throw Error(std::string(what) + " '" + params[i].name + "': id " + std::to_string(ids[k]) + " (the " +
                  std::to_string(k) + "th given) is outside the table, whose ids are 0 to " + std::to_string(rows - 1) +
                  "; nothing was done");
}

std::uint64_t Worker::pull_rows(std::string_view name, std::span<const std::uint64_t> ids, std::span<float> out) {
  return impl_->pull_rows(name, ids, out);
}

std::uint64_t Worker::pull_rows(std::string_view name, std::span<const std::uint64_t> ids,
                                std::span<std::uint16_t> out) {
  return impl_->pull_rows(name, ids, out);
}

// Both forms: float32 rows (a 2-byte table's widened) or a 2-byte table's stored values.
template <class T>
std::uint64_t Worker::Impl::pull_rows(std::string_view name, std::span<const std::uint64_t> ids, std::span<T> out) {
  Impl& s = *this;
  constexpr bool raw = std::is_same_v<T, std::uint16_t>;
  s.refuse_if_detached("pull");
  const std::uint32_t i = s.find(name);
  s.refuse_kind("pull_rows of", i, true);
  if (raw && s.params[i].dtype == ValueDType::f32)
    throw Error("pull_rows of '" + std::string(name) +
                "' into 2-byte values: the table stores float32 values (dtype f32); pull its rows into floats");
  const std::size_t dim = s.params[i].dim;
  if (out.size() != ids.size() * dim)
    throw Error("pull_rows of '" + std::string(name) + "': the output has " + std::to_string(out.size()) +
                (raw ? " elements" : " floats") + ", but " + std::to_string(ids.size()) + " rows of " +
                std::to_string(dim) + " need " + std::to_string(ids.size() * dim) + "; pass ids.size() x dim " +
                (raw ? "elements" : "floats") + "; nothing was done");
  s.check_ids("pull_rows of", i, ids);
  if (ids.empty()) return 0;
  s.wait_for_consistency("pull_rows of", name);
  s.wait_for_put("pull_rows of", i, 0, s.params[i].size);  // an init = "put" table: once, all of it
  SliceReadResult read;
  if constexpr (raw) {
    read = read_rows_raw(s.segment, s.segment.param(i), ids, out, s.options.timeout);
  } else if (s.params[i].keyed) {
    bool index_stuck = false;
    read = read_keyed_rows(s.segment, s.segment.param(i), ids, out, s.options.timeout, index_stuck);
    if (index_stuck)
      throw Error("pull_rows of '" + std::string(name) + "': the table's key index has been mid-change for " +
                  std::to_string(s.options.timeout.count()) + " ms; " + s.server_state() +
                  "; a restarted server rebuilds it");
  } else {
    read = read_rows(s.segment, s.segment.param(i), ids, out, s.options.timeout);
  }
  if (read.stuck_slice)
    throw Error("pull_rows of '" + std::string(name) + "': slice " + std::to_string(*read.stuck_slice) +
                " has been mid-update for " + std::to_string(s.options.timeout.count()) + " ms; " + s.server_state() +
                "; a restarted server repairs it");
  s.slot.count_pull(static_cast<std::uint64_t>(out.size_bytes()));
  s.heartbeat();
  return read.min_version;
}

std::uint64_t Worker::push_rows(std::string_view name, std::span<const std::uint64_t> ids,
                                std::span<const float> grads) {
  Impl& s = *impl_;
  s.refuse_if_detached("push");
  const std::uint32_t i = s.find(name);
  s.refuse_kind("push_rows to", i, true);
  const std::size_t dim = s.params[i].dim;
  if (ids.empty())
    throw Error("push_rows to '" + std::string(name) + "': no ids given (0 rows); nothing to do");
  if (grads.size() != ids.size() * dim)
    throw Error("push_rows to '" + std::string(name) + "': the gradient has " + std::to_string(grads.size()) +
                " values, but " + std::to_string(ids.size()) + " rows of " + std::to_string(dim) + " need " +
                std::to_string(ids.size() * dim) + " (row width " + std::to_string(dim) + "); nothing was pushed");
  s.check_ids("push_rows to", i, ids);
  float* dst = s.claim_push("push_rows to", name, 0, grads.size(), false, ids.size());
  double sum_sq = 0.0;
  const std::size_t bad = copy_gradient(dst, grads.data(), grads.size(), sum_sq);
  if (bad != grads.size()) s.reject_push("push_rows to", bad, grads[bad]);
  s.claim.record->count = grads.size();  // where the ids go (record_ids); the rest of the header at commit
  std::copy(ids.begin(), ids.end(), record_ids(s.claim.record));
  return s.commit_push(sum_sq, RecordKind::rows);
}

PushBuffer Worker::borrow_push_rows(std::string_view name, std::size_t rows) {
  Impl& s = *impl_;
  s.refuse_if_detached("push");
  const std::uint32_t i = s.find(name);
  s.refuse_kind("borrowed push_rows to", i, true);
  if (rows == 0) throw Error("borrow_push_rows to '" + std::string(name) + "': 0 rows asked for; nothing to lend");
  if (rows > s.ring.max_record_floats())  // before any multiplication: no row takes less than a float
    throw Error("borrow_push_rows to '" + std::string(name) + "': " + std::to_string(rows) +
                " rows do not fit one ring record (at most " + std::to_string(s.ring.max_record_floats()) +
                " floats with their ids, half of ring_bytes = " + std::to_string(s.ring.capacity()) +
                "); borrow fewer rows; nothing was lent");
  const std::size_t count = rows * s.params[i].dim;
  float* data = s.claim_push("borrowed push_rows to", name, 0, count, false, rows);
  // fill_claimed writes the header at commit; the record's size (its ids' place) is fixed now.
  s.claim.record->count = count;
  return PushBuffer(&s, data, count, 0, record_ids(s.claim.record), rows);
}

}  // namespace shmps
