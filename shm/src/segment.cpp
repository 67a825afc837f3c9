#include "shmps/shm/segment.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <boost/interprocess/exceptions.hpp>
#include <boost/interprocess/anonymous_shared_memory.hpp>
#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/dtype.hpp>
#include <shmps/shm/memory.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shape.hpp>

namespace bip = boost::interprocess;

#ifndef MADV_POPULATE_READ  // Linux 5.14; older headers
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace shmps::shm {

namespace {

// The mapping, and the shared-memory object it maps: its descriptor stays open for reserve()'s
// posix_fallocate on kernels without MADV_POPULATE_WRITE.
struct Mapping {
  bip::shared_memory_object shm;
  bip::mapped_region region;
};

std::uint64_t page_bytes() {
  static const std::uint64_t page = [] {
    const long p = ::sysconf(_SC_PAGESIZE);
    return p > 0 ? static_cast<std::uint64_t>(p) : std::uint64_t{4096};
  }();
  return page;
}

// A symbolic link at a segment's path is never shmps's: someone else put it there, maybe to
// make a server write through it. shm_open (O_NOFOLLOW) would refuse it too; this says why.
void refuse_symlink(std::string_view name, const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode))
    throw Error("segment '" + std::string(name) + "' (" + path + ") is a symbolic link: refusing to follow it (shmps "
                "never makes one; someone else may have put it there; remove it)");
}

// An opened segment file must be a regular file that is not open to every user: shmps makes
// segments 0600, or 0660 with --group. One readable or writable by every user is not a shmps
// job's (another user may have put it there for a worker or tool to take for a job).
void check_opened(std::string_view name, const std::string& path, int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw Error("cannot stat segment '" + std::string(name) + "' (" + path + "): " + std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    throw Error("segment '" + std::string(name) + "' (" + path + ") is not a regular file: refusing it");
  if ((st.st_mode & (S_IROTH | S_IWOTH)) != 0 && st.st_uid != ::geteuid()) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    throw Error("segment '" + std::string(name) + "' (" + path + ") belongs to another user (uid " +
                std::to_string(st.st_uid) + ") and is open to every user (mode " + mode +
                "): refusing it (shmps makes segments 0600, or 0660 with --group; someone else may have put it there)");
  }
}

// madvise(MADV_POPULATE_*) over [begin, end) widened to whole pages: 0 or the errno.
int populate(const std::byte* base, std::uint64_t begin, std::uint64_t end, int advice) {
  const std::uint64_t page = page_bytes();
  begin = begin / page * page;
  end = align_up(end, page);
  if (end <= begin) return 0;
  auto* addr = const_cast<std::byte*>(base) + begin;
  while (::madvise(addr, end - begin, advice) != 0) {
    if (errno != EINTR && errno != EAGAIN) return errno;
  }
  return 0;
}

// Huge pages where /dev/shm offers them (pages.hpp); an error only means the kernel cannot.
void advise_huge_pages(std::byte* base, std::uint64_t size) noexcept {
#ifdef MADV_HUGEPAGE
  (void)::madvise(base, size, MADV_HUGEPAGE);
#else
  (void)base;
  (void)size;
#endif
}

}  // namespace

Segment::Segment() = default;
Segment::~Segment() = default;
Segment::Segment(Segment&&) noexcept = default;
Segment& Segment::operator=(Segment&&) noexcept = default;

void Segment::check_room(std::string_view name, std::uint64_t total_bytes) {
  struct statvfs fs {};
  if (::statvfs(std::string(kShmDir).c_str(), &fs) != 0) return;  // creation itself will say what is wrong
  const std::uint64_t free_bytes = static_cast<std::uint64_t>(fs.f_bavail) * fs.f_frsize;
  if (total_bytes > free_bytes)
    throw Error("segment '" + std::string(name) + "' needs " + human_bytes(total_bytes) + " but " + std::string(kShmDir) +
                " has only " + human_bytes(free_bytes) + " free: make the model smaller or its rings smaller (ring_bytes; by "
                "default each of the max_workers rings holds two pushes of the largest parameter (a whole step in "
                "BSP), at most 32 MiB; shmps-server --plan shows every part), remove stale "
                "segments (shmps-ctl list / destroy), or enlarge " + std::string(kShmDir) + " (mount -o remount,size=... " +
                std::string(kShmDir) + ")");
}

Segment Segment::create(std::string_view name, std::uint64_t total_bytes, unsigned mode,
                        std::span<const ByteRange> deferred) {
  check_segment_name(name);
  const std::string path = segment_path(name);
  check_room(name, total_bytes);  // first, so that a too-large model changes nothing
  refuse_symlink(name, path);
  bip::permissions perms;
  perms.set_permissions(static_cast<int>(mode));
  Segment segment;
  try {
    bip::shared_memory_object shm(bip::create_only, shm_object_name(name).c_str(), bip::read_write, perms);
    const int fd = shm.get_mapping_handle().handle;
    ::fchmod(fd, static_cast<mode_t>(mode));  // exactly `mode`, whatever the umask
    // Sized, but no page allocated yet (the file is sparse): each part is reserved below, or by
    // its first user (deferred).
    if (::ftruncate(fd, static_cast<off_t>(total_bytes)) != 0) {
      const int err = errno;
      bip::shared_memory_object::remove(shm_object_name(name).c_str());
      throw Error("cannot size segment '" + std::string(name) + "' (" + path + ") to " + human_bytes(total_bytes) + ": " +
                  std::strerror(err));
    }
    auto mapping = std::make_shared<Mapping>();
    mapping->region = bip::mapped_region(shm, bip::read_write);
    mapping->shm.swap(shm);
    segment.base_ = static_cast<std::byte*>(mapping->region.get_address());
    segment.size_ = mapping->region.get_size();
    segment.mapping_ = mapping;
    segment.name_ = std::string(name);
    segment.writable_ = true;
    advise_huge_pages(segment.base_, segment.size_);
  } catch (const bip::interprocess_exception& e) {
    if (e.get_error_code() == bip::already_exists_error)
      throw Error("segment '" + std::string(name) + "' already exists (" + path +
                  "): use another --name, or remove it with `shmps-ctl destroy " + std::string(name) + "`");
    throw Error("cannot create segment '" + std::string(name) + "' (" + path + "): " + e.what());
  }
  // Reserve every page outside `deferred` now: on tmpfs a full /dev/shm fails here, not as a
  // SIGBUS on first touch in the middle of training.
  try {
    std::vector<ByteRange> skip(deferred.begin(), deferred.end());
    std::sort(skip.begin(), skip.end(), [](const ByteRange& a, const ByteRange& b) { return a.offset < b.offset; });
    const std::uint64_t page = page_bytes();
    std::uint64_t at = 0;
    for (const ByteRange& d : skip) {
      // Only the whole pages inside a deferred range are left: a page it shares with a part
      // reserved here is reserved here.
      const std::uint64_t first = align_up(d.offset, page), last = (d.offset + d.bytes) / page * page;
      if (last <= first || first < at) continue;
      segment.reserve(at, first - at, "its tables");
      at = last;
    }
    if (at < total_bytes) segment.reserve(at, total_bytes - at, "its tables");
  } catch (const Error&) {
    segment = Segment();
    bip::shared_memory_object::remove(shm_object_name(name).c_str());
    throw;
  }
  return segment;
}

Segment Segment::anonymous(std::uint64_t total_bytes) {
  Segment segment;
  auto mapping = std::make_shared<Mapping>();
  mapping->region = bip::anonymous_shared_memory(total_bytes);
  segment.base_ = static_cast<std::byte*>(mapping->region.get_address());
  segment.size_ = mapping->region.get_size();
  segment.mapping_ = mapping;
  segment.name_ = "(anonymous)";
  segment.writable_ = true;
  return segment;
}

void Segment::reserve(std::uint64_t offset, std::uint64_t bytes, std::string_view what) {
  if (bytes == 0) return;
  if (!writable_) throw Error("segment '" + name_ + "' is mapped read-only: cannot reserve " + std::string(what));
  if (offset > size_ || bytes > size_ - offset)
    throw Error("segment '" + name_ + "': " + std::string(what) + " lies outside the segment");
  int err = populate(base_, offset, offset + bytes, MADV_POPULATE_WRITE);
  if (err == EINVAL) {
    // A kernel before 5.14: reserve the blocks instead (the first writes then fault them in).
    const int fd = static_cast<Mapping*>(mapping_.get())->shm.get_mapping_handle().handle;
    err = ::posix_fallocate(fd, static_cast<off_t>(offset), static_cast<off_t>(bytes));
    if (err == 0) return;
    if (err != ENOSPC) {
      throw Error("cannot reserve " + human_bytes(bytes) + " of segment '" + name_ + "' for " + std::string(what) +
                  ": " + std::strerror(err));
    }
  }
  if (err == 0) return;
  // EFAULT: the pages could not be allocated (a write would have raised SIGBUS): no room on the
  // tmpfs. ENOMEM: no memory at all.
  throw Error("cannot reserve " + human_bytes(bytes) + " of segment '" + name_ + "' for " + std::string(what) + " in " +
              std::string(kShmDir) + ": " +
              (err == EFAULT || err == ENOSPC
                   ? std::string("not enough shared memory (make the model or its rings smaller, remove stale segments "
                                 "with shmps-ctl list / destroy, or enlarge /dev/shm)")
                   : std::string(std::strerror(err))));
}

void Segment::prefault_read(std::uint64_t offset, std::uint64_t bytes) const noexcept {
  if (offset >= size_) return;
  (void)populate(base_, offset, std::min(size_, offset + bytes), MADV_POPULATE_READ);
}

Segment Segment::open(std::string_view name, Access access) {
  check_segment_name(name);
  const std::string path = segment_path(name);
  const auto mode = access == Access::read_write ? bip::read_write : bip::read_only;
  refuse_symlink(name, path);
  Segment segment;
  try {
    bip::shared_memory_object shm(bip::open_only, shm_object_name(name).c_str(), mode);
    check_opened(name, path, shm.get_mapping_handle().handle);
    bip::offset_t size = 0;
    if (!shm.get_size(size) || static_cast<std::uint64_t>(size) < sizeof(SegmentHeader))
      throw Error("segment '" + std::string(name) + "' (" + path +
                  ") is too small to be a shmps segment: it is damaged or not shmps's; remove it with `shmps-ctl destroy " +
                  std::string(name) + " --force`");
    auto mapping = std::make_shared<Mapping>();
    mapping->region = bip::mapped_region(shm, mode);
    mapping->shm.swap(shm);
    segment.base_ = static_cast<std::byte*>(mapping->region.get_address());
    segment.size_ = mapping->region.get_size();
    segment.mapping_ = mapping;
    if (access == Access::read_write) advise_huge_pages(segment.base_, segment.size_);
  } catch (const bip::interprocess_exception& e) {
    if (e.get_error_code() == bip::not_found_error)
      throw Error("segment '" + std::string(name) + "' does not exist (no " + path +
                  "): start its server first (shmps-server --spec FILE), or see the running jobs with `shmps-ctl list`");
    if (e.get_error_code() == bip::security_error)
      throw Error("segment '" + std::string(name) + "' (" + path +
                  ") belongs to another user and is not shared with you: run as the job's user, or have its server "
                  "started with --group");
    throw Error("cannot open segment '" + std::string(name) + "' (" + path + "): " + e.what());
  }
  segment.name_ = std::string(name);
  segment.writable_ = access == Access::read_write;

  // A segment still being created is all zeros until its creator writes the header; the caller
  // waits for "ready" and then calls validate().
  if (load_acquire(segment.header().state) != static_cast<std::uint32_t>(SegmentState::creating)) segment.validate();
  return segment;
}

void Segment::validate() const {
  const std::string path = segment_path(name_);
  const SegmentHeader& h = header();
  const std::string who = "segment '" + name_ + "' (" + path + ")";
  if (h.magic != kMagic) {
    throw Error(who + " is not a shmps segment (bad magic): remove it with `shmps-ctl destroy " + name_ + " --force`");
  }
  if (h.layout_version != kLayoutVersion)
    throw Error(who + " has layout version " + std::to_string(h.layout_version) + " but this build uses version " +
                std::to_string(kLayoutVersion) + ": it was made by another shmps version; use that version's tools, or "
                "destroy it with `shmps-ctl destroy " + name_ + "` and start again");
  if (h.fingerprint != kLayoutFingerprint) {
    std::ostringstream out;
    out << who << " has layout fingerprint 0x" << std::hex << h.fingerprint << " but this build has 0x"
        << kLayoutFingerprint << ": it was made by a build with another compiler, Boost or layout; use the same build, "
        << "or destroy it with `shmps-ctl destroy " << name_ << "`";
    throw Error(out.str());
  }
  if (h.total_bytes != size_)
    throw Error(who + " is " + std::to_string(size_) + " bytes but its header says " + std::to_string(h.total_bytes) +
                ": it is damaged; destroy it with `shmps-ctl destroy " + name_ + " --force`");
}

bool Segment::exists(std::string_view name) {
  check_segment_name(name);
  return std::filesystem::exists(segment_path(name));
}

void Segment::remove(std::string_view name) {
  check_segment_name(name);
  // unlink() removes a name, never what a symbolic link points to. In /dev/shm (sticky) only the
  // owner (or root) may remove a file: anyone else gets EPERM, said, and nothing is removed.
  const auto unlink_path = [&](const std::string& path) {
    if (::unlink(path.c_str()) == 0 || errno == ENOENT) return;
    const int err = errno;
    throw Error("cannot remove segment '" + std::string(name) + "': " + path + ": " + std::strerror(err) +
                (err == EPERM || err == EACCES ? " (it belongs to another user: only its owner can remove it)" : ""));
  };
  unlink_path(segment_path(name));
  // A server group's replica has a sync segment beside it (sync_segment.hpp; ".sync" is reserved).
  unlink_path(segment_path(std::string(name) + ".sync"));
  unlink_path(server_lock_path(name));
  unlink_path(slots_lock_path(name));
}

std::int64_t Segment::find_param(std::string_view name) const noexcept {
  const auto& h = header();
  for (std::uint32_t i = 0; i < h.param_count; ++i)
    if (param_name(param(i)) == name) return i;
  return -1;
}

std::string_view param_name(const ParamEntry& p) noexcept { return {p.name, ::strnlen(p.name, kMaxNameBytes)}; }

std::string shape_string(const ParamEntry& p) { return shape_text(std::span<const std::uint64_t>(p.shape, p.ndim)); }

}  // namespace shmps::shm
