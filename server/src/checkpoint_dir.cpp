// Checkpoints, the directory of one job: "<segment>.<serial>.safetensors" files, the next
// serial, pruning to the newest few, the temporaries a killed server left, and the newest file
// that reads back valid. See checkpoint.hpp (CheckpointDir).
#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstring>

#include <sys/stat.h>
#include <unistd.h>

#include <shmps/error.hpp>
#include <shmps/server/checkpoint.hpp>

namespace shmps::server {

namespace {
// "<segment>.<8+ digits>.safetensors" -> serial, or -1.
std::int64_t serial_of(const std::string& file, const std::string& segment) {
  const std::string prefix = segment + ".", suffix = ".safetensors";
  if (file.size() <= prefix.size() + suffix.size() || file.compare(0, prefix.size(), prefix) != 0 ||
      file.compare(file.size() - suffix.size(), suffix.size(), suffix) != 0)
    return -1;
  const std::string_view digits(file.data() + prefix.size(), file.size() - prefix.size() - suffix.size());
  std::int64_t serial = 0;
  auto r = std::from_chars(digits.data(), digits.data() + digits.size(), serial);
  if (r.ec != std::errc() || r.ptr != digits.data() + digits.size() || serial < 0) return -1;
  return serial;
}
}  // namespace

CheckpointDir::CheckpointDir(std::filesystem::path dir, std::string segment) : dir_(std::move(dir)), segment_(std::move(segment)) {}

// Why a file named like a checkpoint is not one of this job's: a symbolic link (never followed),
// not a regular file, or another user's file (someone else put it there). Empty if it is ours.
std::string CheckpointDir::foreign(const std::filesystem::path& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return "cannot stat it: " + std::string(std::strerror(errno));
  if (S_ISLNK(st.st_mode)) return "a symbolic link: not followed, not restored";
  if (!S_ISREG(st.st_mode)) return "not a regular file";
  if (st.st_uid != ::geteuid())
    return "belongs to another user (uid " + std::to_string(st.st_uid) + "): not restored, not pruned";
  return "";
}

std::vector<std::filesystem::path> CheckpointDir::list() const { return scan(true); }

std::vector<std::filesystem::path> CheckpointDir::scan(bool own_only) const {
  std::vector<std::pair<std::int64_t, std::filesystem::path>> found;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
    const std::int64_t serial = serial_of(entry.path().filename().string(), segment_);
    if (serial >= 0 && (!own_only || foreign(entry.path()).empty())) found.emplace_back(serial, entry.path());
  }
  std::sort(found.begin(), found.end());
  std::vector<std::filesystem::path> out;
  for (auto& f : found) out.push_back(std::move(f.second));
  return out;
}

std::filesystem::path CheckpointDir::next_path() const {
  const auto files = scan(false);  // past every name taken, ours or not
  const std::int64_t next = files.empty() ? 1 : serial_of(files.back().filename().string(), segment_) + 1;
  char digits[32];
  std::snprintf(digits, sizeof digits, "%08lld", static_cast<long long>(next));
  return dir_ / (segment_ + "." + digits + ".safetensors");
}

std::size_t CheckpointDir::prune(std::size_t keep) const {
  if (keep == 0) return 0;
  const auto files = list();
  std::size_t removed = 0;
  for (std::size_t i = 0; i + keep < files.size(); ++i) {
    std::error_code ec;
    if (std::filesystem::remove(files[i], ec)) ++removed;
  }
  return removed;
}

std::size_t CheckpointDir::remove_temporaries() const {
  std::size_t removed = 0;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
    const std::string file = entry.path().filename().string();
    const auto tmp = file.rfind(".tmp-");
    if (tmp == std::string::npos || serial_of(file.substr(0, tmp), segment_) < 0) continue;
    if (!foreign(entry.path()).empty()) continue;  // not ours: left alone
    std::error_code rm;
    if (std::filesystem::remove(entry.path(), rm)) ++removed;
  }
  return removed;
}

std::optional<CheckpointDir::Found> CheckpointDir::newest_valid(std::vector<std::string>& skipped) const {
  for (const auto& f : scan(false))
    if (const std::string why = foreign(f); !why.empty()) skipped.push_back(f.string() + ": " + why);
  auto files = list();
  if (files.empty()) return std::nullopt;
  for (auto it = files.rbegin(); it != files.rend(); ++it) {
    try {
      return Found{*it, read_checkpoint(*it)};
    } catch (const Error& e) {
      skipped.push_back(e.what());
    }
  }
  std::string why;
  for (const auto& s : skipped) why += "\n  " + s;
  throw Error("no valid checkpoint of '" + segment_ + "' in " + dir_.string() + " (" + std::to_string(files.size()) +
              " tried):" + why + "\nmove the damaged files away to start the job from its spec");
}

}  // namespace shmps::server
