// Internal to the worker library: how a push moves a gradient into ring memory. One pass reads
// the gradient, checks that every value is finite and sums the squares (the server clips by this
// norm); copy_gradient also writes it into the ring. Not installed.
#pragma once

#include <cstddef>
#include <cstdint>

#include <shmps/shm/layout.hpp>

namespace shmps::worker_detail {

// Checks `n` values without copying them (a borrowed push buffer is already in the ring): returns
// the index of the first value that is NaN or infinite, or n; sets sum_sq to the sum of squares.
std::size_t check_gradient(const float* src, std::size_t n, double& sum_sq);

// The same check while copying the values to `dst` (ring memory, 64-byte aligned).
std::size_t copy_gradient(float* dst, const float* src, std::size_t n, double& sum_sq);

// The same for a 2-byte gradient (bf16 / fp16 bits of `dtype`): widened exactly to float32 on
// the way into `dst`. Returns the index of the first value that is NaN or infinite, or n.
std::size_t widen_gradient(shm::DType dtype, float* dst, const std::uint16_t* src, std::size_t n, double& sum_sq);

}  // namespace shmps::worker_detail
