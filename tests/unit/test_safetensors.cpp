// safetensors: round trips are bit-exact, the layout is what the format says (checked by an
// independent minimal parser), every kind of damaged file is rejected with "<path>: <problem>",
// and writes are atomic (a failed write leaves the old file; no temporary file is left behind).
#include <gtest/gtest.h>
#include <gmock/gmock.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "shmps/error.hpp"
#include "shmps/server/safetensors.hpp"

// GCC 12 reports false -Wmaybe-uninitialized inside its own AVX-512 intrinsics once xxHash's
// vector code is inlined (GCC bug 105593), as with Eigen in optimizer.cpp.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define XXH_INLINE_ALL
#include <xxhash.h>

namespace {

namespace fs = std::filesystem;
namespace st = shmps::server::safetensors;
using nlohmann::json;
using ::testing::HasSubstr;

template <typename T>
std::span<const std::byte> bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

std::vector<std::byte> slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(c.size());
  if (!c.empty()) std::memcpy(out.data(), c.data(), c.size());
  return out;
}

void spit(const fs::path& p, const std::vector<std::byte>& b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// A raw file: the 8-byte length of `header`, `header`, then `data`.
std::vector<std::byte> raw_file(const std::string& header, const std::vector<std::byte>& data) {
  std::vector<std::byte> out(8);
  const std::uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  for (char c : header) out.push_back(static_cast<std::byte>(c));
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string templ = (fs::temp_directory_path() / "shmps-st-XXXXXX").string();
    ASSERT_NE(::mkdtemp(templ.data()), nullptr);
    dir_ = templ;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // The message of the shmps::Error that reading `p` throws ("" if it does not throw).
  static std::string read_error(const fs::path& p) {
    try {
      st::File::read(p);
    } catch (const shmps::Error& e) {
      return e.what();
    }
    return "";
  }

  // Writes `bytes` to a file named `name` and expects reading it to fail with `problem`.
  void expect_rejected(const std::string& name, const std::vector<std::byte>& bytes, const std::string& problem) {
    const fs::path p = dir_ / name;
    spit(p, bytes);
    const std::string msg = read_error(p);
    EXPECT_THAT(msg, HasSubstr(p.string() + ": ")) << name;
    EXPECT_THAT(msg, HasSubstr(problem)) << name;
  }

  fs::path dir_;
};

// Several tensors of several dtypes and ranks, with metadata.
struct Sample {
  std::vector<float> w{1.5f, -2.25f, 0.0f, -0.0f, std::numeric_limits<float>::infinity(), 3.0e-38f};  // 2x3
  std::vector<double> d{3.141592653589793, -1e300};                                                // 2
  std::vector<std::int64_t> i64{std::numeric_limits<std::int64_t>::min()};                         // 0-d
  std::vector<std::int32_t> i32{7, -8, 9, 2147483647};                                             // 4x1
  std::vector<std::uint8_t> u8{0, 1, 2, 255, 128};                                                 // 5
  std::vector<std::uint16_t> bf16{0x3f80, 0xbf80, 0x7fc0};                                         // 3
  std::vector<std::uint16_t> f16{0x3c00};                                                          // 1x1
  std::vector<float> empty;                                                                         // 0x4

  std::vector<st::TensorView> views() const {
    return {
        {"layer1.weight", "F32", {2, 3}, bytes_of(w)},
        {"d", "F64", {2}, bytes_of(d)},
        {"scalar", "I64", {}, bytes_of(i64)},
        {"ints", "I32", {4, 1}, bytes_of(i32)},
        {"bytes", "U8", {5}, bytes_of(u8)},
        {"bf", "BF16", {3}, bytes_of(bf16)},
        {"half", "F16", {1, 1}, bytes_of(f16)},
        {"empty", "F32", {0, 4}, bytes_of(empty)},
    };
  }
  std::map<std::string, std::string> metadata() const {
    return {{"format", "pt"}, {"step", "1234"}, {"unicode", "\xc3\xa9t\xc3\xa9"}};
  }
};

TEST_F(SafetensorsTest, RoundTripIsBitExact) {
  const Sample s;
  const fs::path p = dir_ / "model.safetensors";
  st::write_file(p, s.views(), s.metadata());
  const st::File f = st::File::read(p);

  ASSERT_EQ(f.tensors().size(), s.views().size());
  for (const st::TensorView& v : s.views()) {
    SCOPED_TRACE(v.name);
    auto it = f.tensors().find(v.name);
    ASSERT_NE(it, f.tensors().end());
    EXPECT_EQ(it->second.dtype, v.dtype);
    EXPECT_EQ(it->second.shape, v.shape);
    const std::span<const std::byte> got = f.data(it->second);
    ASSERT_EQ(got.size(), v.data.size());
    EXPECT_TRUE(std::equal(got.begin(), got.end(), v.data.begin(), v.data.end()));  // memcmp: UB on an empty tensor
  }
  for (const auto& [k, v] : s.metadata()) EXPECT_EQ(f.metadata().at(k), v);
  EXPECT_EQ(f.metadata().at("shmps.checksum").size(), 5u + 16u);  // "xxh3:" + 16 hex digits
  EXPECT_EQ(f.metadata().size(), s.metadata().size() + 1);

  const std::vector<float> w = f.f32("layer1.weight", {2, 3});
  ASSERT_EQ(w.size(), s.w.size());
  for (std::size_t i = 0; i < w.size(); ++i) {
    EXPECT_EQ(std::bit_cast<std::uint32_t>(w[i]), std::bit_cast<std::uint32_t>(s.w[i])) << i;
  }
  EXPECT_TRUE(f.f32("empty", {0, 4}).empty());
}

TEST_F(SafetensorsTest, EmptyFileAndRewriteRoundTrip) {
  const fs::path p = dir_ / "empty.safetensors";
  st::write_file(p, {}, {});
  const st::File f = st::File::read(p);
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_TRUE(f.data().empty());
  // Writing read metadata back (it holds shmps.checksum) replaces the checksum.
  const Sample s;
  st::write_file(p, s.views(), f.metadata());
  EXPECT_EQ(st::File::read(p).tensors().size(), s.views().size());
}

TEST_F(SafetensorsTest, DataSectionIsEightByteAligned) {
  // Names of every length 1..16 push the header length through all residues mod 8.
  for (int len = 1; len <= 16; ++len) {
    const std::vector<float> v{1.0f};
    std::string file = "a";  // (not "a" + std::string: a GCC 12 -Wrestrict false positive)
    file += std::to_string(len);
    file += ".safetensors";
    const fs::path p = dir_ / file;
    st::write_file(p, {{std::string(static_cast<std::size_t>(len), 'x'), "F32", {1}, bytes_of(v)}}, {});
    const std::vector<std::byte> b = slurp(p);
    std::uint64_t n = 0;
    std::memcpy(&n, b.data(), 8);
    EXPECT_EQ((8 + n) % 8, 0u) << len;
    EXPECT_EQ(b.size(), 8 + n + 4) << len;
    // The padding is spaces after the JSON.
    const std::string header(reinterpret_cast<const char*>(b.data() + 8), n);
    EXPECT_EQ(header.front(), '{');
    EXPECT_EQ(header.find_last_not_of(' '), header.rfind('}'));
  }
}

// A minimal parser written independently of the module, following the published format.
TEST_F(SafetensorsTest, IndependentParserAgrees) {
  const Sample s;
  const fs::path p = dir_ / "model.safetensors";
  st::write_file(p, s.views(), s.metadata());
  const std::vector<std::byte> b = slurp(p);
  ASSERT_GE(b.size(), 8u);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint64_t>(b[static_cast<std::size_t>(i)]);
  ASSERT_LE(8 + n, b.size());
  const json h = json::parse(reinterpret_cast<const char*>(b.data() + 8), reinterpret_cast<const char*>(b.data() + 8 + n));
  const std::size_t data_start = static_cast<std::size_t>(8 + n);
  const std::uint64_t data_size = b.size() - data_start;

  ASSERT_TRUE(h.contains("__metadata__"));
  for (const auto& [k, v] : s.metadata()) EXPECT_EQ(h["__metadata__"][k].get<std::string>(), v);
  // XXH3 64 of the data section, recomputed here with xxHash itself.
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx",
                static_cast<unsigned long long>(XXH3_64bits(b.data() + data_start, b.size() - data_start)));
  EXPECT_EQ(h["__metadata__"]["shmps.checksum"].get<std::string>(), std::string("xxh3:") + hex);

  const std::map<std::string, std::uint64_t> sizes{{"F32", 4}, {"F64", 8}, {"I64", 8}, {"I32", 4},
                                                   {"U8", 1},  {"BF16", 2}, {"F16", 2}};
  ASSERT_EQ(h.size(), s.views().size() + 1);
  std::uint64_t covered = 0;
  for (const st::TensorView& v : s.views()) {
    SCOPED_TRACE(v.name);
    ASSERT_TRUE(h.contains(v.name));
    const json& e = h[v.name];
    EXPECT_EQ(e["dtype"].get<std::string>(), v.dtype);
    EXPECT_EQ(e["shape"].get<std::vector<std::uint64_t>>(), v.shape);
    const auto offs = e["data_offsets"].get<std::vector<std::uint64_t>>();
    ASSERT_EQ(offs.size(), 2u);
    ASSERT_LE(offs[0], offs[1]);
    ASSERT_LE(offs[1], data_size);
    std::uint64_t count = 1;
    for (std::uint64_t d : v.shape) count *= d;
    EXPECT_EQ(offs[1] - offs[0], count * sizes.at(v.dtype));
    covered += offs[1] - offs[0];
    ASSERT_EQ(offs[1] - offs[0], v.data.size());
    const auto* stored = reinterpret_cast<const std::byte*>(b.data()) + data_start + offs[0];
    EXPECT_TRUE(std::equal(v.data.begin(), v.data.end(), stored));
  }
  EXPECT_EQ(covered, data_size);
  // Little-endian values: the first float of layer1.weight is 1.5f = 0x3fc00000.
  const auto w0 = h["layer1.weight"]["data_offsets"][0].get<std::size_t>();
  EXPECT_EQ(b[data_start + w0 + 3], std::byte{0x3f});
  EXPECT_EQ(b[data_start + w0 + 2], std::byte{0xc0});
}

TEST_F(SafetensorsTest, F32ChecksDtypeShapeAndName) {
  const Sample s;
  const fs::path p = dir_ / "model.safetensors";
  st::write_file(p, s.views(), s.metadata());
  const st::File f = st::File::read(p);
  auto msg = [&](auto fn) -> std::string {
    try {
      fn();
    } catch (const shmps::Error& e) {
      return e.what();
    }
    return "";
  };
  std::string m = msg([&] { f.f32("layer1.weight", {3, 2}); });
  EXPECT_THAT(m, HasSubstr(p.string()));
  EXPECT_THAT(m, HasSubstr("'layer1.weight'"));
  EXPECT_THAT(m, HasSubstr("expected shape [3, 2], found [2, 3]"));
  m = msg([&] { f.f32("d", {2}); });
  EXPECT_THAT(m, HasSubstr("'d'"));
  EXPECT_THAT(m, HasSubstr("expected dtype F32, found F64"));
  m = msg([&] { f.f32("nope", {1}); });
  EXPECT_THAT(m, HasSubstr(p.string()));
  EXPECT_THAT(m, HasSubstr("'nope' not found"));
}

TEST_F(SafetensorsTest, WriterRejectsBadInput) {
  const std::vector<float> v{1.0f, 2.0f};
  const fs::path p = dir_ / "bad.safetensors";
  auto msg = [&](const std::vector<st::TensorView>& t) -> std::string {
    try {
      st::write_file(p, t, {});
    } catch (const shmps::Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_THAT(msg({{"a", "F32", {3}, bytes_of(v)}}), HasSubstr(p.string() + ": tensor 'a': shape [3] of F32 needs 12"));
  EXPECT_THAT(msg({{"a", "F99", {2}, bytes_of(v)}}), HasSubstr("unknown dtype \"F99\""));
  EXPECT_THAT(msg({{"a", "F32", {2}, bytes_of(v)}, {"a", "F32", {2}, bytes_of(v)}}), HasSubstr("given twice"));
  EXPECT_THAT(msg({{"__metadata__", "F32", {2}, bytes_of(v)}}), HasSubstr("reserved"));
  EXPECT_FALSE(fs::exists(p));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 0);
}

TEST_F(SafetensorsTest, DamagedFilesAreRejected) {
  const std::vector<float> v{1.0f, 2.0f, 3.0f};  // 12 bytes
  std::vector<std::byte> d12(12);
  std::memcpy(d12.data(), v.data(), 12);

  expect_rejected("short.safetensors", {std::byte{1}, std::byte{0}, std::byte{0}}, "truncated file");
  expect_rejected("empty.safetensors", {}, "truncated file");
  {  // header length within the file size, but past its end
    std::vector<std::byte> b = raw_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})", d12);
    b.resize(8 + 40);
    expect_rejected("cut-header.safetensors", b, "truncated file");
  }
  {  // absurd lengths
    std::vector<std::byte> b = raw_file("{}", {});
    const std::uint64_t big = 200'000'000;
    std::memcpy(b.data(), &big, 8);
    expect_rejected("huge.safetensors", b, "not a safetensors file");
    std::vector<std::byte> png(64, std::byte{0});
    const char magic[] = "\x89PNG\r\n\x1a\n";
    std::memcpy(png.data(), magic, 8);
    expect_rejected("image.png", png, "not a safetensors file");
    // A small length past the end of the file, with no JSON after it.
    std::vector<std::byte> text = raw_file("hello", {});
    const std::uint64_t small = 100;
    std::memcpy(text.data(), &small, 8);
    expect_rejected("text.safetensors", text, "not a safetensors file");
  }
  expect_rejected("badjson.safetensors", raw_file(R"({"a": {"dtype": "F32",)", {}), "header JSON does not parse");
  expect_rejected("array.safetensors", raw_file("[1, 2]", {}), "not an object");
  expect_rejected("no-dtype.safetensors", raw_file(R"({"a":{"shape":[3],"data_offsets":[0,12]}})", d12),
                  "tensor 'a': missing \"dtype\"");
  expect_rejected("no-shape.safetensors", raw_file(R"({"a":{"dtype":"F32","data_offsets":[0,12]}})", d12),
                  "tensor 'a': missing \"shape\"");
  expect_rejected("no-offsets.safetensors", raw_file(R"({"a":{"dtype":"F32","shape":[3]}})", d12),
                  "tensor 'a': missing \"data_offsets\"");
  expect_rejected("dtype.safetensors", raw_file(R"({"a":{"dtype":"F33","shape":[3],"data_offsets":[0,12]}})", d12),
                  "tensor 'a': unknown dtype \"F33\"");
  expect_rejected("shape.safetensors", raw_file(R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", d12),
                  "tensor 'a': shape [2, 2] of F32 needs 16 bytes, but data_offsets [0, 12] give 12");
  expect_rejected("neg.safetensors", raw_file(R"({"a":{"dtype":"F32","shape":[-3],"data_offsets":[0,12]}})", d12),
                  "not a non-negative integer");
  expect_rejected("range.safetensors", raw_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", d12),
                  "tensor 'a': data_offsets [0, 16] out of range: the data section has 12 bytes");
  expect_rejected("reversed.safetensors",
                  raw_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[12,0]}})", d12), "begin is after end");
  expect_rejected("overlap.safetensors",
                  raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                           d12),
                  "tensors 'a' and 'b' overlap");
  expect_rejected("gap.safetensors",
                  raw_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                           R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                           d12),
                  "data section bytes [4, 8) are not covered");
  expect_rejected("tail.safetensors", raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", d12),
                  "tensors do not cover the data section: they end at byte 8 but the data section has 12 bytes");
  expect_rejected("meta.safetensors", raw_file(R"({"__metadata__":{"k":1}})", {}), "value of \"k\" is not a string");

  // Files written by write_file, then damaged.
  const Sample s;
  const fs::path good = dir_ / "good.safetensors";
  st::write_file(good, s.views(), s.metadata());
  const std::vector<std::byte> b = slurp(good);
  {
    std::vector<std::byte> flipped = b;
    ASSERT_GT(flipped.size(), 100u);
    flipped[flipped.size() - 5] = ~flipped[flipped.size() - 5];  // a byte of the data section
    expect_rejected("flipped.safetensors", flipped, "checksum mismatch");
  }
  {
    std::vector<std::byte> cut(b.begin(), b.end() - 3);
    expect_rejected("cut-data.safetensors", cut, "out of range");
  }
  {
    std::vector<std::byte> cut(b.begin(), b.begin() + 20);
    expect_rejected("cut-early.safetensors", cut, "truncated file");
  }
  EXPECT_THAT(read_error(dir_ / "missing.safetensors"), HasSubstr((dir_ / "missing.safetensors").string() + ": cannot open"));
}

TEST_F(SafetensorsTest, FilesWithoutChecksumAreAccepted) {
  // As written by other tools: no shmps.checksum, other metadata, tensors in any order.
  const std::vector<float> v{1.0f, 2.0f, 3.0f};
  std::vector<std::byte> d12(12);
  std::memcpy(d12.data(), v.data(), 12);
  const fs::path p = dir_ / "foreign.safetensors";
  spit(p, raw_file(R"({"__metadata__":{"format":"pt"},"z":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                   R"("a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})"
                   "   ",
                   d12));
  const st::File f = st::File::read(p);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.f32("z", {1}), std::vector<float>({1.0f}));
  EXPECT_EQ(f.f32("a", {2}), std::vector<float>({2.0f, 3.0f}));
}

TEST_F(SafetensorsTest, SuccessfulWriteLeavesNoTemporaryFile) {
  const Sample s;
  const fs::path p = dir_ / "model.safetensors";
  st::write_file(p, s.views(), s.metadata());
  st::write_file(p, s.views(), {});  // overwrite
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir_)) names.push_back(e.path().filename().string());
  EXPECT_EQ(names, std::vector<std::string>{"model.safetensors"});
  EXPECT_FALSE(fs::exists(p.string() + ".tmp-" + std::to_string(::getpid())));
}

TEST_F(SafetensorsTest, FailedWriteLeavesExistingFileIntact) {
  const Sample s;
  const fs::path p = dir_ / "model.safetensors";
  st::write_file(p, s.views(), s.metadata());
  const std::vector<std::byte> before = slurp(p);
  const std::vector<float> other{9.0f};
  const std::vector<st::TensorView> replacement{{"x", "F32", {1}, bytes_of(other)}};

  // 1. Into a directory that does not exist.
  const fs::path nowhere = dir_ / "no-such-dir" / "model.safetensors";
  try {
    st::write_file(nowhere, replacement, {});
    ADD_FAILURE() << "no error";
  } catch (const shmps::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(nowhere.string() + ": cannot create"));
  }

  // 2. Next to the existing file, with the temporary file's name taken by a directory (works
  //    as root too, unlike read-only permissions).
  const fs::path tmp = p.string() + ".tmp-" + std::to_string(::getpid());
  fs::create_directory(tmp);
  try {
    st::write_file(p, replacement, {});
    ADD_FAILURE() << "no error";
  } catch (const shmps::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(p.string() + ": cannot create"));
  }
  fs::remove(tmp);
  EXPECT_EQ(slurp(p), before);

  // 3. The rename fails (the target is a non-empty directory): the temporary file is removed.
  const fs::path target_dir = dir_ / "taken.safetensors";
  fs::create_directory(target_dir);
  spit(target_dir / "keep", {std::byte{1}});
  try {
    st::write_file(target_dir, replacement, {});
    ADD_FAILURE() << "no error";
  } catch (const shmps::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(target_dir.string() + ": cannot rename"));
  }
  EXPECT_FALSE(fs::exists(target_dir.string() + ".tmp-" + std::to_string(::getpid())));
  EXPECT_TRUE(fs::exists(target_dir / "keep"));

  EXPECT_EQ(slurp(p), before);
  EXPECT_EQ(st::File::read(p).tensors().size(), s.views().size());
}

}  // namespace
