// safetensors reader/writer; see safetensors.hpp for the format and the guarantees.
#include "shmps/server/safetensors.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <memory>
#include <set>
#include <sstream>
#include <utility>

#include "shmps/error.hpp"
#include "shmps/shape.hpp"
#include "shmps/shm/dtype.hpp"

// xxHash, header-only (Debian's libxxhash-dev): XXH3 hashes at memory speed, so the checksum
// does not slow down checkpoints of big models.
// GCC 12 reports false -Wmaybe-uninitialized inside its own AVX-512 intrinsics once xxHash's
// vector code is inlined (GCC bug 105593), as with Eigen in optimizer.cpp.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define XXH_INLINE_ALL
#include <xxhash.h>

static_assert(std::endian::native == std::endian::little, "safetensors: little-endian hosts only");

namespace shmps::server::safetensors {
namespace {

using nlohmann::json;

constexpr std::uint64_t kMaxHeader = 100'000'000;  // what the reference implementation allows
constexpr std::string_view kMetadataKey = "__metadata__";

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& what) {
  throw Error(path.string() + ": " + what);
}

[[noreturn]] void fail_errno(const std::filesystem::path& path, const std::string& what, int err) {
  fail(path, what + ": " + std::strerror(err) +
                 (err == ENOSPC || err == EDQUOT ? " (the disk is full: free some space; the temporary file is removed "
                                                   "and any previous file at this path is intact)"
                                                 : ""));
}

std::string hex64(std::uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// Element count of `shape`, false on overflow.
bool element_count(const std::vector<std::uint64_t>& shape, std::uint64_t& count) {
  count = 1;
  for (std::uint64_t d : shape) {
    if (__builtin_mul_overflow(count, d, &count)) return false;
  }
  return true;
}

// Closes a file descriptor on scope exit unless released.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  int release() { return std::exchange(fd, -1); }
};

void write_all(int fd, const std::byte* p, std::size_t n, const std::filesystem::path& path,
               const std::filesystem::path& tmp) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail_errno(path, "cannot write " + tmp.string(), errno);
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

std::filesystem::path parent_dir(const std::filesystem::path& path) {
  std::filesystem::path dir = path.parent_path();
  return dir.empty() ? std::filesystem::path(".") : dir;
}

}  // namespace

std::size_t dtype_size(std::string_view dtype) noexcept {
  if (dtype == "BOOL" || dtype == "U8" || dtype == "I8") return 1;
  if (dtype == "U16" || dtype == "I16" || dtype == "F16" || dtype == "BF16") return 2;
  if (dtype == "U32" || dtype == "I32" || dtype == "F32") return 4;
  if (dtype == "U64" || dtype == "I64" || dtype == "F64") return 8;
  return 0;
}

std::string checksum(std::span<const std::byte> bytes) {
  return std::string(kChecksumPrefix) + hex64(XXH3_64bits(bytes.data(), bytes.size()));
}

// ---------------------------------------------------------------------------------- writing

void write_file(const std::filesystem::path& path, const std::vector<TensorView>& tensors,
                const std::map<std::string, std::string>& metadata,
                const std::function<void(std::string_view stage)>& on_stage, unsigned mode) {
  // Validate everything before touching the file system.
  json header = json::object();
  std::set<std::string_view> names;
  std::uint64_t offset = 0;
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> hasher(XXH3_createState(), &XXH3_freeState);
  if (!hasher || XXH3_64bits_reset(hasher.get()) != XXH_OK) fail(path, "cannot start the checksum (out of memory)");
  for (const TensorView& t : tensors) {
    if (t.name.empty()) fail(path, "a tensor has an empty name");
    if (t.name == kMetadataKey) fail(path, "tensor name \"__metadata__\" is reserved");
    if (!names.insert(t.name).second) fail(path, "tensor '" + t.name + "' is given twice");
    const std::size_t esize = dtype_size(t.dtype);
    if (esize == 0) fail(path, "tensor '" + t.name + "': unknown dtype \"" + t.dtype + "\"");
    std::uint64_t count = 0, bytes = 0;
    if (!element_count(t.shape, count) || __builtin_mul_overflow(count, esize, &bytes)) {
      fail(path, "tensor '" + t.name + "': shape " + shape_text(t.shape) + " is too large");
    }
    if (bytes != t.data.size()) {
      fail(path, "tensor '" + t.name + "': shape " + shape_text(t.shape) + " of " + t.dtype + " needs " +
                     std::to_string(bytes) + " bytes, but " + std::to_string(t.data.size()) + " are given");
    }
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    XXH3_64bits_update(hasher.get(), t.data.data(), t.data.size());
  }
  json meta = json::object();
  for (const auto& [k, v] : metadata) meta[k] = v;
  meta[std::string(kChecksumKey)] = std::string(kChecksumPrefix) + hex64(XXH3_64bits_digest(hasher.get()));
  header[std::string(kMetadataKey)] = std::move(meta);

  std::string text;
  try {
    text = header.dump();  // throws on invalid UTF-8 in names, dtypes or metadata
  } catch (const json::exception& e) {
    fail(path, std::string("cannot encode the header: ") + e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts at a multiple of 8
  std::byte len[8];
  const std::uint64_t n = text.size();
  std::memcpy(len, &n, sizeof len);

  // Write to a temporary file next to the target, make it durable, rename it over the target.
  const std::filesystem::path tmp = path.string() + ".tmp-" + std::to_string(::getpid());
  // Created new, not followed: a leftover of our own (a process with this pid killed while
  // writing) is removed and the file made again; anything else there is refused.
  const int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW;
  Fd fd{::open(tmp.c_str(), flags, static_cast<mode_t>(mode))};
  if (fd.fd < 0 && errno == EEXIST) {
    struct stat st {};
    if (::lstat(tmp.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == ::geteuid() && ::unlink(tmp.c_str()) == 0)
      fd.fd = ::open(tmp.c_str(), flags, static_cast<mode_t>(mode));
    else
      fail(path, "cannot create " + tmp.string() + ": it exists and is " +
                     (S_ISLNK(st.st_mode) ? std::string("a symbolic link") : std::string("not a file of this user")) +
                     ": refusing to write through it (someone else may have put it there; remove it)");
  }
  if (fd.fd < 0) fail_errno(path, "cannot create " + tmp.string(), errno);
  ::fchmod(fd.fd, static_cast<mode_t>(mode));  // exactly `mode`, whatever the umask
  try {
    write_all(fd.fd, len, sizeof len, path, tmp);
    write_all(fd.fd, reinterpret_cast<const std::byte*>(text.data()), text.size(), path, tmp);
    std::uint64_t written = 0;
    bool half_reported = false;
    for (const TensorView& t : tensors) {
      write_all(fd.fd, t.data.data(), t.data.size(), path, tmp);
      written += t.data.size();
      if (on_stage && !half_reported && 2 * written >= offset) {
        half_reported = true;
        on_stage("mid_write");
      }
    }
    if (::fsync(fd.fd) != 0) fail_errno(path, "cannot fsync " + tmp.string(), errno);
    if (::close(fd.release()) != 0) fail_errno(path, "cannot close " + tmp.string(), errno);
    if (on_stage) on_stage("before_rename");
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      fail_errno(path, "cannot rename " + tmp.string() + " over it", errno);
    }
  } catch (...) {
    if (fd.fd >= 0) ::close(fd.release());
    ::unlink(tmp.c_str());
    throw;
  }
  const std::filesystem::path dir = parent_dir(path);
  Fd dfd{::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (dfd.fd < 0) fail_errno(path, "written, but cannot open directory " + dir.string() + " to fsync it", errno);
  if (::fsync(dfd.fd) != 0) fail_errno(path, "written, but cannot fsync directory " + dir.string(), errno);
}

// ---------------------------------------------------------------------------------- reading

namespace {

// The whole file. If it shrinks while it is read, what is left is checked by the caller.
std::vector<std::byte> read_whole(const std::filesystem::path& path) {
  Fd fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0) fail_errno(path, "cannot open", errno);
  struct stat st {};
  if (::fstat(fd.fd, &st) != 0) fail_errno(path, "cannot stat", errno);
  if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");
  std::vector<std::byte> bytes(static_cast<std::size_t>(st.st_size));
  std::size_t got = 0;
  while (got < bytes.size()) {
    ssize_t r = ::read(fd.fd, bytes.data() + got, bytes.size() - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      fail_errno(path, "cannot read", errno);
    }
    if (r == 0) break;
    got += static_cast<std::size_t>(r);
  }
  bytes.resize(got);  // the file shrank while we read it: what is left is checked below
  return bytes;
}

// The header length (the file's first 8 bytes), checked against the file's size.
std::uint64_t header_length(const std::filesystem::path& path, const std::vector<std::byte>& bytes) {
  const std::uint64_t size = bytes.size();
  if (size < 8) {
    fail(path, "truncated file: " + std::to_string(size) + " bytes, fewer than the 8-byte header length");
  }
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), sizeof n);
  // A length past the end of the file: a cut-off safetensors file if a JSON object follows the
  // length, otherwise not a safetensors file at all.
  const bool json_follows = size > 8 && bytes[8] == std::byte{'{'};
  if (n > kMaxHeader || (n > size - 8 && !json_follows)) {
    fail(path, "not a safetensors file (its first 8 bytes give a header length of " + std::to_string(n) +
                   " bytes; the file has " + std::to_string(size) + ")");
  }
  if (n > size - 8) {
    fail(path, "truncated file: the header length " + std::to_string(n) + " goes beyond the end of the file (" +
                   std::to_string(size - 8) + " bytes after the length)");
  }
  return n;
}

// The JSON header: the n bytes after the length, a JSON object.
json parse_header(const std::filesystem::path& path, const std::vector<std::byte>& bytes, std::uint64_t n) {
  json header;
  try {
    const char* begin = reinterpret_cast<const char*>(bytes.data() + 8);
    header = json::parse(begin, begin + n);
  } catch (const json::exception& e) {
    fail(path, std::string("header JSON does not parse: ") + e.what());
  }
  if (!header.is_object()) fail(path, std::string("header JSON is a ") + header.type_name() + ", not an object");
  return header;
}

// "__metadata__": an object of strings.
void read_metadata(const std::filesystem::path& path, const json& entry, std::map<std::string, std::string>& out) {
  if (!entry.is_object()) fail(path, "\"__metadata__\" is not an object");
  for (const auto& [k, v] : entry.items()) {
    if (!v.is_string()) fail(path, "\"__metadata__\": value of \"" + k + "\" is not a string");
    out[k] = v.get<std::string>();
  }
}

// One tensor's header entry: dtype, shape and data offsets, which must lie in the data section
// and hold exactly the bytes the shape needs.
Tensor read_entry(const std::filesystem::path& path, const std::string& name, const json& entry,
                  std::uint64_t data_size) {
  const std::string where = "tensor '" + name + "': ";
  if (!entry.is_object()) fail(path, where + "entry is not an object");
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(key)) fail(path, where + "missing \"" + key + "\"");
  }
  Tensor t;
  const json& dtype = entry["dtype"];
  if (!dtype.is_string()) fail(path, where + "\"dtype\" is not a string");
  t.dtype = dtype.get<std::string>();
  const std::size_t esize = dtype_size(t.dtype);
  if (esize == 0) fail(path, where + "unknown dtype \"" + t.dtype + "\"");
  const json& shape = entry["shape"];
  if (!shape.is_array()) fail(path, where + "\"shape\" is not an array");
  for (const json& d : shape) {
    if (!d.is_number_unsigned()) fail(path, where + "\"shape\" holds " + d.dump() + ", not a non-negative integer");
    t.shape.push_back(d.get<std::uint64_t>());
  }
  const json& offs = entry["data_offsets"];
  if (!offs.is_array() || offs.size() != 2 || !offs[0].is_number_unsigned() || !offs[1].is_number_unsigned()) {
    fail(path, where + "\"data_offsets\" is " + offs.dump() + ", not [begin, end] as non-negative integers");
  }
  t.begin = offs[0].get<std::uint64_t>();
  t.end = offs[1].get<std::uint64_t>();
  if (t.begin > t.end) {
    fail(path, where + "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                   "]: begin is after end");
  }
  if (t.end > data_size) {
    fail(path, where + "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                   "] out of range: the data section has " + std::to_string(data_size) + " bytes");
  }
  std::uint64_t count = 0, bytes = 0;
  if (!element_count(t.shape, count) || __builtin_mul_overflow(count, esize, &bytes)) {
    fail(path, where + "shape " + shape_text(t.shape) + " is too large");
  }
  if (bytes != t.end - t.begin) {
    fail(path, where + "shape " + shape_text(t.shape) + " of " + t.dtype + " needs " + std::to_string(bytes) +
                   " bytes, but data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                   "] give " + std::to_string(t.end - t.begin));
  }
  return t;
}

// Where a tensor's bytes lie in the data section.
struct Span {
  std::uint64_t begin, end;
  const std::string* name;
};

// The tensors are contiguous, do not overlap and cover the data section exactly.
void check_spans(const std::filesystem::path& path, std::vector<Span> spans, std::uint64_t data_size) {
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t at = 0;
  const std::string* prev = nullptr;
  for (const Span& s : spans) {
    if (s.begin < at) {
      fail(path, "tensors '" + *prev + "' and '" + *s.name + "' overlap (byte " + std::to_string(s.begin) +
                     " of the data section)");
    }
    if (s.begin > at) {
      fail(path, "data section bytes [" + std::to_string(at) + ", " + std::to_string(s.begin) +
                     ") are not covered by any tensor (the tensors must be contiguous)");
    }
    at = s.end;
    prev = s.name;
  }
  if (at != data_size) {
    fail(path, "tensors do not cover the data section: they end at byte " + std::to_string(at) +
                   " but the data section has " + std::to_string(data_size) + " bytes");
  }
}

// The checksum, when the file has one.
void check_checksum(const std::filesystem::path& path, const std::map<std::string, std::string>& metadata,
                    std::span<const std::byte> data) {
  if (auto it = metadata.find(std::string(kChecksumKey)); it != metadata.end()) {
    std::string found = it->second;
    std::transform(found.begin(), found.end(), found.begin(),
                   [](char c) { return static_cast<char>(c >= 'A' && c <= 'F' ? c - 'A' + 'a' : c); });
    if (found.rfind(kChecksumPrefix, 0) != 0)
      fail(path, std::string(kChecksumKey) + " is \"" + it->second + "\": not a checksum this build knows (\"" +
                     std::string(kChecksumPrefix) + "<16 hex digits>\"); remove the key to read the file unchecked");
    const std::string want = checksum(data);
    if (found != want) {
      fail(path, "checksum mismatch: " + std::string(kChecksumKey) + " says " + it->second +
                     " but the data section hashes to " + want + "; the file is damaged");
    }
  }
}

}  // namespace

File File::read(const std::filesystem::path& path) {
  File f;
  f.path_ = path;
  f.bytes_ = read_whole(path);
  const std::uint64_t n = header_length(path, f.bytes_);
  f.data_start_ = static_cast<std::size_t>(8 + n);
  const std::uint64_t data_size = f.bytes_.size() - 8 - n;
  const json header = parse_header(path, f.bytes_, n);

  std::vector<Span> spans;
  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      read_metadata(path, entry, f.metadata_);
      continue;
    }
    auto [it, inserted] = f.tensors_.emplace(name, read_entry(path, name, entry, data_size));
    (void)inserted;  // nlohmann keeps one value per key
    spans.push_back({it->second.begin, it->second.end, &it->first});
  }
  check_spans(path, std::move(spans), data_size);
  check_checksum(path, f.metadata_, f.data());
  return f;
}

std::span<const std::byte> File::data() const noexcept {
  return std::span<const std::byte>(bytes_).subspan(data_start_);
}

std::span<const std::byte> File::data(const Tensor& t) const {
  const std::span<const std::byte> all = data();
  if (t.begin > t.end || t.end > all.size()) {
    fail(path_, "tensor offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                    "] are outside the data section of " + std::to_string(all.size()) + " bytes");
  }
  return all.subspan(static_cast<std::size_t>(t.begin), static_cast<std::size_t>(t.end - t.begin));
}

std::vector<float> File::f32(std::string_view name, const std::vector<std::uint64_t>& expected_shape) const {
  auto it = tensors_.find(std::string(name));
  if (it == tensors_.end()) {
    std::string have;
    for (const auto& [k, v] : tensors_) have += (have.empty() ? "" : ", ") + k;
    fail(path_, "tensor '" + std::string(name) + "' not found (the file has: " + (have.empty() ? "none" : have) + ")");
  }
  const Tensor& t = it->second;
  if (t.dtype != "F32") {
    fail(path_, "tensor '" + std::string(name) + "': expected dtype F32, found " + t.dtype);
  }
  if (t.shape != expected_shape) {
    fail(path_, "tensor '" + std::string(name) + "': expected shape " + shape_text(expected_shape) + ", found " +
                    shape_text(t.shape));
  }
  return floats(t);
}

std::vector<float> File::floats(const Tensor& t) const {
  const std::span<const std::byte> bytes = data(t);
  if (t.dtype == "F32") {
    std::vector<float> out(bytes.size() / sizeof(float));
    if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
    return out;
  }
  if (t.dtype != "BF16" && t.dtype != "F16") fail(path_, "a tensor of dtype " + t.dtype + " read as floats");
  std::vector<std::uint16_t> stored(bytes.size() / sizeof(std::uint16_t));
  if (!bytes.empty()) std::memcpy(stored.data(), bytes.data(), bytes.size());
  std::vector<float> out(stored.size());
  shm::widen(t.dtype == "BF16" ? shm::DType::bf16 : shm::DType::fp16, stored.data(), out.data(), stored.size());
  return out;
}

}  // namespace shmps::server::safetensors
