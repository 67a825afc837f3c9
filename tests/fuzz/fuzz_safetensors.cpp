// Fuzz target safetensors: feeds the bytes as a whole file to safetensors::File::read, the reader
// of checkpoints, pretrained weights and multi-host checkpoint parts (8-byte header length, JSON
// header: dtypes, shapes, data_offsets, __metadata__, the shmps.checksum).
// Checks: it returns a File or throws shmps::Error, nothing else; in a File it accepts, every
// tensor has a known dtype, its bytes lie inside the data section and number exactly
// product(shape) * dtype size, the tensors do not overlap and cover the data section, and
// f32() of an F32 tensor gives product(shape) floats.
#include <cstdint>
#include <optional>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/server/safetensors.hpp>

#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace st = shmps::server::safetensors;
  static const std::filesystem::path path = shmps::fuzz::scratch_dir("safetensors") / "input.safetensors";
  shmps::fuzz::write_file(path, data, size);
  std::optional<st::File> file;
  try {
    file.emplace(st::File::read(path));
  } catch (const shmps::Error& e) {
    SHMPS_FUZZ_CHECK(e.what()[0] != '\0');
    return 0;
  }
  const std::span<const std::byte> all = file->data();
  std::uint64_t covered = 0;
  for (const auto& [name, t] : file->tensors()) {
    const std::size_t esize = st::dtype_size(t.dtype);
    SHMPS_FUZZ_CHECK(esize != 0);
    SHMPS_FUZZ_CHECK(t.begin <= t.end && t.end <= all.size());
    std::uint64_t n = 1;
    for (std::uint64_t d : t.shape) n *= d;
    SHMPS_FUZZ_CHECK(n * esize == t.end - t.begin);
    const std::span<const std::byte> bytes = file->data(t);
    SHMPS_FUZZ_CHECK(bytes.size() == t.end - t.begin);
    SHMPS_FUZZ_CHECK(bytes.empty() || bytes.data() == all.data() + t.begin);
    covered += t.end - t.begin;
    if (t.dtype == "F32") {
      const std::vector<float> v = file->f32(name, t.shape);
      SHMPS_FUZZ_CHECK(v.size() == n);
    }
  }
  SHMPS_FUZZ_CHECK(covered == all.size());  // no overlap, no gap (they tile the data section)
  return 0;
}
