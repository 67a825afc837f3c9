// A small, self-contained reader/writer for the safetensors format (Hugging Face):
//
//   [8 bytes: little-endian u64 N][N bytes: UTF-8 JSON header][data section]
//
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets
// relative to the start of the data section; the tensors are contiguous, do not overlap and
// cover the data section exactly. An optional "__metadata__" object maps strings to strings.
//
// The writer pads the JSON header with spaces so that the data section starts at a multiple of
// 8 bytes (as the reference implementation does), and records metadata "shmps.checksum":
// "xxh3:" and the XXH3 64-bit hash (xxHash) of the whole data section as 16 lowercase hex
// digits. The reader checks that checksum when it is present (files from other writers do not
// have it).
//
// Known dtypes (element size): BOOL U8 I8 (1), U16 I16 F16 BF16 (2), U32 I32 F32 (4),
// U64 I64 F64 (8). Values are stored little-endian; only little-endian hosts are supported.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace shmps::server::safetensors {

// Metadata key the writer adds (and overwrites if the caller passes it).
inline constexpr std::string_view kChecksumKey = "shmps.checksum";

// Size in bytes of one element of `dtype`, or 0 if the dtype is unknown.
std::size_t dtype_size(std::string_view dtype) noexcept;

// The checksum of a data section, as the metadata holds it: "xxh3:" + 16 lowercase hex digits.
inline constexpr std::string_view kChecksumPrefix = "xxh3:";
std::string checksum(std::span<const std::byte> bytes);

struct TensorView {
  std::string name;
  std::string dtype;
  std::vector<std::uint64_t> shape;  // {} is a 0-d tensor (one element)
  std::span<const std::byte> data;   // exactly product(shape) * dtype_size(dtype) bytes
};

// Writes atomically and durably: to "<path>.tmp-<pid>", fsync, rename over `path`, fsync the
// directory. The data section holds the tensors in the order given. Adds metadata
// "shmps.checksum" (XXH3 64, see above). Throws shmps::Error naming the path on any failure
// (bad input: unknown dtype, size mismatch, empty/duplicate/reserved name; or an I/O error).
// On failure before the rename, any previous file at `path` is intact and the temporary file
// is removed. (Only a failed fsync of the directory after a successful rename throws with the
// new file already in place.)
// `on_stage`, when given, is called with "mid_write" once about half of the data is written and
// with "before_rename" once the temporary file is durable (crash tests put kill points there).
// The file gets exactly `mode` (0600 by default: the owner's only; 0640 to share it with the
// group), whatever the umask. The temporary file is created new (O_EXCL) without following a
// symbolic link (O_NOFOLLOW): a link or another user's file at its path is refused, never
// written through. A full disk fails with ENOSPC said, and leaves the previous file intact.
void write_file(const std::filesystem::path& path, const std::vector<TensorView>& tensors,
                const std::map<std::string, std::string>& metadata,
                const std::function<void(std::string_view stage)>& on_stage = {}, unsigned mode = 0600);

struct Tensor {
  std::string dtype;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0, end = 0;  // offsets into the data section (File::data)
};

// A whole file, read into memory and validated.
class File {
 public:
  // Throws shmps::Error "<path>: <what is wrong>" for: a file that cannot be read; a truncated
  // file; a header length beyond the end of the file ("truncated file" when a JSON object
  // follows the length, else "not a safetensors file"); "not a safetensors file" when the first
  // 8 bytes give an absurd length (> 100 MB); JSON that does not parse or is not an
  // object; a tensor entry missing dtype/shape/data_offsets (or with the wrong JSON types); an
  // unknown dtype; a shape whose element count * dtype size != end - begin; offsets out of
  // range, overlapping, or not covering the data section; a bad "__metadata__"; a checksum
  // mismatch (when shmps.checksum is present).
  static File read(const std::filesystem::path& path);

  const std::filesystem::path& path() const noexcept { return path_; }
  const std::map<std::string, Tensor>& tensors() const noexcept { return tensors_; }
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }

  // The whole data section, and one tensor's bytes in it (throws if `t` is out of range).
  std::span<const std::byte> data() const noexcept;
  std::span<const std::byte> data(const Tensor& t) const;

  // The tensor `name` as float32 values, checking that it exists, has dtype F32 and exactly
  // `expected_shape`; throws shmps::Error with the file, the tensor, expected vs found.
  std::vector<float> f32(std::string_view name, const std::vector<std::uint64_t>& expected_shape) const;

  // Tensor `t`'s values as float32: F32 as stored, BF16 and F16 widened (exactly: each of their
  // values is a float32 one). Throws for any other dtype (callers check it first, with their own
  // message).
  std::vector<float> floats(const Tensor& t) const;

 private:
  File() = default;

  std::filesystem::path path_;
  std::map<std::string, Tensor> tensors_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::byte> bytes_;  // the whole file
  std::size_t data_start_ = 0;    // 8 + header length
};

}  // namespace shmps::server::safetensors
