// The layout plan: every region where layout.hpp says, aligned, non-overlapping, and sized.
#include <gtest/gtest.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#include <shmps/error.hpp>
#include <shmps/shm/memory.hpp>
#include <shmps/shm/pages.hpp>
#include <shmps/shm/segment.hpp>

using namespace shmps::shm;

namespace {
// Gives every parameter an optimizer that keeps `arrays` state arrays (SGD, AdaGrad, Adam).
void with_state_arrays(LayoutRequest& r, std::uint32_t arrays) {
  const shmps::OptimizerKind kind =
      arrays == 0 ? shmps::OptimizerKind::sgd : arrays == 1 ? shmps::OptimizerKind::adagrad : shmps::OptimizerKind::adam;
  for (auto& p : r.params) p.optimizer.kind = kind;
}

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
  with_state_arrays(r, 2);
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

// Worker groups: one 64-byte line per group, rounding up (rank r is in group r / K), and a group
// table sized from the request, not from a fixed number.
TEST(Layout, WorkerGroupsGetOneLineEachRoundingUp) {
  LayoutRequest r = mlp_request();
  const LayoutPlan one = plan_layout(r);
  EXPECT_EQ(one.workers_per_group, 8u) << "0 means every worker in one group";
  EXPECT_EQ(one.group_count, 1u);
  r.workers_per_group = 3;
  const LayoutPlan three = plan_layout(r);
  EXPECT_EQ(three.workers_per_group, 3u);
  EXPECT_EQ(three.group_count, 3u) << "8 ranks in groups of 3: 0..2, 3..5, 6..7";
  EXPECT_EQ(three.groups_offset % kCacheLine, 0u);
  EXPECT_EQ(sizeof(GroupEntry), kCacheLine);
  EXPECT_GE(three.slots_offset - three.groups_offset, 3 * sizeof(GroupEntry));
  r.workers_per_group = 9;
  EXPECT_THROW(plan_layout(r), shmps::Error) << "a group larger than the job";
}

// Several BSP groups cannot stream their steps (one array of step sums), so a ring that cannot
// hold a whole step is refused up front, naming the ring size that would do; one group streams.
TEST(Layout, BspGroupsNeedRingsThatHoldAWholeStep) {
  LayoutRequest r = mlp_request();
  r.bsp = true;
  r.ring_bytes = 1 << 16;  // far less than a step of the MLP (~800 KB)
  EXPECT_NO_THROW(plan_layout(r)) << "one group streams its steps";
  r.workers_per_group = 4;
  try {
    plan_layout(r);
    ADD_FAILURE() << "two BSP groups with rings smaller than a step were accepted";
  } catch (const shmps::Error& e) {
    EXPECT_NE(std::string(e.what()).find("worker groups needs rings that hold a whole step"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("set ring_bytes = "), std::string::npos) << e.what();
  }
  r.ring_bytes = 0;  // automatic: a BSP ring holds a whole step of this small model
  EXPECT_NO_THROW(plan_layout(r));
}

TEST(Layout, FingerprintIsStableAndNonTrivial) {
  static_assert(kLayoutFingerprint != 0);
  constexpr std::uint64_t again = kLayoutFingerprint;
  EXPECT_EQ(again, kLayoutFingerprint);
  EXPECT_EQ(offsetof(WorkerSlot, applied) % kCacheLine, 0u);
  EXPECT_EQ(offsetof(RingHeader, head) - offsetof(RingHeader, tail), 2 * kCacheLine);
}

// ---- The field lists: every field of every shared type, and the fingerprint over them --------

namespace {
using detail::FieldInfo;
using detail::FieldsOf;

// The first field of T's list that does not tile the struct, by name, or "" if the list tiles it.
template <class T>
std::string untiled_field() {
  const auto& list = FieldsOf<T>::list;
  const std::uint64_t i = detail::first_untiled(list, sizeof(T));
  if (i == detail::kTiles) return "";
  if (i == std::size(list)) return "(the end)";
  return list[i].name != nullptr ? list[i].name : "(padding)";
}

template <class T>
std::uint64_t fingerprint_of(const FieldInfo (&list)[std::size(FieldsOf<T>::list)]) {
  return detail::type_fingerprint(0, FieldsOf<T>::name, sizeof(T), alignof(T), list);
}

// A copy of T's list, to edit.
template <class T>
struct ListCopy {
  FieldInfo list[std::size(FieldsOf<T>::list)];
  ListCopy() { std::copy(std::begin(FieldsOf<T>::list), std::end(FieldsOf<T>::list), std::begin(list)); }
  FieldInfo& field(std::string_view name) {
    for (FieldInfo& f : list)
      if (f.name != nullptr && name == f.name) return f;
    throw std::runtime_error("no field " + std::string(name));
  }
};
}  // namespace

TEST(LayoutFields, EveryListTilesItsStructByteForByte) {
  // (The same check is a static_assert in layout.hpp; here it names the field.)
  EXPECT_EQ(untiled_field<shmps::OptimizerSettings>(), "");
  EXPECT_EQ(untiled_field<SegmentHeader>(), "");
  EXPECT_EQ(untiled_field<ParamEntry>(), "");
  EXPECT_EQ(untiled_field<SliceEntry>(), "");
  EXPECT_EQ(untiled_field<ParamStats>(), "");
  EXPECT_EQ(untiled_field<RedoEntry>(), "");
  EXPECT_EQ(untiled_field<RedoInput>(), "");
  EXPECT_EQ(untiled_field<WorkerSlot>(), "");
  EXPECT_EQ(untiled_field<RingHeader>(), "");
  EXPECT_EQ(untiled_field<PushRecord>(), "");
  // Spot checks that the lists hold what the structs do.
  EXPECT_EQ(std::string(FieldsOf<WorkerSlot>::list[0].name), "state");
  EXPECT_EQ(ListCopy<WorkerSlot>().field("applied").offset, offsetof(WorkerSlot, applied));
  EXPECT_EQ(ListCopy<SegmentHeader>().field("mailbox_reply").size, kMailboxBytes);
}

TEST(LayoutFields, AFieldMissingFromAListIsCaughtEvenInsideALinesPadding) {
  // `waiting` is the last word of the worker's hand-off line, followed by that line's padding:
  // without it, the next field still starts on the next line, but the bytes before are a hole.
  ListCopy<WorkerSlot> copy;
  FieldInfo& waiting = copy.field("waiting");
  waiting = FieldInfo{nullptr, 0, 0, 0};  // as if the list had no entry for it
  EXPECT_NE(detail::first_untiled(copy.list, sizeof(WorkerSlot)), detail::kTiles);
  // A PAD one byte off is caught as well.
  ListCopy<SegmentHeader> header;
  for (FieldInfo& f : header.list)
    if (f.name == nullptr) {
      f.size += 8;
      break;
    }
  EXPECT_NE(detail::first_untiled(header.list, sizeof(SegmentHeader)), detail::kTiles);
}

TEST(LayoutFields, SwappingTwoFieldsOfOneTypeChangesTheFingerprint) {
  ListCopy<WorkerSlot> same;
  EXPECT_EQ(fingerprint_of<WorkerSlot>(same.list), fingerprint_of<WorkerSlot>(FieldsOf<WorkerSlot>::list));
  // published and last_commit_seq: both atomic u64 on one line; swapped, every size stays.
  ListCopy<WorkerSlot> swapped;
  std::swap(swapped.field("published").offset, swapped.field("last_commit_seq").offset);
  EXPECT_NE(fingerprint_of<WorkerSlot>(swapped.list), fingerprint_of<WorkerSlot>(same.list));
  // The same in the segment header: two of its offsets (plain u64).
  ListCopy<SegmentHeader> header;
  std::swap(header.field("values_offset").offset, header.field("state_offset").offset);
  EXPECT_NE(fingerprint_of<SegmentHeader>(header.list), fingerprint_of<SegmentHeader>(FieldsOf<SegmentHeader>::list));
}

TEST(LayoutFields, RetypingAFieldOfTheSameSizeChangesTheFingerprint) {
  // PushRecord::grad_sq_norm is a double; as a u64 of the same size it would be read wrongly.
  ListCopy<PushRecord> retyped;
  retyped.field("grad_sq_norm").type_code = detail::field_type_code<std::uint64_t>();
  EXPECT_NE(fingerprint_of<PushRecord>(retyped.list), fingerprint_of<PushRecord>(FieldsOf<PushRecord>::list));
  EXPECT_NE(detail::field_type_code<std::atomic<std::uint64_t>>(), detail::field_type_code<std::uint64_t>());
  EXPECT_NE(detail::field_type_code<std::uint64_t[2]>(), detail::field_type_code<std::uint64_t[3]>());
}

TEST(LayoutFields, SharedTypesCannotBeCopiedParamEntryAndSettingsCan) {
  static_assert(!std::is_copy_constructible_v<SegmentHeader> && !std::is_move_assignable_v<SegmentHeader>);
  static_assert(!std::is_copy_constructible_v<SliceEntry> && !std::is_copy_assignable_v<SliceEntry>);
  static_assert(!std::is_copy_constructible_v<ParamStats> && !std::is_move_constructible_v<ParamStats>);
  static_assert(!std::is_copy_constructible_v<RedoEntry> && !std::is_copy_assignable_v<RedoEntry>);
  static_assert(!std::is_copy_constructible_v<WorkerSlot> && !std::is_copy_assignable_v<WorkerSlot>);
  static_assert(!std::is_copy_constructible_v<RingHeader> && !std::is_copy_assignable_v<RingHeader>);
  static_assert(!std::is_copy_constructible_v<PushRecord> && !std::is_copy_assignable_v<PushRecord>);
  // Values written once at creation, built and copied on purpose (layout.hpp, settings.hpp).
  static_assert(std::is_copy_constructible_v<ParamEntry> && std::is_copy_assignable_v<ParamEntry>);
  static_assert(std::is_copy_constructible_v<shmps::OptimizerSettings>);
  SUCCEED();
}

// ---- What a segment costs ----------------------------------------------------------------------

namespace {
// A model of `params` parameters of 1M floats (4 MiB each).
LayoutRequest big_request(std::size_t params, std::uint32_t workers, std::uint32_t state_arrays, bool bsp) {
  LayoutRequest r;
  for (std::size_t i = 0; i < params; ++i) r.params.push_back({"layer" + std::to_string(i), {1024, 1024}});
  r.max_workers = workers;
  with_state_arrays(r, state_arrays);
  r.bsp = bsp;
  r.redo_entries = 4;
  return r;
}

void expect_parts_add_up(const LayoutPlan& plan) {
  const MemoryBreakdown m = memory_breakdown(plan);
  std::uint64_t sum = 0;
  for (const auto& part : m.parts) sum += part.bytes;
  EXPECT_EQ(sum, plan.total_bytes);
  EXPECT_EQ(m.total_bytes, plan.total_bytes);
  std::uint64_t floats = 0;
  for (const auto& p : plan.params) floats += p.size;
  EXPECT_EQ(m.bytes_of("values"), floats * sizeof(float));
  EXPECT_EQ(m.bytes_of("optimizer state"), plan.state_arrays * floats * shmps::state_dtype_bytes(plan.state_dtype));
  EXPECT_EQ(m.bytes_of("rings"), plan.max_workers * (sizeof(RingHeader) + plan.ring_bytes));
  EXPECT_EQ(m.bytes_of("worker slots"), plan.max_workers * sizeof(WorkerSlot));
  EXPECT_EQ(m.bytes_of("slice table"), plan.slice_count * sizeof(SliceEntry));
  EXPECT_GE(m.bytes_of("exactly-once table"), plan.slice_count * plan.max_workers * 8);
  EXPECT_EQ(m.bytes_of("redo log"), plan.redo_count * plan.redo_stride);
  EXPECT_EQ(m.bytes_of("header"), plan.params_offset);
  EXPECT_EQ(m.overhead_bytes(), plan.total_bytes - m.bytes_of("values") - m.bytes_of("optimizer state"));
  // The table shows every part, the total and the overhead, with exact bytes.
  const std::string table = memory_table(m);
  for (const auto& part : m.parts) EXPECT_NE(table.find(part.name), std::string::npos) << part.name;
  EXPECT_NE(table.find("total"), std::string::npos);
  EXPECT_NE(table.find(std::to_string(plan.total_bytes)), std::string::npos) << table;
  EXPECT_NE(table.find("% on top of values + optimizer state"), std::string::npos) << table;
}
}  // namespace

TEST(Memory, PartsAddUpToTheSegment) {
  expect_parts_add_up(plan_layout(mlp_request()));
  LayoutRequest adam = mlp_request();
  with_state_arrays(adam, 2);
  expect_parts_add_up(plan_layout(adam));
  expect_parts_add_up(plan_layout(big_request(256, 8, 0, false)));
  expect_parts_add_up(plan_layout(big_request(256, 8, 2, false)));
  expect_parts_add_up(plan_layout(big_request(16, 8, 1, true)));
}

// bf16 state: half the state's bytes, in the plan, the memory table and the redo entries; every
// state array still 64-byte aligned and apart from the others.
TEST(Memory, Bf16StateHalvesTheState) {
  LayoutRequest f32 = mlp_request();
  with_state_arrays(f32, 2);
  LayoutRequest bf16 = f32;
  bf16.state_dtype = shmps::StateDType::bf16;
  const LayoutPlan a = plan_layout(f32), b = plan_layout(bf16);
  expect_parts_add_up(b);
  EXPECT_EQ(memory_breakdown(b).bytes_of("optimizer state") * 2, memory_breakdown(a).bytes_of("optimizer state"));
  EXPECT_NE(memory_table(memory_breakdown(b)).find("2 arrays of bf16"), std::string::npos);
  EXPECT_EQ(a.redo_stride - b.redo_stride, 2 * a.slice_floats * 2);
  EXPECT_LT(b.total_bytes, a.total_bytes);
  for (std::size_t i = 0; i < b.params.size(); ++i) {
    const auto& p = b.params[i];
    EXPECT_EQ(p.state_offset[0] % kCacheLine, 0u);
    EXPECT_EQ(p.state_offset[1] % kCacheLine, 0u);
    EXPECT_GE(p.state_offset[1], p.state_offset[0] + p.size * 2);
    if (i + 1 < b.params.size()) {
      EXPECT_GE(b.params[i + 1].state_offset[0], p.state_offset[0] + p.size * 2);
    }
  }
  EXPECT_LE(b.params.back().state_offset[1] + b.params.back().size * 2, b.total_bytes);
  // A big model: 1 GiB of values, 2 GiB of float32 Adam state or 1 GiB of bf16.
  LayoutRequest big = big_request(256, 8, 2, false);
  big.state_dtype = shmps::StateDType::bf16;
  const LayoutPlan bb = plan_layout(big);
  expect_parts_add_up(bb);
  EXPECT_EQ(memory_breakdown(bb).bytes_of("optimizer state"), std::uint64_t{1} << 30);
  EXPECT_EQ(bb.state_offset % kHugePageBytes, 0u);
}

// bf16 state in a BSP job whose steps stream: the step sums stay float32 (gradients), one
// model's worth after the (halved) state, apart from it; the redo entries keep a float32 values
// area of a whole slice (where a streamed step's sums go) before their bf16 state arrays.
TEST(Memory, Bf16StateWithStreamedBspStepsKeepsTheStepSumsFloat32) {
  LayoutRequest request = big_request(256, 8, 2, true);
  request.state_dtype = shmps::StateDType::bf16;
  const LayoutPlan plan = plan_layout(request);
  expect_parts_add_up(plan);
  std::uint64_t values_bytes = 0;
  for (const auto& p : plan.params) values_bytes += align_up(p.size * sizeof(float), kCacheLine);
  EXPECT_EQ(plan.step_sums_bytes, values_bytes);
  EXPECT_EQ(memory_breakdown(plan).bytes_of("BSP step sums"), std::uint64_t{1} << 30);
  EXPECT_EQ(memory_breakdown(plan).bytes_of("optimizer state"), std::uint64_t{1} << 30);
  const auto& last = plan.params.back();
  EXPECT_GE(plan.step_sums_offset, last.state_offset[1] + last.size * 2);
  EXPECT_EQ(plan.step_sums_offset % kHugePageBytes, 0u);
  EXPECT_LE(plan.step_sums_offset + plan.step_sums_bytes, plan.total_bytes);
  EXPECT_EQ(plan.redo_stride, align_up(sizeof(RedoEntry) + align_up(request.max_workers, 8) * sizeof(std::uint64_t) +
                                           redo_inputs_bytes(request.max_workers) + plan.slice_floats * sizeof(float) +
                                           2 * plan.slice_floats * 2,
                                       kCacheLine));
}

TEST(Memory, DefaultRingsOfABigModelCostLittleAndTakeAWholePushInAspAndStreamBspSteps) {
  // 1 GiB of values (256 parameters of 4 MiB), 8 workers.
  const LayoutPlan asp = plan_layout(big_request(256, 8, 2, false));
  const std::uint64_t largest_record = record_bytes_for(1 << 20);
  EXPECT_EQ(asp.ring_bytes, 2 * largest_record);  // two pushes of the largest parameter
  EXPECT_NE(asp.ring_rule.find("two pushes of the largest parameter"), std::string::npos) << asp.ring_rule;
  // A whole-parameter push fits one record (RingProducer::max_record_floats: half the ring).
  EXPECT_GE((asp.ring_bytes / 2 - sizeof(PushRecord)) / sizeof(float), std::uint64_t{1} << 20);
  const MemoryBreakdown m = memory_breakdown(asp);
  EXPECT_LT(m.bytes_of("rings"), (std::uint64_t{1} << 30) / 15);   // under 7% of the values
  EXPECT_LT(m.overhead_percent(), 3.0);                             // with Adam's state
  EXPECT_LT(memory_breakdown(plan_layout(big_request(256, 8, 0, false))).overhead_percent(), 7.5);  // SGD
  EXPECT_EQ(asp.step_sums_bytes, 0u);
  // A BSP step of 1 GiB is more than kMaxAutoRingBytes: the rings stay as in ASP, and the
  // step's pushes stream into one model's worth of step sums.
  const LayoutPlan bsp = plan_layout(big_request(256, 8, 2, true));
  EXPECT_EQ(bsp.ring_bytes, asp.ring_bytes);
  EXPECT_EQ(bsp.step_sums_bytes, std::uint64_t{1} << 30);
  EXPECT_EQ(memory_breakdown(bsp).bytes_of("BSP step sums"), std::uint64_t{1} << 30);
  // A step that fits kMaxAutoRingBytes: a ring holds a whole step, and there are no sums.
  const LayoutPlan small_bsp = plan_layout(big_request(4, 8, 2, true));
  EXPECT_EQ(small_bsp.ring_bytes, bsp_step_ring_bytes(small_bsp.params));
  EXPECT_NE(small_bsp.ring_rule.find("BSP step"), std::string::npos) << small_bsp.ring_rule;
  EXPECT_EQ(small_bsp.step_sums_bytes, 0u);
  // Small models get the 1 MiB minimum; an explicit ring_bytes wins over every rule.
  LayoutRequest tiny;
  tiny.params = {{"w", {10}}};
  EXPECT_EQ(plan_layout(tiny).ring_bytes, kMinRingBytes);
  tiny.bsp = true;
  EXPECT_EQ(plan_layout(tiny).ring_bytes, kMinRingBytes);
  LayoutRequest set = big_request(256, 8, 0, true);
  set.ring_bytes = 1 << 20;
  EXPECT_EQ(plan_layout(set).ring_bytes, 1u << 20);
  EXPECT_EQ(plan_layout(set).ring_rule, "set by ring_bytes");
}

TEST(Memory, BigRegionsStartOnHugePagesSmallOnesAreNotPadded) {
  const LayoutPlan big = plan_layout(big_request(256, 8, 2, false));
  EXPECT_EQ(big.values_offset % kHugePageBytes, 0u);
  EXPECT_EQ(big.state_offset % kHugePageBytes, 0u);
  EXPECT_EQ(big.rings_offset % kHugePageBytes, 0u);  // 8 rings of 8 MiB: 64 MiB
  EXPECT_EQ(big.total_bytes % kHugePageBytes, 0u);
  for (const auto& p : big.params) EXPECT_EQ(p.values_offset % kCacheLine, 0u);
  EXPECT_LT(memory_breakdown(big).bytes_of("alignment padding"), 4 * kHugePageBytes);
  // A ring of 64 MiB or more starts on a huge page too.
  LayoutRequest bsp_request = big_request(32, 4, 0, true);
  bsp_request.ring_bytes = 128u << 20;
  const LayoutPlan bsp = plan_layout(bsp_request);
  EXPECT_EQ(bsp.ring_stride % kHugePageBytes, 0u);
  EXPECT_EQ(bsp.rings_offset % kHugePageBytes, 0u);
  EXPECT_GE(bsp.ring_stride, sizeof(RingHeader) + bsp.ring_bytes);
  // The reference MLP stays compact: page alignment only.
  const LayoutPlan mlp = plan_layout(mlp_request());
  EXPECT_LT(memory_breakdown(mlp).bytes_of("alignment padding"), 3 * 4096u);
  EXPECT_EQ(mlp.ring_stride, sizeof(RingHeader) + mlp.ring_bytes);
}

// ---- Huge pages: what the system offers ---------------------------------------------------------

TEST(HugePages, SettingsAreReadFromShmemEnabledAndTheDevShmMount) {
  EXPECT_EQ(parse_shmem_enabled("always within_size advise [never] deny force\n"), HugeSetting::never);
  EXPECT_EQ(parse_shmem_enabled("always within_size [advise] never deny force"), HugeSetting::advise);
  EXPECT_EQ(parse_shmem_enabled("[force]"), HugeSetting::force);
  EXPECT_EQ(parse_shmem_enabled(""), HugeSetting::unknown);
  const std::string without = "25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24731708k\n";
  const std::string advise = "30 25 0:27 / /dev/shm rw,relatime shared:4 - tmpfs tmpfs rw,size=1g,huge=advise,inode64\n";
  const std::string other = "31 25 0:28 / /mnt/big rw - tmpfs tmpfs rw,huge=always\n";
  EXPECT_EQ(parse_mount_huge(without, "/dev/shm"), HugeSetting::never);
  EXPECT_EQ(parse_mount_huge(without + advise + other, "/dev/shm"), HugeSetting::advise);  // the last mount there
  EXPECT_EQ(parse_mount_huge(advise + without, "/dev/shm"), HugeSetting::never);
  EXPECT_EQ(parse_mount_huge(other, "/dev/shm"), HugeSetting::unknown);
  EXPECT_EQ(parse_mount_huge("40 1 8:1 / /dev/shm rw - ext4 /dev/sda1 rw\n", "/dev/shm"), HugeSetting::never);
}

TEST(HugePages, OfferedOnlyWhereTheMountOrForceSaysSo) {
  using S = HugeSetting;
  EXPECT_FALSE((HugePageSupport{S::never, S::never}.offered()));
  EXPECT_FALSE((HugePageSupport{S::never, S::advise}.offered()));  // shmem_enabled is for the internal mount
  EXPECT_TRUE((HugePageSupport{S::advise, S::never}.offered()));
  EXPECT_TRUE((HugePageSupport{S::within_size, S::never}.offered()));
  EXPECT_TRUE((HugePageSupport{S::never, S::force}.offered()));
  EXPECT_FALSE((HugePageSupport{S::always, S::deny}.offered()));
  const std::string no = huge_page_text({S::never, S::never}, 0, 1 << 20);
  EXPECT_NE(no.find("not offered (/dev/shm is mounted without huge=, shmem_enabled = never); 4 KiB pages"),
            std::string::npos) << no;
  EXPECT_NE(huge_page_text({S::always, S::deny}, 0, 1).find("shmem_enabled = deny overrides"), std::string::npos);
  const std::string yes = huge_page_text({S::advise, S::never}, std::uint64_t{6} << 20, std::uint64_t{8} << 20);
  EXPECT_NE(yes.find("offered (/dev/shm huge=advise, the segment is madvised); 6.0 MiB of 8.0 MiB in 2 MiB pages"),
            std::string::npos) << yes;
  // This machine: whatever it offers, the reading works.
  const HugePageSupport here = huge_page_support();
  EXPECT_NE(here.mount, S::unknown);
}
