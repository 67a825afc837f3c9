// Pushes of 2-byte gradients (a bf16 / fp16 parameter's own type): widened exactly to float32,
// then pushed as float gradients are, so the ring, the server and every guarantee see float32
// gradients as before.
#include "shmps/worker.hpp"

#include <string>
#include <vector>

#include <shmps/shm/dtype.hpp>

#include "worker_impl.hpp"

namespace shmps {

using namespace shmps::shm;

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
  return push(name, widened(impl_->params[impl_->find(name)], "push to", name, grad));
}

std::uint64_t Worker::push(std::string_view name, std::size_t offset, std::span<const std::uint16_t> grad) {
  return push(name, offset, widened(impl_->params[impl_->find(name)], "push to", name, grad));
}

std::uint64_t Worker::push_rows(std::string_view table, std::span<const std::uint64_t> ids,
                                std::span<const std::uint16_t> grads) {
  return push_rows(table, ids, widened(impl_->params[impl_->find(table)], "push_rows to", table, grads));
}

}  // namespace shmps
