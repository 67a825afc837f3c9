// Put (SINGA's HandlePut): a worker sets a parameter's values, as a job's rank 0 sets its freshly
// initialised model, through its ring as records of kind put. The server applies a put record
// only while every slice it covers has had no optimizer update, and only for the first rank
// whose put it applied (ParamStats::put_rank); it notes a refused one in the slot
// (put_refused_seq). So put() publishes, waits until applied, and reads that to say what
// happened.
#include "shmps/worker.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include <shmps/shm/killpoint.hpp>

#include "worker_impl.hpp"

namespace shmps {

using namespace shmps::shm;

void Worker::put(std::string_view name, std::span<const float> values) {
  const std::uint32_t i = impl_->find(name);
  if (values.size() != impl_->params[i].size)
    throw Error("put of '" + std::string(name) + "': the values have " + std::to_string(values.size()) +
                " elements but the parameter has " + std::to_string(impl_->params[i].size) + " " +
                shape_string(impl_->segment.param(i)) + "; pass values of that size, or put a range with an offset");
  put(name, 0, values);
}

void Worker::put(std::string_view name, std::size_t offset, std::span<const float> values) {
  Impl& s = *impl_;
  s.refuse_if_detached("put");
  const std::uint32_t i = s.find(name);
  if (s.borrower != nullptr) s.refuse_if_borrowed("put of '" + std::string(name) + "'", "nothing was put");
  if (s.params[i].keyed)
    throw Error("put of '" + std::string(name) + "': it is a table with keys = \"u64\", whose rows are slots that "
                "keys come and go from; a key's row starts from the table's init and changes only by push_rows; "
                "nothing was put");
  s.check_range("put of", i, offset, values.size(), true);  // a table is put row-major, as a [rows, dim] tensor
  const std::string what = "put of '" + std::string(name) + "'";
  for (std::size_t k = 0; k < values.size(); ++k)
    if (!std::isfinite(values[k]))
      throw Error(what + " refused: element " + std::to_string(offset + k) + " is " +
                  (std::isnan(values[k]) ? "NaN" : "infinite") + "; nothing was put");
  const auto bsp = [&] {
    return load_acquire(s.segment.header().consistency) == static_cast<std::uint32_t>(Consistency::bsp);
  };
  if (bsp() && (s.pushed_in_step || s.step_skip != 0))
    throw Error(what + ": this worker (or its previous process) has pushed in its open BSP step " + std::to_string(s.clock) +
                ", and the server takes that step's records only once every worker has ended it; put before the "
                "step's first push (before any push, at the start); nothing was put");
  const auto owner = [&] { return load_acquire(s.segment.param_stats(i).put_rank); };
  const auto refuse_owner = [&](std::uint64_t rank_plus_one, const std::string& done) {
    throw Error(what + " refused: worker " + std::to_string(rank_plus_one - 1) +
                " put it first, and only the first worker to put a parameter may put it; pull it instead; " + done);
  };
  if (const std::uint64_t first = owner(); first != 0 && first != static_cast<std::uint64_t>(s.rank) + 1)
    refuse_owner(first, "nothing was put");

  std::uint64_t seq = 0, first_seq = 0, records = 0;
  for (std::size_t begin = 0; begin < values.size(); ++records) {
    const std::size_t n = std::min<std::size_t>(values.size() - begin, s.ring.max_record_floats());
    float* dst = s.claim_push("put of", name, offset + begin, n, true);
    std::copy_n(values.data() + begin, n, dst);
    seq = s.commit_put();
    if (first_seq == 0) first_seq = seq;
    // The open step begins after the put: the server takes the put at once (nothing of the step
    // comes before it), so the ring's head passing it does not mean the step fills the ring.
    s.step_start = s.ring.tail();
    begin += n;
    if (begin < values.size()) kill_point("put.between_records");
  }
  const bool applied = wait_for([&] { return s.slot.applied() >= seq; }, s.deadline(), &s.slot.progress_word(),
                                &s.slot.waiting_flag());
  if (!applied)
    throw Error(what + ": committed, but not applied after " + std::to_string(s.options.timeout.count()) + " ms; " +
                s.server_state() + "; it is applied once a server runs (put() again to learn the outcome)");
  if (s.slot.put_refused_seq() < first_seq) return;  // none of this put's records was refused
  const std::string done = records == 1 ? "nothing was put"
                                        : "of its " + std::to_string(records) +
                                              " records (a put bigger than one ring record goes in pieces) the "
                                              "ones from the first refused on were not applied";
  if (const std::uint64_t first = owner(); first != 0 && first != static_cast<std::uint64_t>(s.rank) + 1)
    refuse_owner(first, done);
  throw Error(what + " refused: the parameter had an optimizer update before the put reached the server, and a "
              "parameter can be put only before its first update; " + done);
}

bool Worker::is_put(std::string_view name) const {
  const Impl& s = *impl_;
  const std::uint32_t i = s.find(name);
  const ParamEntry& p = s.segment.param(i);
  if (p.init_put == 0) return true;
  const std::uint64_t slices = (p.size + s.segment.header().slice_floats - 1) / s.segment.header().slice_floats;
  for (std::uint64_t k = 0; k < slices; ++k)
    if (load_acquire(s.segment.slice(p.first_slice + k).version) < 2) return false;  // version counts 2 per update
  return true;
}

int Worker::put_rank(std::string_view name) const {
  const std::uint64_t rank_plus_one = load_acquire(impl_->segment.param_stats(impl_->find(name)).put_rank);
  return static_cast<int>(rank_plus_one) - 1;
}

std::uint64_t Worker::Impl::commit_put() {
  const std::uint64_t seq = fill_claimed(RecordKind::put, 0.0);
  publish_claimed(seq, "put.before_commit");
  return seq;
}

void Worker::Impl::wait_for_put(const char* what, std::uint32_t param, std::uint64_t offset, std::uint64_t count) {
  if (segment.param(param).init_put == 0) return;
  wait_for_version(what, param, offset, count, 1,
                   "its spec says init = \"put\": a worker must put it first (Worker::put), and none has");
}

void Worker::Impl::refuse_push_before_put(const char* what, std::uint32_t param, std::uint64_t offset,
                                          std::uint64_t count) const {
  const ParamEntry& p = segment.param(param);
  if (p.init_put == 0) return;
  const std::uint64_t slice_floats = segment.header().slice_floats;
  for (std::uint64_t k = offset / slice_floats; k <= (offset + count - 1) / slice_floats; ++k)
    if (load_acquire(segment.slice(p.first_slice + k).version) < 2)
      throw Error(std::string(what) + " '" + params[param].name + "': slice " + std::to_string(k) +
                  " has not been put yet (its spec says init = \"put\"); put it first (Worker::put), or pull it, "
                  "which waits for the put; nothing was pushed");
}

}  // namespace shmps
