// A table job for the table tests: its spec and a whole-table pull.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <shmps/worker.hpp>

namespace shmps::test {

// "t": 512 rows of 8 (8 rows per 256-byte slice: 64 slices), and a dense "h" beside it; `dtype`:
// the table's values ("f32", "bf16", "fp16"); `table_extra`: more lines of the [[table]] (its own
// optimizer).
inline std::string rows_spec(const std::string& optimizer = "kind = \"sgd\"\nlr = 1.0\n", const std::string& extra = "",
                             const std::string& dtype = "f32", const std::string& table_extra = "") {
  return "max_workers = 8\nslice_bytes = 256\n" + extra + "[optimizer]\n" + optimizer +
         "[[param]]\nname = \"h\"\nshape = [4]\n"
         "[[table]]\nname = \"t\"\nrows = 512\ndim = 8\ndtype = \"" + dtype + "\"\n" + table_extra;
}
constexpr std::uint64_t kRows = 512, kDim = 8;

// The whole table, read as worker `reader_rank`.
inline std::vector<float> pull_table(const std::string& segment, int reader_rank) {
  Worker reader(WorkerOptions{.segment = segment, .rank = reader_rank, .timeout = std::chrono::seconds(20)});
  std::vector<std::uint64_t> ids(kRows);
  for (std::uint64_t r = 0; r < kRows; ++r) ids[r] = r;
  std::vector<float> table(kRows * kDim);
  reader.pull_rows("t", ids, table);
  reader.leave();
  return table;
}

}  // namespace shmps::test
