// A checkpoint of a job on several hosts (docs/several-hosts.md): one part per host, and one
// manifest naming them all.
//
//   DIR/<job>.h<K>.<stamp>.safetensors   the part of MPI rank K: its replica's full checkpoint
//                                (checkpoint.hpp), sync tables included, written by that
//                                host's server into DIR on that host
//   DIR/manifest.json            the same on every host (written by every rank of
//                                `shmps-ctl checkpoint --mpi`, atomically):
//     {"format": "shmps-multihost-checkpoint-1", "job": "mlp", "ranks": 3,
//      "taken_unix_ns": 1765000000000000000,
//      "parts": [{"rank": 0, "host": "a", "file": "mlp.h0.1765000000000000000.safetensors", "bytes": 123,
//                 "xxh3": "0123456789abcdef"}, ...]}
//
// The parts are one consistent cut of the job: taken after a full sync, while no group adds a
// delta or takes an answer (sync_pause), so that a delta a home has added is in the home's part
// and in flight or taken in its sender's part; a restore gives each rank its part, and the
// exactly-once tables do the rest. A restore checks every part against the manifest first.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace shmps::server {

inline constexpr std::string_view kManifestFormat = "shmps-multihost-checkpoint-1";
inline constexpr std::string_view kManifestFile = "manifest.json";

struct ManifestPart {
  std::uint32_t rank = 0;
  std::string host;
  std::string file;  // relative to the manifest's directory
  std::uint64_t bytes = 0;
  std::string xxh3;  // 16 hex digits, of the whole file
};

struct Manifest {
  std::string job;
  std::uint32_t ranks = 0;
  std::uint64_t taken_unix_ns = 0;
  std::vector<ManifestPart> parts;  // one per rank, by rank
};

// "<job>.h<rank>.<stamp>.safetensors": each checkpoint's parts have names of their own (`stamp`:
// when it was taken), so that one that fails half-way leaves the previous one whole.
std::string part_file_name(std::string_view job, std::uint32_t rank, std::uint64_t stamp);
// XXH3-64 of a whole file, 16 hex digits. Throws shmps::Error if it cannot be read.
std::string file_xxh3(const std::filesystem::path& path);
// DIR/manifest.json, written to a temporary file, flushed and renamed over the old one (mode 0600).
void write_manifest(const std::filesystem::path& dir, const Manifest& manifest);
// A manifest read and checked for form (every rank's part once). `path`: the file, or its
// directory. Throws shmps::Error saying what is wrong.
Manifest read_manifest(const std::filesystem::path& path);
// Whether rank `rank`'s part, in the manifest's directory `dir`, is the one the manifest names:
// "" if so, else what is wrong (missing, another size, another hash).
std::string check_part(const std::filesystem::path& dir, const Manifest& manifest, std::uint32_t rank);

}  // namespace shmps::server
