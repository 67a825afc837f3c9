// Transparent huge pages for the segment: what the system offers, and what the segment got.
//
// A segment is a file on the tmpfs at /dev/shm. Whether its pages can be huge (2 MiB on x86-64)
// is decided by that mount's huge= option (never, the default; always; within_size; advise: only
// where the mapping is madvised MADV_HUGEPAGE, which shmps does); the knob
// /sys/kernel/mm/transparent_hugepage/shmem_enabled governs only the kernel's internal shmem
// mount (SysV shm, memfd), except that its values "deny" and "force" override every tmpfs mount.
// To offer them: `mount -o remount,huge=advise /dev/shm` (as root). Nothing in shmps fails
// where huge pages are not offered: the segment is then made of base pages (4 KiB).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace shmps::shm {

// A setting of huge= or of shmem_enabled. Stored in the segment header (huge_mount, huge_sysfs).
enum class HugeSetting : std::uint32_t { unknown = 0, never = 1, always = 2, within_size = 3, advise = 4, deny = 5, force = 6 };
std::string_view to_string(HugeSetting s) noexcept;

struct HugePageSupport {
  HugeSetting mount = HugeSetting::unknown;  // /dev/shm's huge= option (never when absent)
  HugeSetting sysfs = HugeSetting::unknown;  // shmem_enabled
  // Whether a segment made now may get huge pages.
  bool offered() const noexcept;
};

// Reads /proc/self/mountinfo and shmem_enabled; unknown where they cannot be read.
HugePageSupport huge_page_support();

// The parsers behind it, for tests. shmem_enabled reads "always within_size advise [never] deny
// force" (the chosen one in brackets). In mountinfo, the super options of the tmpfs mounted at
// `mount_point` carry "huge=advise" unless it is never (the last mount there counts).
HugeSetting parse_shmem_enabled(std::string_view text) noexcept;
HugeSetting parse_mount_huge(std::string_view mountinfo, std::string_view mount_point) noexcept;

// Bytes of this process's mapping that starts at `base` mapped with huge pages
// (ShmemPmdMapped + FilePmdMapped in /proc/self/smaps); 0 if none or unreadable.
std::uint64_t huge_mapped_bytes(const void* base);

// One line for logs and shmps-ctl inspect, e.g.
//   "not offered (/dev/shm is mounted without huge=, shmem_enabled = never); 4 KiB pages"
//   "offered (/dev/shm huge=advise, the segment is madvised); 3.0 GiB of 3.1 GiB in 2 MiB pages
//    in the server's mapping"
// huge_bytes / total_bytes: what the server's mapping got.
std::string huge_page_text(const HugePageSupport& support, std::uint64_t huge_bytes, std::uint64_t total_bytes);

}  // namespace shmps::shm
