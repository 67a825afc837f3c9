#include "shmps/shm/pages.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#include <shmps/shm/memory.hpp>
#include <shmps/shm/names.hpp>

namespace shmps::shm {

namespace {

HugeSetting setting_named(std::string_view word) noexcept {
  if (word == "never") return HugeSetting::never;
  if (word == "always") return HugeSetting::always;
  if (word == "within_size") return HugeSetting::within_size;
  if (word == "advise") return HugeSetting::advise;
  if (word == "deny") return HugeSetting::deny;
  if (word == "force") return HugeSetting::force;
  return HugeSetting::unknown;
}

std::string read_file(const char* path) {
  std::ifstream in(path);
  if (!in) return {};
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::vector<std::string_view> words(std::string_view line) {
  std::vector<std::string_view> out;
  std::size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
    const std::size_t start = i;
    while (i < line.size() && line[i] != ' ' && line[i] != '\t') ++i;
    if (i > start) out.push_back(line.substr(start, i - start));
  }
  return out;
}

}  // namespace

std::string_view to_string(HugeSetting s) noexcept {
  switch (s) {
    case HugeSetting::never: return "never";
    case HugeSetting::always: return "always";
    case HugeSetting::within_size: return "within_size";
    case HugeSetting::advise: return "advise";
    case HugeSetting::deny: return "deny";
    case HugeSetting::force: return "force";
    case HugeSetting::unknown: break;
  }
  return "unknown";
}

bool HugePageSupport::offered() const noexcept {
  if (sysfs == HugeSetting::force) return true;
  if (sysfs == HugeSetting::deny) return false;
  return mount == HugeSetting::always || mount == HugeSetting::within_size || mount == HugeSetting::advise;
}

HugeSetting parse_shmem_enabled(std::string_view text) noexcept {
  const auto open = text.find('['), close = text.find(']');
  if (open == std::string_view::npos || close == std::string_view::npos || close < open) return HugeSetting::unknown;
  return setting_named(text.substr(open + 1, close - open - 1));
}

HugeSetting parse_mount_huge(std::string_view mountinfo, std::string_view mount_point) noexcept {
  // "36 25 0:23 / /dev/shm rw,relatime shared:4 - tmpfs tmpfs rw,size=...,huge=advise"
  HugeSetting found = HugeSetting::unknown;
  std::size_t pos = 0;
  while (pos < mountinfo.size()) {
    std::size_t end = mountinfo.find('\n', pos);
    if (end == std::string_view::npos) end = mountinfo.size();
    const std::string_view line = mountinfo.substr(pos, end - pos);
    pos = end + 1;
    const auto w = words(line);
    if (w.size() < 5 || w[4] != mount_point) continue;
    std::size_t dash = 6;
    while (dash < w.size() && w[dash] != "-") ++dash;
    if (dash + 3 >= w.size()) continue;
    if (w[dash + 1] != "tmpfs") {
      found = HugeSetting::never;  // not a tmpfs: no shmem huge pages
      continue;
    }
    found = HugeSetting::never;  // absent means never
    const std::string_view options = w[dash + 3];
    std::size_t at = 0;
    while (at <= options.size()) {
      std::size_t comma = options.find(',', at);
      if (comma == std::string_view::npos) comma = options.size();
      const std::string_view option = options.substr(at, comma - at);
      if (option.substr(0, 5) == "huge=") found = setting_named(option.substr(5));
      at = comma + 1;
    }
  }
  return found;
}

HugePageSupport huge_page_support() {
  HugePageSupport s;
  s.mount = parse_mount_huge(read_file("/proc/self/mountinfo"), kShmDir);
  s.sysfs = parse_shmem_enabled(read_file("/sys/kernel/mm/transparent_hugepage/shmem_enabled"));
  return s;
}

std::uint64_t huge_mapped_bytes(const void* base) {
  std::ifstream in("/proc/self/smaps");
  if (!in) return 0;
  char start[32];
  std::snprintf(start, sizeof start, "%lx-", static_cast<unsigned long>(reinterpret_cast<std::uintptr_t>(base)));
  std::string line;
  bool inside = false;
  std::uint64_t kib = 0;
  while (std::getline(in, line)) {
    // A mapping's first line is "start-end perms ..."; its fields are "Name:   value kB".
    const bool header = !line.empty() && line.find(':') > line.find(' ');
    if (header) {
      if (inside) break;
      inside = line.rfind(start, 0) == 0;
      continue;
    }
    if (!inside) continue;
    if (line.rfind("ShmemPmdMapped:", 0) == 0 || line.rfind("FilePmdMapped:", 0) == 0)
      kib += std::strtoull(line.c_str() + line.find(':') + 1, nullptr, 10);
  }
  return kib * 1024;
}

std::string huge_page_text(const HugePageSupport& support, std::uint64_t huge_bytes, std::uint64_t total_bytes) {
  const long page = ::sysconf(_SC_PAGESIZE);
  const std::string base_pages = std::to_string((page > 0 ? page : 4096) / 1024) + " KiB pages";
  const std::string mount = support.mount == HugeSetting::never     ? std::string(kShmDir) + " is mounted without huge="
                            : support.mount == HugeSetting::unknown ? std::string(kShmDir) + " huge=?"
                                                                    : std::string(kShmDir) + " huge=" +
                                                                          std::string(to_string(support.mount));
  const std::string sysfs = "shmem_enabled = " + std::string(to_string(support.sysfs));
  if (!support.offered()) {
    if (support.sysfs == HugeSetting::deny)
      return "not offered (" + sysfs + " overrides " + mount + "); " + base_pages;
    return "not offered (" + mount + ", " + sysfs + "); " + base_pages;
  }
  std::string text = "offered (" + (support.sysfs == HugeSetting::force ? sysfs : mount) +
                     (support.mount == HugeSetting::advise ? ", the segment is madvised" : "") + "); ";
  if (huge_bytes == 0) return text + "none of the segment in huge pages in the server's mapping, " + base_pages;
  return text + human_bytes(huge_bytes) + " of " + human_bytes(total_bytes) +
         " in 2 MiB pages in the server's mapping, the rest in " + base_pages;
}

}  // namespace shmps::shm
