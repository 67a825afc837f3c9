// The worker and parameter tables, shared by the text view (--once) and the terminal UI: their
// columns, how each cell is written, and how a column sorts.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "metrics.hpp"

namespace shmps::top {

template <class Row>
struct Column {
  std::string title;
  bool left = false;                               // aligned left (text) or right (numbers)
  std::function<std::string(const Row&)> cell;
  std::function<double(const Row&)> key;           // numeric sort key; empty: sort by the cell's text
};

const std::vector<Column<WorkerMetrics>>& worker_columns();
const std::vector<Column<ParamMetrics>>& param_columns();

// Sorts rows by column `sort` of their table (reversed if `descending`); ties keep their order.
void sort_rows(std::vector<WorkerMetrics>& rows, std::size_t sort, bool descending);
void sort_rows(std::vector<ParamMetrics>& rows, std::size_t sort, bool descending);

// A table laid out as text, rows in the order given: the header line and one line per row, columns
// as wide as their widest cell, two spaces apart.
struct TextTable {
  std::string header;
  std::vector<std::string> lines;
};
TextTable layout(const std::vector<WorkerMetrics>& rows);
TextTable layout(const std::vector<ParamMetrics>& rows);

}  // namespace shmps::top
