// Replays a fuzz harness's inputs in the normal test suite (with the compiler and flags of the
// build at hand, no libFuzzer): every seed of tests/fuzz/corpus/<target>/ and every input a fuzz
// run found a bug with, kept in tests/fuzz/regressions/<target>/ next to its fix. The harness's
// own entry point (tests/fuzz/fuzz_<target>.cpp, compiled into this test) runs each input and
// aborts when one of its checks fails, as under the fuzzer. SHMPS_FUZZ_TARGET names the target.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);
extern "C" __attribute__((weak)) int LLVMFuzzerInitialize(int* argc, char*** argv);

namespace {

namespace fs = std::filesystem;

std::vector<fs::path> inputs(const char* kind) {
  std::vector<fs::path> out;
  const fs::path dir = fs::path(SHMPS_SOURCE_DIR) / "tests/fuzz" / kind / SHMPS_FUZZ_TARGET;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.is_regular_file()) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

void replay(const fs::path& path) {
  SCOPED_TRACE(path.string());
  std::ifstream in(path, std::ios::binary);
  ASSERT_TRUE(in) << "cannot read " << path;
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()), 0);
}

struct FuzzReplay : ::testing::Test {
  static void SetUpTestSuite() {
    if (LLVMFuzzerInitialize != nullptr) {
      int argc = 1;
      char name[] = "test_fuzz_replay";
      char* args[] = {name, nullptr};
      char** argv = args;
      LLVMFuzzerInitialize(&argc, &argv);
    }
  }
};

TEST_F(FuzzReplay, SeedCorpus) {
  const auto seeds = inputs("corpus");
  EXPECT_FALSE(seeds.empty()) << "no seeds in tests/fuzz/corpus/" SHMPS_FUZZ_TARGET;
  for (const auto& p : seeds) replay(p);
}

// Every input a fuzz run found a crash or a failed check with (RELIABILITY.md, "Fuzzing").
TEST_F(FuzzReplay, FoundInputsStayFixed) {
  for (const auto& p : inputs("regressions")) replay(p);
}

}  // namespace
