// Pushes of 2-byte gradients (a bf16 / fp16 parameter's own type): widened exactly to float32
// (straight into the ring when the push is one record, else into a buffer of the thread that the
// float push then streams), so the ring, the server and every guarantee see float32 gradients as
// before.
#include "shmps/worker.hpp"

#include <string>
#include <vector>

#include <shmps/shm/dtype.hpp>

#include "gradient_copy.hpp"
#include "worker_impl.hpp"

namespace shmps {

using namespace shmps::shm;
using worker_detail::widen_gradient;

namespace {

// `grad` widened from parameter p's 2-byte dtype into a buffer of this thread (reused: no
// allocation per push once it has grown), or Error for a float32 parameter.
std::span<const float> widened(const ParamInfo& p, std::string_view what, std::string_view name,
                               std::span<const std::uint16_t> grad) {
  if (p.dtype == ValueDType::f32)
    throw Error(std::string(what) + " '" + std::string(name) +
                "': 2-byte gradients are for a bf16 or fp16 parameter, and this one stores float32 values "
                "(dtype f32): push float32 gradients; nothing was pushed");
  thread_local std::vector<float> floats;
  floats.resize(grad.size());
  widen(static_cast<DType>(p.dtype), grad.data(), floats.data(), grad.size());  // the same numbering
  return floats;
}

}  // namespace

std::uint64_t Worker::push(std::string_view name, std::span<const std::uint16_t> grad) {
  impl_->check_whole_push(name, grad.size());
  return push(name, 0, grad);
}

std::uint64_t Worker::push(std::string_view name, std::size_t offset, std::span<const std::uint16_t> grad) {
  Impl& s = *impl_;
  s.refuse_if_detached("push");
  const std::uint32_t i = s.find(name);
  s.refuse_kind("push to", i, false);  // a table's name: push_rows (before any word on its dtype)
  const ParamInfo& p = s.params[i];
  if (p.dtype == ValueDType::f32 || grad.size() > s.ring.max_record_floats())  // refused, or streamed
    return push(name, offset, widened(p, "push to", name, grad));
  // One record: widened straight into the ring, checked as push() checks.
  float* dst = s.claim_push("push to", name, offset, grad.size());
  double sum_sq = 0.0;
  const std::size_t bad = widen_gradient(static_cast<DType>(p.dtype), dst, grad.data(), grad.size(), sum_sq);
  if (bad != grad.size()) {
    float value = 0.0f;  // from the caller's gradient (the ring's copy may still be in flight)
    widen(static_cast<DType>(p.dtype), grad.data() + bad, &value, 1);
    s.reject_push("push to", bad, value);
  }
  return s.commit_push(sum_sq);
}

std::uint64_t Worker::push_rows(std::string_view table, std::span<const std::uint64_t> ids,
                                std::span<const std::uint16_t> grads) {
  return push_rows(table, ids, widened(impl_->params[impl_->find(table)], "push_rows to", table, grads));
}

}  // namespace shmps
