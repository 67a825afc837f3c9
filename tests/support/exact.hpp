// The exact-sum check of the multi-process and crash tests (ARCHITECTURE.md invariant 1).
//
// Jobs made with pattern_spec() hold "w" [3, 40000] and "b" [7] with SGD at learning rate 1;
// shmps-test-pusher "exact" pushes the pattern.hpp gradients to them. Small integers keep every
// float sum exact, so the final values must equal minus the sum of every committed push.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace shmps::test {

inline constexpr std::size_t kPatternW = 120000, kPatternB = 7;

// The spec body (Job adds the name) for the exact-sum jobs.
std::string pattern_spec(int max_workers = 8, const std::string& extra = "");

// Pulls "w" and "b" as worker `reader_rank` and expects them to equal minus the sum of the first
// pushes[r] pattern pushes of every rank r, element by element (gtest expectations).
void expect_exact_sum(const std::string& segment, const std::vector<std::uint64_t>& pushes, int reader_rank = 7);

}  // namespace shmps::test
