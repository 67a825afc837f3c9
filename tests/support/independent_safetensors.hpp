// A from-scratch safetensors reader for tests only, written from the published format
// (https://github.com/huggingface/safetensors, "Format") and sharing nothing with
// server/include/shmps/server/safetensors.hpp, so that a test can check our writer against a
// second, independent reading of the bytes.
//
// The format:
//   - 8 bytes: N, an unsigned little-endian 64-bit integer, the size of the header;
//   - N bytes: the header, UTF-8 JSON starting with '{', possibly padded with trailing spaces
//     (0x20); an object whose keys are tensor names and whose values are
//     {"dtype": "F32"|..., "shape": [d0, d1, ...], "data_offsets": [begin, end]}, offsets in
//     bytes relative to the start of the byte buffer that follows the header; plus an optional
//     "__metadata__" object mapping strings to strings;
//   - the byte buffer: the tensors' little-endian, row-major data. The offsets are contiguous,
//     do not overlap and cover the buffer entirely (no holes). The reference implementation
//     pads the header so that the buffer starts at a multiple of 8 bytes.
//
// read() throws std::runtime_error for anything that breaks the per-tensor rules (bad length,
// bad JSON, unknown dtype, a byte range that is not shape x dtype size or is out of the
// buffer, duplicate names). The file-wide layout (contiguity, full coverage, 8-byte alignment)
// is left to the test to check on the exposed fields, so that it can say which rule failed.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace shmps::test::independent_safetensors {

struct Tensor {
  std::string name;
  std::string dtype;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0;  // data_offsets, relative to the start of the byte buffer
  std::uint64_t end = 0;
};

// Bytes per element of each dtype the format defines; 0 for an unknown dtype.
inline std::uint64_t dtype_size(const std::string& dtype) {
  static const std::map<std::string, std::uint64_t> sizes{
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
      {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"I64", 8},     {"U64", 8}, {"F64", 8}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

struct File {
  std::string bytes;        // the whole file
  std::uint64_t header_len = 0;  // N
  std::string header;       // the N header bytes, padding included
  std::vector<Tensor> tensors;  // sorted by name (as nlohmann::json keeps them)
  std::map<std::string, std::string> metadata;

  std::uint64_t data_start() const { return 8 + header_len; }
  std::uint64_t data_size() const { return bytes.size() - data_start(); }

  const Tensor& tensor(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.name == name) return t;
    throw std::runtime_error("no tensor '" + name + "'");
  }

  // The tensors sorted by where their bytes begin.
  std::vector<Tensor> by_offset() const {
    std::vector<Tensor> out = tensors;
    std::sort(out.begin(), out.end(), [](const Tensor& a, const Tensor& b) { return a.begin < b.begin; });
    return out;
  }

  // An F32 tensor's elements, decoded from little-endian whatever the host's byte order.
  std::vector<float> f32(const std::string& name) const {
    const Tensor& t = tensor(name);
    if (t.dtype != "F32") throw std::runtime_error("'" + name + "' is " + t.dtype + ", not F32");
    std::vector<float> out((t.end - t.begin) / 4);
    const auto* p = reinterpret_cast<const unsigned char*>(bytes.data()) + data_start() + t.begin;
    for (std::size_t i = 0; i < out.size(); ++i) {
      const std::uint32_t u = std::uint32_t{p[4 * i]} | std::uint32_t{p[4 * i + 1]} << 8 |
                              std::uint32_t{p[4 * i + 2]} << 16 | std::uint32_t{p[4 * i + 3]} << 24;
      out[i] = std::bit_cast<float>(u);
    }
    return out;
  }
};

inline File parse(std::string bytes) {
  using nlohmann::json;
  auto fail = [](const std::string& why) { throw std::runtime_error("safetensors: " + why); };
  File f;
  f.bytes = std::move(bytes);
  if (f.bytes.size() < 8) fail("shorter than the 8-byte header length");
  const auto* u = reinterpret_cast<const unsigned char*>(f.bytes.data());
  for (int i = 7; i >= 0; --i) f.header_len = f.header_len << 8 | u[i];
  if (f.header_len > f.bytes.size() - 8)
    fail("header length " + std::to_string(f.header_len) + " runs past the end of the file (" +
         std::to_string(f.bytes.size()) + " bytes)");
  f.header = f.bytes.substr(8, f.header_len);
  if (f.header.empty() || f.header[0] != '{') fail("the header does not start with '{'");
  const auto last = f.header.find_last_not_of(' ');
  if (last == std::string::npos || f.header[last] != '}') fail("the header is not a JSON object padded with spaces");

  // Top-level keys, to refuse duplicates (a JSON object keeps only one of them).
  std::set<std::string> keys;
  bool duplicate = false;
  const json::parser_callback_t cb = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && !keys.insert(parsed.get<std::string>()).second)
      duplicate = true;
    return true;
  };
  json header;
  try {
    header = json::parse(f.header, cb);
  } catch (const json::exception& e) {
    fail(std::string("the header is not valid JSON: ") + e.what());
  }
  if (duplicate) fail("the header names a tensor twice");
  if (!header.is_object()) fail("the header is not a JSON object");

  const std::uint64_t data_size = f.data_size();
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) fail("__metadata__ is not an object");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) fail("__metadata__." + k + " is not a string");
        f.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    if (!value.is_object()) fail("'" + name + "' is not an object");
    for (const auto& [k, v] : value.items()) {
      (void)v;
      if (k != "dtype" && k != "shape" && k != "data_offsets") fail("'" + name + "' has an unknown field '" + k + "'");
    }
    Tensor t;
    t.name = name;
    if (!value.contains("dtype") || !value["dtype"].is_string()) fail("'" + name + "' has no dtype string");
    t.dtype = value["dtype"].get<std::string>();
    const std::uint64_t elem = dtype_size(t.dtype);
    if (elem == 0) fail("'" + name + "' has an unknown dtype '" + t.dtype + "'");
    if (!value.contains("shape") || !value["shape"].is_array()) fail("'" + name + "' has no shape array");
    std::uint64_t count = 1;
    for (const auto& d : value["shape"]) {
      if (!d.is_number_unsigned()) fail("'" + name + "' has a shape entry that is not an unsigned integer");
      t.shape.push_back(d.get<std::uint64_t>());
      count *= t.shape.back();
    }
    const auto& off = value.contains("data_offsets") ? value["data_offsets"] : json();
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail("'" + name + "' has no data_offsets [begin, end]");
    t.begin = off[0].get<std::uint64_t>();
    t.end = off[1].get<std::uint64_t>();
    if (t.begin > t.end || t.end > data_size)
      fail("'" + name + "' has data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
           "] outside the " + std::to_string(data_size) + "-byte buffer");
    if (t.end - t.begin != count * elem)
      fail("'" + name + "' spans " + std::to_string(t.end - t.begin) + " bytes, its shape and dtype need " +
           std::to_string(count * elem));
    f.tensors.push_back(std::move(t));
  }
  return f;
}

inline File read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("safetensors: cannot open " + path);
  return parse(std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()));
}

}  // namespace shmps::test::independent_safetensors
