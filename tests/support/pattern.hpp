// The gradients of the exact-sum tests: small integers in [-4, 4], so that SGD with learning
// rate 1 keeps every float sum exact and the final values must equal the initial values minus
// the sum of every committed push, element by element.
#pragma once

#include <cstdint>

namespace shmps::test {

inline float pattern(std::uint64_t rank, std::uint64_t push, std::uint64_t element) {
  return static_cast<float>(static_cast<int>((rank * 31 + push * 17 + element * 7) % 9) - 4);
}

// Which part of the parameters push k of a pusher covers: the whole of "w", a range of "w"
// crossing slice boundaries, or the whole of "b".
struct PushPlan {
  const char* param;
  std::uint64_t offset;
  std::uint64_t count;
};
inline PushPlan plan_push(std::uint64_t rank, std::uint64_t k, std::uint64_t w_size, std::uint64_t b_size) {
  switch (k % 3) {
    case 0: return {"w", 0, w_size};
    case 1: return {"w", (k * 977 + rank * 131) % (w_size / 2), w_size / 3};
    default: return {"b", 0, b_size};
  }
}

// How many records a push of `count` elements from `offset` takes when it streams through a ring
// in chunks of `chunk` elements that end on multiples of `chunk` (Worker::push); 1 if chunk is 0.
inline std::uint64_t stream_chunks(std::uint64_t offset, std::uint64_t count, std::uint64_t chunk) {
  if (chunk == 0) return 1;
  std::uint64_t n = 0;
  for (std::uint64_t b = offset, end = offset + count; b < end; ++n) b = b / chunk * chunk + chunk < end ? b / chunk * chunk + chunk : end;
  return n;
}

// Tables: push k of a rows pusher (shmps-test-pusher rows) sends kRowsPerPush rows of table "t".
// Id j of it: every fourth the hot row 0, then a row anywhere in the table, the same row again
// (an id repeated within a push), and one of the warm rows 0 to 7; row j's element d is
// pattern(rank, k, j * dim + d).
inline constexpr std::uint64_t kRowsPerPush = 64;
inline std::uint64_t rows_push_id(std::uint64_t rank, std::uint64_t k, std::uint64_t j, std::uint64_t rows) {
  switch (j % 4) {
    case 0: return 0;
    case 1:
    case 2: return 1 + (k * 131 + rank * 977 + (j / 4) * 37) % (rows - 1);
    default: return (k * 7 + j) % 8;
  }
}

// Tables with keys = "u64": the key that stands for row id `id` of the rows pattern (rows
// --keys). Odd multiplier and an offset: a bijection of 64-bit values, so distinct ids stay
// distinct keys, spread over the whole range (the top bit too).
inline std::uint64_t key_of_id(std::uint64_t id) { return id * 0x9E3779B97F4A7C15ULL + 0xD1B54A32D192ED03ULL; }

// The keyed churn (shmps-test-pusher keyed-churn): every push of key K adds this to element d of
// its row, a different mix of 1 to 5 per key, so that a row read for K is its init minus a whole
// number of these, the same number for every element (another key's row, or a torn one, is not).
inline float churn_grad(std::uint64_t key, std::uint64_t d) { return static_cast<float>((key % 7 + d * 3) % 5 + 1); }

}  // namespace shmps::test
