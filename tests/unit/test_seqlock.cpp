// The seqlock: a reader never accepts a copy that mixes two writes.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include <shmps/shm/seqlock.hpp>

using namespace shmps::shm;

TEST(Seqlock, WriteMakesTheWordOddThenEvenAgain) {
  std::atomic<std::uint64_t> word{0};
  const auto before = seqlock_write_begin(word);
  EXPECT_EQ(word.load() % 2, 1u);
  std::uint64_t version = 99;
  int copies = 0;
  EXPECT_EQ(seqlock_try_read(word, version, [&] { ++copies; }), SeqlockRead::retry);
  EXPECT_EQ(copies, 0);  // an odd word is refused before copying
  seqlock_write_end(word, before, 3);
  EXPECT_EQ(word.load(), 6u);
  EXPECT_EQ(seqlock_try_read(word, version, [&] { ++copies; }), SeqlockRead::ok);
  EXPECT_EQ(version, 6u);
  EXPECT_EQ(copies, 1);
}

TEST(Seqlock, ReadersNeverSeeATornBuffer) {
  constexpr std::size_t kFloats = 4096;
  std::vector<std::atomic<float>> data(kFloats);  // atomics only so the test itself is race-free
  for (auto& d : data) d.store(0.0f);
  std::atomic<std::uint64_t> word{0};
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> accepted{0}, torn{0};

  // The writer keeps writing until the readers have accepted enough copies taken while it was
  // active (bounded in time), pausing between writes so that clean reads are possible at all.
  std::atomic<int> writes{0};
  std::thread writer([&] {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (int v = 1; (v <= 2000 || accepted < 1000) && std::chrono::steady_clock::now() < deadline; ++v) {
      const auto before = seqlock_write_begin(word);
      for (auto& d : data) d.store(static_cast<float>(v), std::memory_order_relaxed);
      seqlock_write_end(word, before, 1);
      writes = v;
      std::this_thread::yield();
    }
    stop = true;
  });
  std::vector<std::thread> readers;
  for (int r = 0; r < 2; ++r)
    readers.emplace_back([&] {
      std::vector<float> copy(kFloats);
      while (!stop) {
        std::uint64_t version = 0;
        const auto result = seqlock_try_read(word, version, [&] {
          for (std::size_t i = 0; i < kFloats; ++i) copy[i] = data[i].load(std::memory_order_relaxed);
        });
        if (result != SeqlockRead::ok) continue;
        ++accepted;
        for (float x : copy)
          if (x != static_cast<float>(version / 2)) {
            ++torn;
            break;
          }
      }
    });
  writer.join();
  for (auto& t : readers) t.join();
  EXPECT_GE(accepted.load(), 1000u);
  EXPECT_GE(writes.load(), 2000);
  EXPECT_EQ(torn.load(), 0u);
}
