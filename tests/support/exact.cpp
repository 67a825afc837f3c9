#include "exact.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <string_view>
#include <vector>

#include <shmps/worker.hpp>

#include "pattern.hpp"

namespace shmps::test {

std::string pattern_spec(int max_workers, const std::string& extra) {
  return "slice_bytes = 65536\nmax_workers = " + std::to_string(max_workers) + "\n" + extra +
         "[optimizer]\nkind = \"sgd\"\nlr = 1.0\n"
         "[[param]]\nname = \"w\"\nshape = [3, 40000]\n"
         "[[param]]\nname = \"b\"\nshape = [7]\n";
}

namespace {

// The expected sums in O(pushes + 9 x elements) per rank, not O(pushes x elements): the soak's
// hour commits some 26 million pushes, whose element-by-element sum took longer than the test's
// watchdog. pattern(r, k, i) depends on k only through k mod 9 (17k mod 9 = 17(k mod 9) mod 9), so
// per rank it is enough to know, for each residue c of k mod 9, how many pushes of that residue
// cover each element: a count for the whole-parameter pushes, and a difference array (+1 at a
// range's start, -1 past its end) for the ranges of "w".
void add_expected(std::uint64_t r, std::uint64_t pushes, std::vector<double>& want_w, std::vector<double>& want_b) {
  constexpr std::uint64_t kResidues = 9;
  std::vector<std::vector<std::int64_t>> cover(kResidues);  // "w" ranges, as difference arrays
  std::uint64_t whole_w[kResidues] = {}, whole_b[kResidues] = {};
  for (std::uint64_t k = 0; k < pushes; ++k) {
    const auto plan = plan_push(r, k, kPatternW, kPatternB);
    const std::uint64_t c = k % kResidues;
    if (std::string_view(plan.param) == "b") {
      ++whole_b[c];
    } else if (plan.offset == 0 && plan.count == kPatternW) {
      ++whole_w[c];
    } else {
      if (cover[c].empty()) cover[c].assign(kPatternW + 1, 0);
      ++cover[c][plan.offset];
      --cover[c][plan.offset + plan.count];
    }
  }
  for (std::uint64_t c = 0; c < kResidues; ++c) {
    std::int64_t covering = 0;
    for (std::size_t i = 0; i < kPatternW; ++i) {
      if (!cover[c].empty()) covering += cover[c][i];
      const auto times = static_cast<double>(whole_w[c] + static_cast<std::uint64_t>(covering));
      if (times != 0) want_w[i] -= times * pattern(r, c, i);
    }
    for (std::size_t i = 0; i < kPatternB; ++i)
      want_b[i] -= static_cast<double>(whole_b[c]) * pattern(r, c, i);
  }
}

}  // namespace

void expect_exact_sum(const std::string& segment, const std::vector<std::uint64_t>& pushes, int reader_rank) {
  std::vector<double> want_w(kPatternW, 0.0), want_b(kPatternB, 0.0);
  for (std::uint64_t r = 0; r < pushes.size(); ++r) add_expected(r, pushes[r], want_w, want_b);
  Worker reader(WorkerOptions{.segment = segment, .rank = reader_rank});
  std::vector<float> w(kPatternW), b(kPatternB);
  reader.pull("w", w);
  reader.pull("b", b);
  std::size_t wrong = 0, first = kPatternW;
  for (std::size_t i = 0; i < kPatternW; ++i)
    if (static_cast<double>(w[i]) != want_w[i] && wrong++ == 0) first = i;
  for (std::size_t i = 0; i < kPatternB; ++i) EXPECT_EQ(static_cast<double>(b[i]), want_b[i]) << "b[" << i << "]";
  EXPECT_EQ(wrong, 0u) << "first wrong element w[" << first << "] = " << (first < kPatternW ? w[first] : 0.0f)
                       << ", expected " << (first < kPatternW ? want_w[first] : 0.0);
  // The check can fail: with any pushes at all, the sums are far from the initial zeros.
  std::uint64_t total = 0;
  for (auto p : pushes) total += p;
  if (total >= 3) {
    EXPECT_GT(std::count_if(want_w.begin(), want_w.end(), [](double x) { return x != 0.0; }),
              static_cast<long>(kPatternW / 4));
  }
}

}  // namespace shmps::test
