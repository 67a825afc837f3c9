#include "exact.hpp"

#include <gtest/gtest.h>

#include <shmps/worker.hpp>

#include "pattern.hpp"

namespace shmps::test {

std::string pattern_spec(int max_workers, const std::string& extra) {
  return "slice_bytes = 65536\nmax_workers = " + std::to_string(max_workers) + "\n" + extra +
         "[optimizer]\nkind = \"sgd\"\nlr = 1.0\n"
         "[[param]]\nname = \"w\"\nshape = [3, 40000]\n"
         "[[param]]\nname = \"b\"\nshape = [7]\n";
}

void expect_exact_sum(const std::string& segment, const std::vector<std::uint64_t>& pushes, int reader_rank) {
  std::vector<double> want_w(kPatternW, 0.0), want_b(kPatternB, 0.0);
  for (std::uint64_t r = 0; r < pushes.size(); ++r)
    for (std::uint64_t k = 0; k < pushes[r]; ++k) {
      const auto plan = plan_push(r, k, kPatternW, kPatternB);
      auto& target = std::string(plan.param) == "w" ? want_w : want_b;
      for (std::uint64_t j = 0; j < plan.count; ++j) target[plan.offset + j] -= pattern(r, k, plan.offset + j);
    }
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
