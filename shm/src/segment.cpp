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

std::uint64_t bsp_step_ring_bytes(std::span<const ParamEntry> params) noexcept {
  std::uint64_t step = sizeof(PushRecord), largest = 0;  // the clock record
  for (const auto& p : params) {
    if (p.table_dim != 0) continue;  // a table is pushed by rows, whose size a step does not fix
    step += record_bytes_for(p.size);
    largest = std::max(largest, p.size);
  }
  return step + record_bytes_for(largest);  // slack for the padding record at the wrap
}

LayoutPlan plan_layout(const LayoutRequest& request) {
  if (request.params.empty()) throw Error("a model needs at least one parameter");
  if (request.slice_bytes < kCacheLine || request.slice_bytes % kCacheLine != 0)
    throw Error("slice_bytes must be a positive multiple of 64, got " + std::to_string(request.slice_bytes));
  if (request.max_workers == 0 || request.max_workers > 1024)
    throw Error("max_workers must be between 1 and 1024, got " + std::to_string(request.max_workers));
  if (request.workers_per_group > request.max_workers)
    throw Error("workers_per_group (" + std::to_string(request.workers_per_group) + ") must be at most max_workers (" +
                std::to_string(request.max_workers) + "): a group cannot have more workers than the job has slots");
  if (request.state_arrays > 2) throw Error("at most two optimizer state arrays are supported");
  if (request.redo_entries == 0 || request.redo_entries > 1024) throw Error("redo_entries must be between 1 and 1024");
  if (request.server_groups == 0 || request.server_groups > kMaxServerGroups)
    throw Error("server_groups must be between 1 and " + std::to_string(kMaxServerGroups) + ", got " +
                std::to_string(request.server_groups));
  if (request.server_group >= request.server_groups)
    throw Error("server group " + std::to_string(request.server_group) + " is not below server_groups " +
                std::to_string(request.server_groups));

  LayoutPlan plan;
  plan.slice_floats = request.slice_bytes / sizeof(float);
  plan.max_workers = request.max_workers;
  plan.workers_per_group = request.workers_per_group == 0 ? request.max_workers : request.workers_per_group;
  plan.group_count = (plan.max_workers + plan.workers_per_group - 1) / plan.workers_per_group;
  plan.state_arrays = request.state_arrays;
  plan.state_dtype = request.state_dtype;
  if (static_cast<std::uint32_t>(request.state_dtype) > static_cast<std::uint32_t>(StateDType::bf16))
    throw Error("unknown optimizer state dtype " + std::to_string(static_cast<std::uint32_t>(request.state_dtype)));
  const std::uint64_t state_elem = state_dtype_bytes(request.state_dtype);
  plan.redo_count = request.redo_entries;
  plan.server_group = request.server_group;
  plan.server_groups = request.server_groups;
  const bool sync = request.server_groups > 1;
  // Lazy Adam's row step counts: only a job whose optimizer keeps them and that has a table. A
  // redo entry holds those of one slice: at most slice_floats / (the narrowest table's dim).
  std::uint32_t narrowest_table = 0;
  for (const auto& p : request.params)
    if (p.table_dim != 0 && (narrowest_table == 0 || p.table_dim < narrowest_table)) narrowest_table = p.table_dim;
  const bool row_steps = request.row_steps && narrowest_table != 0;
  std::uint64_t largest = 0;
  std::string largest_name;
  for (const auto& p : request.params) {
    if (p.name.empty() || p.name.size() >= kMaxNameBytes)
      throw Error("parameter name '" + p.name + "' must have 1 to " + std::to_string(kMaxNameBytes - 1) + " characters");
    if (p.shape.empty() || p.shape.size() > kMaxDims)
      throw Error("parameter '" + p.name + "' must have 1 to " + std::to_string(kMaxDims) + " dimensions");
    ParamEntry entry{};
    std::memcpy(entry.name, p.name.data(), p.name.size());
    entry.dtype = p.dtype;
    if (static_cast<std::uint32_t>(p.dtype) > static_cast<std::uint32_t>(DType::fp16))
      throw Error("parameter '" + p.name + "': unknown dtype " + std::to_string(static_cast<std::uint32_t>(p.dtype)));
    if (p.dtype != DType::f32 && sync)
      throw Error("parameter '" + p.name + "' has dtype " + std::string(to_string(p.dtype)) +
                  ", and server groups (" + std::to_string(request.server_groups) +
                  " of them, or several hosts) sync float32 values only: run the job as one server group, or make "
                  "the parameter dtype = \"f32\"");
    entry.ndim = static_cast<std::uint32_t>(p.shape.size());
    entry.init_put = p.init_put ? 1U : 0U;
    entry.table_dim = p.table_dim;
    if (p.table_dim != 0 && (p.shape.size() != 2 || p.shape[1] != p.table_dim))
      throw Error("table '" + p.name + "' must have shape {rows, dim} with dim " + std::to_string(p.table_dim));
    if (p.table_dim != 0 && plan.slice_floats % p.table_dim != 0)
      throw Error("table '" + p.name + "': its rows of " + std::to_string(p.table_dim) +
                  " floats must not straddle slices, but the slices hold " + std::to_string(plan.slice_floats) +
                  " floats (slice_bytes " + std::to_string(request.slice_bytes) +
                  "): make slice_bytes a multiple of 4 x dim");
    std::uint64_t size = 1;
    for (std::size_t d = 0; d < p.shape.size(); ++d) {
      if (p.shape[d] == 0) throw Error("parameter '" + p.name + "' has a zero dimension");
      if (size > (std::uint64_t{1} << 46) / p.shape[d]) throw Error("parameter '" + p.name + "' is too large");
      size *= p.shape[d];
      entry.shape[d] = p.shape[d];
    }
    entry.size = size;
    entry.first_slice = plan.slice_count;
    entry.slice_count = (size + plan.slice_floats - 1) / plan.slice_floats;
    plan.slice_count += entry.slice_count;
    if (size > largest && p.table_dim == 0) {  // a table's pushes are rows, not the table
      largest = size;
      largest_name = p.name;
    }
    plan.params.push_back(entry);
  }

  // The ring (see kMinRingBytes in segment.hpp for the rule and why).
  if (request.ring_bytes != 0) {
    plan.ring_bytes = align_up(request.ring_bytes, kCacheLine);
    plan.ring_rule = "set by ring_bytes";
  } else {
    const std::uint64_t two_pushes = 2 * record_bytes_for(largest);
    // In BSP a ring holds a whole step if that takes at most kMaxAutoRingBytes; bigger steps stream.
    const std::uint64_t whole_step = bsp_step_ring_bytes(plan.params);
    const std::uint64_t step = request.bsp && whole_step <= kMaxAutoRingBytes ? whole_step : 0;
    plan.ring_bytes = std::max({kMinRingBytes, std::min(two_pushes, kMaxAutoRingBytes), step});
    if (plan.ring_bytes == step)
      plan.ring_rule = "automatic: one BSP step (a push of every parameter and the clock record, plus one largest "
                       "record of slack), because the server takes a step only once it has ended";
    else if (plan.ring_bytes == two_pushes)
      plan.ring_rule = "automatic: two pushes of the largest parameter, " + largest_name +
                       " (a push may use at most half a ring)";
    else if (plan.ring_bytes == kMaxAutoRingBytes)
      plan.ring_rule = "automatic: the cap of " + human_bytes(kMaxAutoRingBytes) + " (pushes of " + largest_name +
                       " stream through it in chunks of at most half a ring)";
    else
      plan.ring_rule = "automatic: the minimum of 1 MiB";
  }
  if (plan.ring_bytes < 4 * kCacheLine) throw Error("ring_bytes must be at least 256");
  // Several worker groups each step on their own: one model's worth of step sums serves one step
  // at a time, so their BSP steps cannot stream; each ring must hold a whole step.
  if (request.bsp && plan.group_count > 1 && plan.ring_bytes < bsp_step_ring_bytes(plan.params))
    throw Error("a BSP job with " + std::to_string(plan.group_count) + " worker groups needs rings that hold a whole step (" +
                std::to_string(bsp_step_ring_bytes(plan.params)) + " bytes each; the rings would hold " +
                std::to_string(plan.ring_bytes) + "): set ring_bytes = " + std::to_string(bsp_step_ring_bytes(plan.params)) +
                " (max_workers rings of that size), or run the job as one group (no workers_per_group)");
  plan.ring_stride = sizeof(RingHeader) + plan.ring_bytes;
  // A big ring starts on a huge-page boundary (its worker's pages are then its own huge pages).
  if (plan.ring_stride >= kBigRegionBytes) plan.ring_stride = align_up(plan.ring_stride, kHugePageBytes);
  // A region of kBigRegionBytes or more starts on a huge-page boundary.
  const auto big_region_at = [](std::uint64_t offset, std::uint64_t region_bytes) {
    return region_bytes >= kBigRegionBytes ? align_up(offset, kHugePageBytes) : offset;
  };

  std::uint64_t offset = align_up(sizeof(SegmentHeader), kCacheLine);
  plan.params_offset = offset;
  offset = align_up(offset + plan.params.size() * sizeof(ParamEntry), kCacheLine);
  plan.slices_offset = offset;
  offset += plan.slice_count * sizeof(SliceEntry);
  plan.applied_offset = offset;
  offset = align_up(offset + plan.slice_count * request.max_workers * sizeof(std::uint64_t), kCacheLine);
  plan.redo_offset = offset;
  plan.redo_stride = align_up(sizeof(RedoEntry) + align_up(request.max_workers, 8) * sizeof(std::uint64_t) +
                                  redo_inputs_bytes(request.max_workers) + plan.slice_floats * sizeof(float) +
                                  request.state_arrays * plan.slice_floats * state_elem +
                                  (sync ? plan.slice_floats * sizeof(float) : 0) +  // sync_take: the fresh values
                                  (row_steps ? plan.slice_floats / narrowest_table * sizeof(std::uint64_t) : 0),  // row steps
                              kCacheLine);
  offset += request.redo_entries * plan.redo_stride;
  plan.param_stats_offset = offset;
  offset += plan.params.size() * sizeof(ParamStats);
  plan.rejected_offset = offset;
  plan.rejected_stride = align_up(plan.params.size() * sizeof(std::uint64_t), kCacheLine);
  offset += request.max_workers * plan.rejected_stride;
  plan.groups_offset = offset;
  offset += plan.group_count * sizeof(GroupEntry);
  plan.slots_offset = offset;
  offset += request.max_workers * sizeof(WorkerSlot);
  const std::uint64_t rings_bytes = request.max_workers * plan.ring_stride;
  plan.rings_offset = big_region_at(offset, rings_bytes);
  offset = plan.rings_offset + rings_bytes;

  // The values, each parameter in its dtype; and the same parameters as float32 (f32_offset, for
  // the step sums and the sync arrays, which hold float32 whatever the dtype).
  std::uint64_t values_bytes = 0, f32_bytes = 0;
  for (auto& entry : plan.params) {
    values_bytes += align_up(entry.size * dtype_bytes(entry.dtype), kCacheLine);
    entry.f32_offset = f32_bytes;
    f32_bytes += align_up(entry.size * sizeof(float), kCacheLine);
  }
  // Values start on a page so that big parameters can be backed by whole pages.
  offset = big_region_at(align_up(offset, 4096), values_bytes);
  plan.values_offset = offset;
  for (auto& entry : plan.params) {
    entry.values_offset = offset;
    offset += align_up(entry.size * dtype_bytes(entry.dtype), kCacheLine);
  }
  std::uint64_t state_array_bytes = 0;  // one state array of every parameter
  for (const auto& entry : plan.params) state_array_bytes += align_up(entry.size * state_elem, kCacheLine);
  offset = big_region_at(align_up(offset, 4096), request.state_arrays * state_array_bytes);
  plan.state_offset = offset;
  for (std::uint32_t a = 0; a < request.state_arrays; ++a) {
    for (auto& entry : plan.params) {
      entry.state_offset[a] = offset;
      offset += align_up(entry.size * state_elem, kCacheLine);
    }
  }
  std::uint64_t last_region = request.state_arrays != 0 ? request.state_arrays * state_array_bytes : values_bytes;
  // Lazy Adam on tables: each table's rows' step counts.
  if (row_steps) {
    std::uint64_t row_steps_bytes = 0;
    for (const auto& entry : plan.params)
      if (entry.table_dim != 0) row_steps_bytes += align_up(entry.shape[0] * sizeof(std::uint64_t), kCacheLine);
    offset = big_region_at(align_up(offset, 4096), row_steps_bytes);
    for (auto& entry : plan.params) {
      if (entry.table_dim == 0) continue;
      entry.row_steps_offset = offset;
      offset += align_up(entry.shape[0] * sizeof(std::uint64_t), kCacheLine);
    }
    last_region = row_steps_bytes;
  }
  // A BSP job whose rings cannot hold a step: the step's pushes stream into one model's worth of
  // sums, float32 whatever the state dtype (they are gradients). (An ASP or SSP job pays nothing
  // for it; switched to BSP live, its steps must fit its rings, bsp_ring_note.)
  if (request.bsp && plan.ring_bytes < bsp_step_ring_bytes(plan.params)) {
    for (const auto& entry : plan.params)
      if (entry.table_dim != 0)
        throw Error("a BSP job with a table (" + std::string(entry.name) + ") needs rings that hold a whole step: set "
                    "ring_bytes to at least " + std::to_string(bsp_step_ring_bytes(plan.params)) +
                    " plus the bytes of a step's push_rows (steps that stream through the rings are summed densely, "
                    "which a table's rows are not)");
    offset = big_region_at(align_up(offset, 4096), f32_bytes);
    plan.step_sums_offset = offset;
    plan.step_sums_bytes = f32_bytes;
    offset += f32_bytes;
    last_region = f32_bytes;
  }
  // Server groups: per slice its sync state and the home's exactly-once row, then a slice's
  // values at its last sync and its delta in flight, each laid out as the values are.
  if (sync) {
    offset = align_up(offset, 4096);
    const std::uint64_t tables_start = offset;
    plan.sync_offset = offset;
    offset = align_up(offset + plan.slice_count * sizeof(SyncSlice), kCacheLine);
    plan.sync_applied_offset = offset;
    offset = align_up(offset + plan.slice_count * request.server_groups * sizeof(std::uint64_t), kCacheLine);
    offset = big_region_at(align_up(offset, 4096), f32_bytes);
    plan.sync_base_offset = offset;
    offset += f32_bytes;
    offset = big_region_at(align_up(offset, 4096), f32_bytes);
    plan.sync_sent_offset = offset;
    offset += f32_bytes;
    plan.sync_bytes = offset - tables_start;
    last_region = f32_bytes;
  }
  // A big last region ends on a huge-page boundary too (huge=within_size makes a huge page only
  // where the file covers it whole).
  plan.total_bytes = last_region >= kBigRegionBytes ? align_up(offset, kHugePageBytes) : align_up(offset, 4096);
  return plan;
}

LayoutPlan plan_of(const Segment& segment) {
  const SegmentHeader& h = segment.header();
  LayoutPlan plan;
  plan.slice_floats = h.slice_floats;
  plan.slice_count = h.slice_count;
  plan.max_workers = h.max_workers;
  plan.workers_per_group = h.workers_per_group;
  plan.group_count = h.group_count;
  plan.state_arrays = h.state_arrays;
  plan.state_dtype = h.optimizer.state_dtype;
  plan.redo_count = h.redo_count;
  plan.ring_bytes = h.ring_bytes;
  plan.ring_stride = h.ring_stride;
  plan.params_offset = h.params_offset;
  plan.slices_offset = h.slices_offset;
  plan.applied_offset = h.applied_offset;
  plan.slots_offset = h.slots_offset;
  plan.rings_offset = h.rings_offset;
  plan.values_offset = h.values_offset;
  plan.state_offset = h.state_offset;
  plan.total_bytes = h.total_bytes;
  plan.redo_offset = h.redo_offset;
  plan.redo_stride = h.redo_stride;
  plan.param_stats_offset = h.param_stats_offset;
  plan.rejected_offset = h.rejected_offset;
  plan.rejected_stride = h.rejected_stride;
  plan.groups_offset = h.groups_offset;
  plan.step_sums_offset = h.step_sums_offset;
  plan.step_sums_bytes = h.step_sums_bytes;
  plan.server_group = h.server_group;
  plan.server_groups = h.server_groups;
  plan.sync_offset = h.sync_offset;
  plan.sync_applied_offset = h.sync_applied_offset;
  plan.sync_base_offset = h.sync_base_offset;
  plan.sync_sent_offset = h.sync_sent_offset;
  if (h.sync_offset != 0) {
    std::uint64_t values_bytes = 0;
    for (std::uint32_t i = 0; i < h.param_count; ++i) values_bytes += align_up(segment.param(i).size * sizeof(float), kCacheLine);
    plan.sync_bytes = h.sync_sent_offset + values_bytes - h.sync_offset;
  }
  for (std::uint32_t i = 0; i < h.param_count; ++i) plan.params.push_back(segment.param(i));
  return plan;
}

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
