// Pretrained initialisation: load_pretrained reads the tensors a spec names from safetensors
// files bit-exactly, and rejects a missing tensor, a wrong shape or dtype, and a damaged file
// with a message naming the parameter, the file and the problem.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "shmps/error.hpp"
#include "shmps/server/initialise.hpp"
#include "shmps/server/model_spec.hpp"
#include "shmps/server/safetensors.hpp"

namespace {

namespace fs = std::filesystem;
namespace st = shmps::server::safetensors;
using shmps::server::initialise;
using shmps::server::InitSpec;
using shmps::server::load_model_spec;
using shmps::server::load_pretrained;
using shmps::server::ModelSpec;
using shmps::server::parse_model_spec;
using shmps::server::PretrainedValues;
using ::testing::HasSubstr;
using ::testing::Not;

template <typename T>
std::span<const std::byte> bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

// Values with awkward bit patterns: signed zero, denormals, extremes, non-round numbers.
std::vector<float> awkward_values(std::size_t n, std::uint32_t seed) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    switch (i % 5) {
      case 0: v[i] = -0.0f; break;
      case 1: v[i] = std::numeric_limits<float>::denorm_min() * static_cast<float>(i + seed); break;
      case 2: v[i] = std::numeric_limits<float>::max() / static_cast<float>(i + 1); break;
      case 3: v[i] = 1.0f / 3.0f + static_cast<float>(seed); break;
      default: v[i] = -std::ldexp(1.0f, -126 + static_cast<int>(i % 50)); break;
    }
  }
  return v;
}

class PretrainedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string templ = (fs::temp_directory_path() / "shmps-pretrained-XXXXXX").string();
    ASSERT_NE(::mkdtemp(templ.data()), nullptr);
    dir_ = templ;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // A spec with one parameter per (name, shape, init) line, parsed with dir_ as its directory.
  ModelSpec spec(const std::string& params) const {
    const fs::path path = dir_ / "spec.toml";
    {
      std::ofstream out(path);
      out << "name = \"m\"\n[optimizer]\nlr = 0.1\n" << params;
    }
    return load_model_spec(path);
  }

  // The message of the shmps::Error that load_pretrained(s) throws ("" and a failure if none).
  static std::string load_error(const ModelSpec& s) {
    try {
      load_pretrained(s);
    } catch (const shmps::Error& e) {
      return e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not a shmps::Error: " << e.what();
      return {};
    }
    ADD_FAILURE() << "no error";
    return {};
  }

  // A valid file with one F32 tensor "w" of shape [2, 3].
  fs::path good_file(const std::string& name) const {
    const fs::path p = dir_ / name;
    st::write_file(p, {{"w", "F32", {2, 3}, bytes_of(w_)}}, {});
    return p;
  }

  std::vector<std::byte> slurp(const fs::path& p) const {
    std::ifstream in(p, std::ios::binary);
    std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> out(c.size());
    if (!c.empty()) std::memcpy(out.data(), c.data(), c.size());
    return out;
  }
  void spit(const fs::path& p, const std::vector<std::byte>& b) const {
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  }

  static constexpr std::string_view kParamW =
      "[[param]]\nname = \"w\"\nshape = [2, 3]\ninit = { kind = \"pretrained\", file = \"w.safetensors\" }\n";

  fs::path dir_;
  std::vector<float> w_{1.5f, -2.25f, 0.0f, -0.0f, 3.0e-38f, 7.0f};
};

void expect_bits_equal(std::span<const float> got, std::span<const float> want) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(std::bit_cast<std::uint32_t>(got[i]), std::bit_cast<std::uint32_t>(want[i])) << "element " << i;
  }
}

TEST_F(PretrainedTest, ValuesAreLoadedBitExactly) {
  const std::vector<float> a = awkward_values(12 * 7, 1);
  const std::vector<float> b = awkward_values(5, 2);
  const std::vector<double> unused{1.0, 2.0};
  st::write_file(dir_ / "model.safetensors",
                 {{"enc.a", "F32", {12, 7}, bytes_of(a)},
                  {"b", "F32", {5}, bytes_of(b)},
                  {"other", "F64", {2}, bytes_of(unused)}},
                 {{"format", "pt"}});
  const ModelSpec s = spec(
      "[[param]]\nname = \"enc.a\"\nshape = [12, 7]\ninit = { kind = \"pretrained\", file = \"model.safetensors\" }\n"
      "[[param]]\nname = \"z\"\nshape = [3]\ninit = { kind = \"constant\", value = 2 }\n"
      "[[param]]\nname = \"b\"\nshape = [5]\ninit = { kind = \"pretrained\", file = \"model.safetensors\" }\n");
  const PretrainedValues pv = load_pretrained(s);
  ASSERT_EQ(pv.by_param.size(), 2u);
  expect_bits_equal(pv.by_param.at("enc.a"), a);
  expect_bits_equal(pv.by_param.at("b"), b);

  // initialise copies them into the parameter; other kinds work as before.
  std::vector<float> values(a.size(), 99.0f);
  initialise(s.params[0], values, pv);
  expect_bits_equal(values, a);
  std::vector<float> z(3);
  initialise(s.params[1], z, pv);
  EXPECT_EQ(z, (std::vector<float>{2, 2, 2}));
}

TEST_F(PretrainedTest, NoPretrainedInitsLoadsNothing) {
  const ModelSpec s = spec("[[param]]\nname = \"w\"\nshape = [2]\n");
  EXPECT_TRUE(load_pretrained(s).by_param.empty());
}

TEST_F(PretrainedTest, TensorRenamedAndFilesInSubdirectories) {
  fs::create_directories(dir_ / "weights");
  const std::vector<float> x = awkward_values(6, 3);
  st::write_file(dir_ / "weights" / "a.safetensors", {{"model.layers.0.w", "F32", {3, 2}, bytes_of(x)}}, {});
  good_file("w.safetensors");
  const ModelSpec s = spec(
      "[[param]]\nname = \"l0\"\nshape = [3, 2]\ninit = { kind = \"pretrained\", file = \"weights/a.safetensors\", "
      "tensor = \"model.layers.0.w\" }\n"
      "[[param]]\nname = \"again\"\nshape = [3, 2]\ninit = { kind = \"pretrained\", file = "
      "\"./weights/../weights/a.safetensors\", tensor = \"model.layers.0.w\" }\n"
      "[[param]]\nname = \"w\"\nshape = [2, 3]\ninit = { kind = \"pretrained\", file = \"w.safetensors\" }\n");
  const PretrainedValues pv = load_pretrained(s);
  ASSERT_EQ(pv.by_param.size(), 3u);
  expect_bits_equal(pv.by_param.at("l0"), x);
  expect_bits_equal(pv.by_param.at("again"), x);
  expect_bits_equal(pv.by_param.at("w"), w_);
}

TEST_F(PretrainedTest, MissingTensorListsWhatTheFileHas) {
  const std::vector<float> one{1.0f};
  st::write_file(dir_ / "w.safetensors",
                 {{"model.w", "F32", {2, 3}, bytes_of(w_)}, {"bias", "F32", {1}, bytes_of(one)}}, {});
  const std::string msg = load_error(spec(std::string(kParamW)));
  const std::string file = (dir_ / "w.safetensors").string();
  EXPECT_THAT(msg, HasSubstr("param \"w\": init from " + file + ": "));
  EXPECT_THAT(msg, HasSubstr("no tensor \"w\" in the file"));
  EXPECT_THAT(msg, HasSubstr("it has 2 tensors: \"model.w\", \"bias\""));
  EXPECT_THAT(msg, HasSubstr("set tensor = "));
}

TEST_F(PretrainedTest, MissingTensorInALargeFileListsTheClosest) {
  std::vector<std::vector<float>> store;
  std::vector<st::TensorView> views;
  store.reserve(20);
  for (int i = 0; i < 20; ++i) {
    store.push_back({static_cast<float>(i)});
    views.push_back({"layer" + std::to_string(i) + ".bias", "F32", {1}, bytes_of(store.back())});
  }
  st::write_file(dir_ / "w.safetensors", views, {});
  const std::string msg = load_error(
      spec("[[param]]\nname = \"p\"\nshape = [1]\ninit = { kind = \"pretrained\", file = \"w.safetensors\", tensor = "
           "\"layer7.bais\" }\n"));
  EXPECT_THAT(msg, HasSubstr("param \"p\": "));
  EXPECT_THAT(msg, HasSubstr("no tensor \"layer7.bais\" in the file; it has 20 tensors, the closest: \"layer7.bias\""));
  EXPECT_THAT(msg, Not(HasSubstr("layer19.bias")));
}

TEST_F(PretrainedTest, ShapeMismatch) {
  good_file("w.safetensors");
  const std::string file = (dir_ / "w.safetensors").string();
  EXPECT_EQ(load_error(spec("[[param]]\nname = \"w\"\nshape = [4, 3]\ninit = { kind = \"pretrained\", file = "
                            "\"w.safetensors\" }\n")),
            "param \"w\": init from " + file + ": tensor \"w\" has shape [2, 3], the spec says [4, 3]");
  EXPECT_THAT(load_error(spec("[[param]]\nname = \"w\"\nshape = [3, 2]\ninit = { kind = \"pretrained\", file = "
                              "\"w.safetensors\" }\n")),
              HasSubstr("has shape [2, 3], the spec says [3, 2] (the same number of elements, but the shape must "
                        "match exactly)"));
  EXPECT_THAT(load_error(spec("[[param]]\nname = \"w\"\nshape = [6]\ninit = { kind = \"pretrained\", file = "
                              "\"w.safetensors\" }\n")),
              HasSubstr("has shape [2, 3], the spec says [6]"));
}

TEST_F(PretrainedTest, DtypeMismatch) {
  const std::vector<double> d(6, 0.5);
  const std::vector<std::int32_t> i(6, 3);
  const std::vector<std::uint16_t> u(6, 7);
  st::write_file(dir_ / "w.safetensors",
                 {{"d", "F64", {2, 3}, bytes_of(d)}, {"i", "I32", {2, 3}, bytes_of(i)}, {"u", "U16", {2, 3}, bytes_of(u)}},
                 {});
  const std::string file = (dir_ / "w.safetensors").string();
  const std::map<std::string, std::string> dtype_of{{"d", "F64"}, {"i", "I32"}, {"u", "U16"}};
  for (const auto& [name, dtype] : dtype_of) {
    const std::string msg = load_error(spec("[[param]]\nname = \"p\"\nshape = [2, 3]\ninit = { kind = \"pretrained\", "
                                            "file = \"w.safetensors\", tensor = \"" + name + "\" }\n"));
    EXPECT_THAT(msg, HasSubstr("param \"p\": init from " + file + ": tensor \"" + name + "\" has dtype " + dtype));
    EXPECT_THAT(msg, HasSubstr("from F32, BF16 or F16 tensors only"));
  }
}

// BF16 and F16 tensors (a bf16 job's export, half-precision weights from elsewhere) are widened
// exactly, whatever the parameter's own dtype; hand-computed bit patterns.
TEST_F(PretrainedTest, HalfPrecisionTensorsAreWidenedExactly) {
  // bf16: 1.5, -2.25, 0, -0, the smallest normal (2^-126), 65280 (0x477f: 0xff << 8).
  const std::vector<std::uint16_t> bf{0x3fc0, 0xc010, 0x0000, 0x8000, 0x0080, 0x477f};
  const std::vector<float> bf_want{1.5f, -2.25f, 0.0f, -0.0f, 0x1p-126f, 65280.0f};
  // fp16: 1, -2, 0.5, the smallest subnormal (2^-24), 65504 (the largest), 0.333251953125.
  const std::vector<std::uint16_t> h{0x3c00, 0xc000, 0x3800, 0x0001, 0x7bff, 0x3555};
  const std::vector<float> h_want{1.0f, -2.0f, 0.5f, 0x1p-24f, 65504.0f, 0.333251953125f};
  st::write_file(dir_ / "w.safetensors", {{"b", "BF16", {2, 3}, bytes_of(bf)}, {"h", "F16", {2, 3}, bytes_of(h)}}, {});
  const ModelSpec s = spec(
      "[[param]]\nname = \"b\"\nshape = [2, 3]\ninit = { kind = \"pretrained\", file = \"w.safetensors\" }\n"
      "[[param]]\nname = \"h\"\nshape = [2, 3]\ndtype = \"bf16\"\n"
      "init = { kind = \"pretrained\", file = \"w.safetensors\" }\n");
  const PretrainedValues pv = load_pretrained(s);
  expect_bits_equal(pv.by_param.at("b"), bf_want);
  expect_bits_equal(pv.by_param.at("h"), h_want);

  // A NaN or an infinity in a half-precision tensor is refused as in an F32 one.
  const std::vector<std::uint16_t> nan{0x3f80, 0x3f80, 0x7fc0, 0x3f80, 0x3f80, 0x3f80};
  const std::vector<std::uint16_t> inf{0x3c00, 0xfc00, 0x3c00, 0x3c00, 0x3c00, 0x3c00};
  st::write_file(dir_ / "w.safetensors", {{"b", "BF16", {2, 3}, bytes_of(nan)}, {"h", "F16", {2, 3}, bytes_of(inf)}}, {});
  EXPECT_THAT(load_error(s), HasSubstr("tensor \"b\" holds NaN at element 2"));
  st::write_file(dir_ / "w.safetensors", {{"b", "BF16", {2, 3}, bytes_of(bf)}, {"h", "F16", {2, 3}, bytes_of(inf)}}, {});
  EXPECT_THAT(load_error(s), HasSubstr("tensor \"h\" holds an infinity at element 1"));
}

TEST_F(PretrainedTest, NonFiniteValues) {
  std::vector<float> bad = w_;
  bad[4] = std::numeric_limits<float>::quiet_NaN();
  st::write_file(dir_ / "w.safetensors", {{"w", "F32", {2, 3}, bytes_of(bad)}}, {});
  EXPECT_THAT(load_error(spec(std::string(kParamW))), HasSubstr("tensor \"w\" holds NaN at element 4"));
  bad[4] = 1.0f;
  bad[1] = -std::numeric_limits<float>::infinity();
  st::write_file(dir_ / "w.safetensors", {{"w", "F32", {2, 3}, bytes_of(bad)}}, {});
  EXPECT_THAT(load_error(spec(std::string(kParamW))), HasSubstr("tensor \"w\" holds an infinity at element 1"));
}

TEST_F(PretrainedTest, TruncatedFile) {
  const fs::path p = good_file("w.safetensors");
  std::vector<std::byte> bytes = slurp(p);
  bytes.resize(bytes.size() - 5);
  spit(p, bytes);
  const std::string msg = load_error(spec(std::string(kParamW)));
  EXPECT_THAT(msg, HasSubstr("param \"w\": init from " + p.string() + ": "));
  // The reader's own problem, without the path said twice.
  EXPECT_THAT(msg, HasSubstr("tensor 'w': data_offsets [0, 24] out of range"));
  EXPECT_THAT(msg, Not(HasSubstr(p.string() + ": " + p.string())));

  bytes.resize(20);  // cut inside the header
  spit(p, bytes);
  EXPECT_THAT(load_error(spec(std::string(kParamW))),
              HasSubstr("param \"w\": init from " + p.string() + ": truncated file"));
}

TEST_F(PretrainedTest, NotASafetensorsFile) {
  {
    std::ofstream out(dir_ / "w.safetensors");
    out << "PK\x03\x04 this is a zip file, not safetensors, and long enough to have a length";
  }
  EXPECT_THAT(load_error(spec(std::string(kParamW))),
              HasSubstr("param \"w\": init from " + (dir_ / "w.safetensors").string() + ": not a safetensors file"));
}

TEST_F(PretrainedTest, WrongChecksum) {
  const fs::path p = good_file("w.safetensors");
  std::vector<std::byte> bytes = slurp(p);
  bytes.back() ^= std::byte{0x01};  // one bit of the last value
  spit(p, bytes);
  const std::string msg = load_error(spec(std::string(kParamW)));
  EXPECT_THAT(msg, HasSubstr("param \"w\": init from " + p.string() + ": checksum mismatch"));
  EXPECT_THAT(msg, HasSubstr("the file is damaged"));
}

TEST_F(PretrainedTest, MissingFile) {
  const std::string msg = load_error(spec(std::string(kParamW)));
  EXPECT_THAT(msg, HasSubstr("param \"w\": init from " + (dir_ / "w.safetensors").string() + ": "));
  EXPECT_THAT(msg, HasSubstr("No such file"));
}

TEST_F(PretrainedTest, TheFirstParamOfABadFileIsNamed) {
  const std::vector<float> one{1.0f};
  st::write_file(dir_ / "a.safetensors", {{"x", "F32", {1}, bytes_of(one)}}, {});
  {
    std::ofstream out(dir_ / "b.safetensors");
    out << "garbage garbage garbage";
  }
  const std::string msg = load_error(
      spec("[[param]]\nname = \"x\"\nshape = [1]\ninit = { kind = \"pretrained\", file = \"a.safetensors\" }\n"
           "[[param]]\nname = \"y\"\nshape = [1]\ninit = { kind = \"pretrained\", file = \"b.safetensors\" }\n"
           "[[param]]\nname = \"z\"\nshape = [1]\ninit = { kind = \"pretrained\", file = \"b.safetensors\" }\n"));
  EXPECT_THAT(msg, HasSubstr("param \"y\": init from " + (dir_ / "b.safetensors").string() + ": not a safetensors"));
}

TEST_F(PretrainedTest, InitialiseWithoutLoadedValuesThrows) {
  good_file("w.safetensors");
  const ModelSpec s = spec(std::string(kParamW));
  std::vector<float> values(6);
  EXPECT_THROW(initialise(s.params[0], values, PretrainedValues{}), shmps::Error);
  EXPECT_THROW(initialise(s.params[0].init, values), shmps::Error);
  PretrainedValues wrong;
  wrong.by_param["w"] = {1.0f};
  try {
    initialise(s.params[0], values, wrong);
    ADD_FAILURE() << "no error";
  } catch (const shmps::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("param \"w\": "));
  }
  EXPECT_EQ(shmps::server::initial_value(s.params[0].init, 0), 0.0f);
}

TEST_F(PretrainedTest, SpecParsedFromAStringIsRelativeToTheCurrentDirectory) {
  const ModelSpec s = parse_model_spec(
      "name = \"m\"\n[optimizer]\nlr = 0.1\n" + std::string(kParamW), "<test>");
  EXPECT_EQ(s.params[0].init.file, fs::path("w.safetensors"));
  const fs::path old = fs::current_path();
  good_file("w.safetensors");
  fs::current_path(dir_);
  PretrainedValues pv;
  EXPECT_NO_THROW(pv = load_pretrained(s));
  fs::current_path(old);
  ASSERT_EQ(pv.by_param.count("w"), 1u);
  expect_bits_equal(pv.by_param.at("w"), w_);
}

}  // namespace
