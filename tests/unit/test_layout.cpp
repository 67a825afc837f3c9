// The layout plan: every region where layout.hpp says, aligned, non-overlapping, and sized.
#include <gtest/gtest.h>

#include <shmps/error.hpp>
#include <shmps/shm/segment.hpp>

using namespace shmps::shm;

namespace {
LayoutRequest mlp_request() {
  LayoutRequest r;
  r.params = {{"fc1.weight", {256, 784}}, {"fc1.bias", {256}}, {"fc2.weight", {10, 256}}, {"fc2.bias", {10}}};
  r.slice_bytes = 65536;
  r.max_workers = 8;
  return r;
}
}  // namespace

TEST(Layout, PlanOfTheReferenceMlp) {
  const LayoutPlan plan = plan_layout(mlp_request());
  EXPECT_EQ(plan.slice_floats, 16384u);
  // fc1.weight: 200704 floats -> 13 slices; the others one each.
  ASSERT_EQ(plan.params.size(), 4u);
  EXPECT_EQ(plan.params[0].slice_count, 13u);
  EXPECT_EQ(plan.params[1].first_slice, 13u);
  EXPECT_EQ(plan.slice_count, 16u);
  EXPECT_EQ(plan.params[0].size, 200704u);
  // Regions in order, 64-byte aligned, values page aligned, nothing overlapping.
  const std::uint64_t offsets[] = {plan.params_offset, plan.slices_offset, plan.applied_offset, plan.slots_offset,
                                   plan.rings_offset,  plan.values_offset, plan.state_offset,   plan.total_bytes};
  for (std::size_t i = 0; i + 1 < std::size(offsets); ++i) EXPECT_LE(offsets[i], offsets[i + 1]) << i;
  for (auto o : offsets) EXPECT_EQ(o % kCacheLine, 0u);
  EXPECT_EQ(plan.values_offset % 4096, 0u);
  EXPECT_GE(plan.params_offset, sizeof(SegmentHeader));
  EXPECT_EQ(plan.slots_offset - plan.applied_offset >= plan.slice_count * 8 * sizeof(std::uint64_t), true);
  for (const auto& p : plan.params) EXPECT_EQ(p.values_offset % kCacheLine, 0u);
  // Default ring: two records of the largest parameter.
  EXPECT_GE(plan.ring_bytes, 2 * record_bytes_for(200704));
  EXPECT_EQ(plan.ring_stride, sizeof(RingHeader) + plan.ring_bytes);
  EXPECT_EQ(plan.state_offset, plan.total_bytes);  // SGD keeps no state
}

TEST(Layout, OptimizerStateArraysGetTheirOwnSpace) {
  LayoutRequest r = mlp_request();
  r.state_arrays = 2;
  const LayoutPlan plan = plan_layout(r);
  EXPECT_GE(plan.total_bytes - plan.state_offset, 2 * 203530 * sizeof(float));
  EXPECT_NE(plan.params[0].state_offset[0], plan.params[0].state_offset[1]);
  EXPECT_EQ(plan.params[3].state_offset[1] % kCacheLine, 0u);
}

TEST(Layout, ExplicitRingSizeIsRespected) {
  LayoutRequest r = mlp_request();
  r.ring_bytes = 1 << 16;
  EXPECT_EQ(plan_layout(r).ring_bytes, 1u << 16);
}

TEST(Layout, ImpossibleRequestsAreRefused) {
  LayoutRequest r = mlp_request();
  r.slice_bytes = 100;
  EXPECT_THROW(plan_layout(r), shmps::Error);
  r = mlp_request();
  r.max_workers = 0;
  EXPECT_THROW(plan_layout(r), shmps::Error);
  r = mlp_request();
  r.params.push_back({"zero", {3, 0}});
  EXPECT_THROW(plan_layout(r), shmps::Error);
  r = mlp_request();
  r.params.clear();
  EXPECT_THROW(plan_layout(r), shmps::Error);
}

TEST(Layout, FingerprintIsStableAndNonTrivial) {
  static_assert(kLayoutFingerprint != 0);
  constexpr std::uint64_t again = kLayoutFingerprint;
  EXPECT_EQ(again, kLayoutFingerprint);
  EXPECT_EQ(offsetof(WorkerSlot, applied) % kCacheLine, 0u);
  EXPECT_EQ(offsetof(RingHeader, head) - offsetof(RingHeader, tail), 2 * kCacheLine);
}
