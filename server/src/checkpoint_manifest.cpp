#include <shmps/server/checkpoint_manifest.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <vector>

#include <nlohmann/json.hpp>

// The parts' hashes with xxHash's XXH3, as safetensors.cpp's checksums (and the same GCC 12
// false warnings inside its AVX-512 intrinsics, GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <shmps/error.hpp>

namespace shmps::server {

using json = nlohmann::json;

std::string part_file_name(std::string_view job, std::uint32_t rank, std::uint64_t stamp) {
  return std::string(job) + ".h" + std::to_string(rank) + "." + std::to_string(stamp) + ".safetensors";
}

std::string file_xxh3(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot be read");
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), &XXH3_freeState);
  XXH3_64bits_reset(state.get());
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    XXH3_64bits_update(state.get(), buffer.data(), static_cast<std::size_t>(in.gcount()));
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(XXH3_64bits_digest(state.get())));
  return hex;
}

void write_manifest(const std::filesystem::path& dir, const Manifest& m) {
  json parts = json::array();
  for (const auto& p : m.parts)
    parts.push_back({{"rank", p.rank}, {"host", p.host}, {"file", p.file}, {"bytes", p.bytes}, {"xxh3", p.xxh3}});
  const std::string text = json{{"format", kManifestFormat},
                                {"job", m.job},
                                {"ranks", m.ranks},
                                {"taken_unix_ns", m.taken_unix_ns},
                                {"parts", parts}}
                               .dump(2) +
                           "\n";
  // Several ranks may share the directory (one file system): each writes its own temporary file
  // and renames it; the contents are the same.
  const std::filesystem::path final_path = dir / kManifestFile;
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  const std::filesystem::path tmp = dir / (".manifest." + std::string(host) + "." + std::to_string(::getpid()) + ".tmp");
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) throw Error(tmp.string() + ": cannot be created: " + std::strerror(errno));
  const bool written = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
  ::close(fd);
  if (!written || std::rename(tmp.c_str(), final_path.c_str()) != 0) {
    std::filesystem::remove(tmp);
    throw Error(final_path.string() + ": cannot be written: " + std::strerror(errno));
  }
}

Manifest read_manifest(const std::filesystem::path& given) {
  const std::filesystem::path path = std::filesystem::is_directory(given) ? given / kManifestFile : given;
  std::ifstream in(path);
  if (!in)
    throw Error(path.string() + ": no manifest here (a checkpoint of a job on several hosts is a directory with "
                                "manifest.json and one part per host; shmps-ctl checkpoint --mpi writes it)");
  Manifest m;
  try {
    const json j = json::parse(in);
    if (j.at("format").get<std::string>() != kManifestFormat)
      throw Error(path.string() + ": format \"" + j.at("format").get<std::string>() + "\", expected \"" +
                  std::string(kManifestFormat) + "\"");
    m.job = j.at("job").get<std::string>();
    m.ranks = j.at("ranks").get<std::uint32_t>();
    m.taken_unix_ns = j.at("taken_unix_ns").get<std::uint64_t>();
    for (const json& p : j.at("parts"))
      m.parts.push_back({p.at("rank").get<std::uint32_t>(), p.at("host").get<std::string>(),
                         p.at("file").get<std::string>(), p.at("bytes").get<std::uint64_t>(),
                         p.at("xxh3").get<std::string>()});
  } catch (const json::exception& e) {
    throw Error(path.string() + ": not a readable manifest: " + e.what());
  }
  if (m.ranks == 0 || m.parts.size() != m.ranks)
    throw Error(path.string() + ": names " + std::to_string(m.parts.size()) + " parts for " + std::to_string(m.ranks) +
                " ranks: the file is damaged");
  for (std::uint32_t k = 0; k < m.ranks; ++k)
    if (m.parts[k].rank != k || m.parts[k].file.find('/') != std::string::npos)
      throw Error(path.string() + ": part " + std::to_string(k) + " is not rank " + std::to_string(k) +
                  "'s, or names a file outside the directory: the file is damaged");
  return m;
}

std::string check_part(const std::filesystem::path& dir, const Manifest& m, std::uint32_t rank) {
  if (rank >= m.ranks) return "the checkpoint has " + std::to_string(m.ranks) + " parts and no part for rank " + std::to_string(rank);
  const ManifestPart& part = m.parts[rank];
  const std::filesystem::path path = dir / part.file;
  std::error_code ec;
  const auto bytes = std::filesystem::file_size(path, ec);
  if (ec) return path.string() + " is missing (rank " + std::to_string(rank) + "'s part, written on host " + part.host + ")";
  if (bytes != part.bytes)
    return path.string() + " has " + std::to_string(bytes) + " bytes, the manifest says " + std::to_string(part.bytes) +
           ": it is not the part this checkpoint wrote";
  const std::string hash = file_xxh3(path);
  if (hash != part.xxh3)
    return path.string() + " has hash " + hash + ", the manifest says " + part.xxh3 + ": it is damaged or from another checkpoint";
  return {};
}

}  // namespace shmps::server
