#include "shmps/shm/memory.hpp"

#include <algorithm>
#include <cstdio>
#include <sstream>

namespace shmps::shm {

std::string human_bytes(std::uint64_t bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 5) {
    value /= 1024.0;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof text, "%.1f %s", value, units[unit]);
  return text;
}

double MemoryBreakdown::overhead_percent() const noexcept {
  const std::uint64_t model = values_bytes + state_bytes;
  return model == 0 ? 0.0 : 100.0 * static_cast<double>(overhead_bytes()) / static_cast<double>(model);
}

std::uint64_t MemoryBreakdown::bytes_of(std::string_view name) const noexcept {
  for (const auto& p : parts)
    if (p.name == name) return p.bytes;
  return 0;
}

MemoryBreakdown memory_breakdown(const LayoutPlan& plan) {
  MemoryBreakdown m;
  m.total_bytes = plan.total_bytes;
  std::uint64_t floats = 0, halves = 0;  // elements in all; those stored in 2 bytes (bf16, fp16)
  for (const auto& p : plan.params) {
    floats += p.size;
    m.values_bytes += p.size * dtype_bytes(p.dtype);
    if (p.dtype != DType::f32) halves += p.size;
  }
  const std::uint64_t state_elem = state_dtype_bytes(plan.state_dtype);
  std::uint32_t arrays_least = 2, arrays_most = 0;  // state arrays per parameter
  for (const auto& p : plan.params) {
    const auto a = static_cast<std::uint32_t>(state_arrays_of(p));
    m.state_bytes += a * p.size * state_elem;
    arrays_least = std::min(arrays_least, a);
    arrays_most = std::max(arrays_most, a);
  }
  m.ring_each_bytes = sizeof(RingHeader) + plan.ring_bytes;  // a big ring's padding to 2 MiB is padding
  const std::uint64_t rings = plan.max_workers * m.ring_each_bytes;
  const std::uint64_t slots = plan.rings_offset > plan.slots_offset ? plan.max_workers * sizeof(WorkerSlot) : 0;
  auto x = [](std::uint64_t n, const std::string& each) { return std::to_string(n) + " x " + each; };

  m.parts.push_back({"values", m.values_bytes,
                     std::to_string(plan.params.size()) + (plan.params.size() == 1 ? " parameter, " : " parameters, ") +
                         (halves == 0 ? std::to_string(floats) + " floats"
                                      : std::to_string(floats) + " elements, " + std::to_string(halves) +
                                            " of them in 2 bytes (bf16, fp16)")});
  m.parts.push_back({"optimizer state", m.state_bytes,
                     arrays_most == 0
                         ? (std::any_of(plan.params.begin(), plan.params.end(),
                                        [](const ParamEntry& p) { return p.row_words_offset != 0; })
                                ? "none per element (the tables' row words: below)"
                                : "none (plain SGD)")
                         : (arrays_least == arrays_most ? std::to_string(arrays_most)
                                                        : std::to_string(arrays_least) + " to " + std::to_string(arrays_most)) +
                               (arrays_most == 1 ? " array" : " arrays") +
                               (arrays_least == arrays_most ? "" : " per parameter (by its optimizer),") +
                               (plan.state_dtype == StateDType::bf16 ? " of bf16, 2 bytes per element"
                                                                     : " of float32, 4 bytes per element")});
  std::uint64_t row_words = 0, word_rows = 0;  // lazy Adam, row-wise AdaGrad on tables: 8 bytes per row
  std::string word_kinds;
  for (const auto& p : plan.params)
    if (p.row_words_offset != 0) {
      row_words += p.shape[0] * sizeof(std::uint64_t);
      word_rows += p.shape[0];
      const std::string_view what = p.optimizer.kind == OptimizerKind::adam ? "lazy Adam's step count" : "row-wise AdaGrad's accumulator";
      if (word_kinds.find(what) == std::string::npos) word_kinds += (word_kinds.empty() ? "" : ", ") + std::string(what);
    }
  if (row_words != 0)
    m.parts.push_back({"table row words", row_words,
                       std::to_string(word_rows) + " rows x 8 B: " + word_kinds + " per table row"});
  std::uint64_t key_bytes = 0, key_slots = 0, key_buckets = 0;  // tables with keys = "u64"
  for (const auto& p : plan.params)
    if (p.key_slots_offset != 0) {
      key_bytes += p.shape[0] * sizeof(KeySlot) + sizeof(KeyIndexHeader) + p.key_buckets * sizeof(KeyBucket);
      key_slots += p.shape[0];
      key_buckets += p.key_buckets;
    }
  if (key_bytes != 0)
    m.parts.push_back({"table keys", key_bytes,
                       std::to_string(key_slots) + " slots x " + std::to_string(sizeof(KeySlot)) + " B (key, stamp) and " +
                           std::to_string(key_buckets) + " index buckets x " + std::to_string(sizeof(KeyBucket)) +
                           " B (at least twice the slots): tables with keys = \"u64\""});
  if (plan.step_sums_bytes != 0)
    m.parts.push_back({"BSP step sums", plan.step_sums_bytes,
                       "one model's worth: the rings hold less than a BSP step, so its pushes stream into sums"});
  if (plan.sync_bytes != 0)
    m.parts.push_back({"server-group sync", plan.sync_bytes,
                       "group " + std::to_string(plan.server_group) + " of " + std::to_string(plan.server_groups) +
                           ": per slice its home and sequence numbers, the home's exactly-once table (" +
                           std::to_string(plan.server_groups) + " groups x 8 B per slice), and two arrays of the "
                           "values' size (the values at the last sync, the delta in flight)"});
  m.parts.push_back({"rings", rings,
                     x(plan.max_workers, human_bytes(m.ring_each_bytes)) + " (ring_bytes " + std::to_string(plan.ring_bytes) +
                         " and a " + std::to_string(sizeof(RingHeader)) + "-byte header each)"});
  m.parts.push_back({"worker slots", slots, x(plan.max_workers, std::to_string(sizeof(WorkerSlot)) + " B")});
  m.parts.push_back({"slice table", plan.applied_offset - plan.slices_offset,
                     std::to_string(plan.slice_count) + " slices x " + std::to_string(sizeof(SliceEntry)) + " B (" +
                         std::to_string(plan.slice_floats) + " floats per slice)"});
  m.parts.push_back({"exactly-once table", plan.redo_offset - plan.applied_offset,
                     std::to_string(plan.slice_count) + " slices x " + std::to_string(plan.max_workers) + " workers x 8 B"});
  m.parts.push_back({"redo log", plan.param_stats_offset - plan.redo_offset,
                     x(plan.redo_count, human_bytes(plan.redo_stride)) + " (one per server apply thread)"});
  m.parts.push_back({"metrics tables", plan.groups_offset - plan.param_stats_offset,
                     "per-parameter statistics, per-worker rejected counts"});
  m.parts.push_back({"group table", plan.slots_offset - plan.groups_offset,
                     x(plan.group_count, std::to_string(sizeof(GroupEntry)) + " B") + " (" +
                         std::to_string(plan.workers_per_group) + " workers per group)"});
  m.parts.push_back({"parameter table", plan.slices_offset - plan.params_offset,
                     x(plan.params.size(), std::to_string(sizeof(ParamEntry)) + " B")});
  m.parts.push_back({"header", plan.params_offset, "identity, policy, counters, ctl mailbox"});
  std::uint64_t counted = 0;
  for (const auto& p : m.parts) counted += p.bytes;
  m.parts.push_back({"alignment padding", plan.total_bytes >= counted ? plan.total_bytes - counted : 0,
                     "pages; 2 MiB around regions of 64 MiB or more (untouched: no memory behind it)"});
  return m;
}

std::string memory_table(const MemoryBreakdown& m) {
  std::ostringstream out;
  char line[512];
  std::snprintf(line, sizeof line, "%-20s %14s %11s  %s\n", "PART", "BYTES", "SIZE", "DETAIL");
  out << line;
  for (const auto& p : m.parts) {
    std::snprintf(line, sizeof line, "%-20s %14llu %11s  %s\n", p.name.c_str(), static_cast<unsigned long long>(p.bytes),
                  human_bytes(p.bytes).c_str(), p.detail.c_str());
    out << line;
  }
  std::snprintf(line, sizeof line, "%-20s %14llu %11s\n", "total", static_cast<unsigned long long>(m.total_bytes),
                human_bytes(m.total_bytes).c_str());
  out << line;
  std::snprintf(line, sizeof line, "%-20s %14llu %11s  %.1f%% on top of values + optimizer state\n", "overhead",
                static_cast<unsigned long long>(m.overhead_bytes()), human_bytes(m.overhead_bytes()).c_str(),
                m.overhead_percent());
  out << line;
  return out.str();
}

}  // namespace shmps::shm
