// A worker built outside the shmps tree, against an installed shmps (tests/install). It joins the
// job that test_consumer.sh started (one parameter "w" of shape [2, 3], zeros, SGD with lr = 1),
// checks what it pulls, pushes the gradient g, waits until it is applied and checks the result:
// every value is an integer, so the check is exact.
//
// usage: consumer SEGMENT K    K: this is the K-th run against the server, so w = -(K-1)*g before
//                              and -K*g after.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <shmps/worker.hpp>

namespace {

bool expect_times(const char* when, const std::vector<float>& values, const std::vector<float>& g, float k) {
  for (std::size_t i = 0; i < g.size(); ++i) {
    if (values[i] != -k * g[i]) {
      std::fprintf(stderr, "consumer: %s, w[%zu] = %g, expected %g\n", when, i, static_cast<double>(values[i]),
                   static_cast<double>(-k * g[i]));
      return false;
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: consumer SEGMENT K\n");
    return 2;
  }
  const std::string segment = argv[1];
  const int k = std::atoi(argv[2]);
  const std::vector<float> g{1, 2, 3, -4, 5, -6};
  try {
    shmps::Worker w(shmps::WorkerOptions{.segment = segment, .rank = -1, .timeout = std::chrono::seconds(10)});
    const shmps::ParamInfo& p = w.param("w");
    if (p.size != g.size() || p.shape != std::vector<std::size_t>{2, 3}) {
      std::fprintf(stderr, "consumer: parameter w has %zu elements, expected 6 as [2, 3]\n", p.size);
      return 1;
    }
    std::vector<float> values(p.size);
    w.pull("w", values);
    if (!expect_times("before the push", values, g, static_cast<float>(k - 1))) return 1;
    const std::uint64_t seq = w.push("w", g);
    w.wait_applied(seq);
    const std::uint64_t version = w.pull("w", values);
    if (!expect_times("after the push", values, g, static_cast<float>(k))) return 1;
    if (version != static_cast<std::uint64_t>(k)) {
      std::fprintf(stderr, "consumer: version %llu after push %d\n", static_cast<unsigned long long>(version), k);
      return 1;
    }
    w.leave();
  } catch (const shmps::Error& e) {
    std::fprintf(stderr, "consumer: %s\n", e.what());
    return 1;
  }
  std::printf("consumer: ok (run %d on %s)\n", k, segment.c_str());
  return 0;
}
