// shmps-test-pusher: a worker for the multi-process tests.
//
//   shmps-test-pusher exact   --pushes K   pushes the pattern.hpp gradients, waits until applied
//   shmps-test-pusher uniform --pushes K   pushes all-ones gradients to the whole of "u"
//   shmps-test-pusher puller  --millis T   pulls "u" slice by slice for T ms and checks that every
//                                          slice is whole: all its values equal -(its version)
// Segment and rank come from SHMPS_SEGMENT / SHMPS_RANK. Exit code 0 on success.
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include <shmps/worker.hpp>

#include "pattern.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: shmps-test-pusher exact|uniform|puller [--pushes K] [--millis T]\n";
    return 2;
  }
  const std::string mode = argv[1];
  std::uint64_t pushes = 100, millis = 1000;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    if (key == "--pushes") pushes = std::stoull(argv[i + 1]);
    else if (key == "--millis") millis = std::stoull(argv[i + 1]);
  }
  try {
    shmps::Worker w;
    if (mode == "exact") {
      const std::size_t w_size = w.param("w").size, b_size = w.param("b").size;
      std::vector<float> grad(w_size);
      std::uint64_t last = 0;
      const auto rank = static_cast<std::uint64_t>(w.rank());
      for (std::uint64_t k = 0; k < pushes; ++k) {
        const auto plan = shmps::test::plan_push(rank, k, w_size, b_size);
        for (std::uint64_t j = 0; j < plan.count; ++j) grad[j] = shmps::test::pattern(rank, k, plan.offset + j);
        last = w.push(plan.param, plan.offset, std::span<const float>(grad.data(), plan.count));
      }
      w.wait_applied(last);
      std::cout << "rank " << rank << " pushed " << last << " applied " << w.applied() << "\n";
      return 0;
    }
    if (mode == "uniform") {
      std::vector<float> ones(w.param("u").size, 1.0f);
      std::uint64_t last = 0;
      for (std::uint64_t k = 0; k < pushes; ++k) last = w.push("u", ones);
      w.wait_applied(last);
      std::cout << "pushed " << last << "\n";
      return 0;
    }
    if (mode == "puller") {
      const std::size_t size = w.param("u").size;
      const std::size_t slice = 16384;  // the test's slice_bytes / 4
      std::vector<float> buf(slice);
      std::uint64_t pulls = 0, torn = 0, max_version = 0;
      const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(millis);
      while (std::chrono::steady_clock::now() < end) {
        for (std::size_t off = 0; off < size; off += slice) {
          const std::size_t n = std::min(slice, size - off);
          const std::uint64_t version = w.pull("u", off, std::span<float>(buf.data(), n));
          for (std::size_t i = 0; i < n; ++i)
            if (buf[i] != -static_cast<float>(version)) {
              ++torn;
              break;
            }
          ++pulls;
          max_version = std::max(max_version, version);
        }
      }
      std::cout << "pulls " << pulls << " torn " << torn << " max_version " << max_version << "\n";
      return torn == 0 && pulls > 0 ? 0 : 1;
    }
    std::cerr << "unknown mode " << mode << "\n";
    return 2;
  } catch (const shmps::Error& e) {
    std::cerr << "shmps-test-pusher: " << e.what() << "\n";
    return 1;
  }
}
