// Creating, opening and validating segments; names; room in /dev/shm.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdint>
#include <filesystem>
#include <vector>

#include <shmps/error.hpp>
#include <shmps/shm/atomics.hpp>
#include <shmps/shm/names.hpp>
#include <shmps/shm/segment.hpp>

#include "../support/expect.hpp"

using namespace shmps::shm;

using shmps::test::error_of;

namespace {
std::string unique(const std::string& tag) { return "t-" + tag + "-" + std::to_string(getpid()); }

struct Cleanup {
  std::string name;
  ~Cleanup() { Segment::remove(name); }
};

// Pages of [offset, offset + bytes) that are allocated in /dev/shm, whoever allocated them
// (mincore on a file mapping reports the file's pages, not this process's page tables).
std::size_t resident_pages(const Segment& s, std::uint64_t offset, std::uint64_t bytes) {
  const std::uint64_t page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> in((bytes + page - 1) / page);
  if (::mincore(const_cast<std::byte*>(s.base()) + offset, bytes, in.data()) != 0) return SIZE_MAX;
  std::size_t n = 0;
  for (unsigned char c : in) n += c & 1U;
  return n;
}

}  // namespace

TEST(Names, ValidAndInvalid) {
  EXPECT_EQ(segment_name_problem("mlp"), "");
  EXPECT_EQ(segment_name_problem("job-1.run_2"), "");
  EXPECT_NE(segment_name_problem("a/b").find("contains '/'"), std::string::npos);
  EXPECT_NE(segment_name_problem("").find("empty"), std::string::npos);
  EXPECT_NE(segment_name_problem(".hidden").find("starts with '.'"), std::string::npos);
  EXPECT_NE(segment_name_problem("x.lock").find(".lock"), std::string::npos);
  EXPECT_NE(segment_name_problem(std::string(64, 'a')).find("too long"), std::string::npos);
  EXPECT_NE(segment_name_problem("a b").find("' '"), std::string::npos);
  EXPECT_EQ(segment_path("mlp"), "/dev/shm/shmps.mlp");
}

TEST(Segment, CreateIsExclusiveAndPrivate) {
  Cleanup c{unique("create")};
  Segment s = Segment::create(c.name, 1 << 20);
  EXPECT_EQ(s.size(), 1u << 20);
  struct stat st {};
  ASSERT_EQ(::stat(segment_path(c.name).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_GE(static_cast<std::uint64_t>(st.st_blocks) * 512, 1u << 20);  // pre-allocated
  EXPECT_NE(error_of([&] { Segment::create(c.name, 1 << 20); }).find("already exists"), std::string::npos);
}

TEST(Segment, DeferredPagesAreLeftToTheirFirstUserWhoReservesThem) {
  Cleanup c{unique("defer")};
  constexpr std::uint64_t kPage = 4096, kTotal = 64 * kPage;
  ASSERT_EQ(static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE)), kPage);
  // Two deferred ranges; the second one not page aligned: the pages it shares stay reserved.
  const ByteRange deferred[] = {{8 * kPage, 16 * kPage}, {40 * kPage + 100, 10 * kPage}};
  Segment s = Segment::create(c.name, kTotal, 0600, deferred);
  Segment view = Segment::open(c.name, Access::read_only);
  EXPECT_EQ(resident_pages(view, 0, 8 * kPage), 8u);
  EXPECT_EQ(resident_pages(view, 8 * kPage, 16 * kPage), 0u);  // nobody allocated them
  EXPECT_EQ(resident_pages(view, 24 * kPage, 16 * kPage), 16u);
  EXPECT_EQ(resident_pages(view, 40 * kPage, kPage), 1u);        // shared with a reserved part
  EXPECT_EQ(resident_pages(view, 41 * kPage, 9 * kPage), 0u);
  EXPECT_EQ(resident_pages(view, 50 * kPage, 14 * kPage), 14u);
  struct stat st {};
  ASSERT_EQ(::stat(segment_path(c.name).c_str(), &st), 0);
  EXPECT_EQ(static_cast<std::uint64_t>(st.st_blocks) * 512, (64 - 16 - 9) * kPage);
  // Their first user reserves them: now allocated, and mapped in its process.
  s.reserve(8 * kPage, 16 * kPage, "a test range");
  EXPECT_EQ(resident_pages(view, 8 * kPage, 16 * kPage), 16u);
  EXPECT_EQ(resident_pages(view, 41 * kPage, 9 * kPage), 0u);
  // Prefaulting reserved pages for reading changes nothing in the file.
  view.prefault_read(0, 40 * kPage);
  EXPECT_EQ(resident_pages(view, 41 * kPage, 9 * kPage), 0u);
  ASSERT_EQ(::stat(segment_path(c.name).c_str(), &st), 0);
  EXPECT_EQ(static_cast<std::uint64_t>(st.st_blocks) * 512, (64 - 9) * kPage);
  // A read-only mapping cannot reserve; a range outside the segment is refused.
  EXPECT_NE(error_of([&] { view.reserve(41 * kPage, kPage, "x"); }).find("read-only"), std::string::npos);
  EXPECT_NE(error_of([&] { s.reserve(kTotal - kPage, 2 * kPage, "x"); }).find("outside"), std::string::npos);
}

TEST(Segment, OpeningChecksLayout) {
  Cleanup c{unique("open")};
  {
    Segment s = Segment::create(c.name, 1 << 16);
    // Still "creating" (all zeros): open returns it unvalidated.
    Segment early = Segment::open(c.name, Access::read_only);
    EXPECT_EQ(load_acquire(early.header().state), 0u);
    auto& h = s.header();
    h.magic = kMagic;
    h.layout_version = kLayoutVersion + 98;
    h.fingerprint = kLayoutFingerprint;
    h.total_bytes = 1 << 16;
    store_release(h.state, static_cast<std::uint32_t>(SegmentState::ready));
  }
  EXPECT_NE(error_of([&] { Segment::open(c.name, Access::read_only); }).find("layout version " + std::to_string(kLayoutVersion + 98)),
            std::string::npos);
  EXPECT_THROW(Segment::open(c.name, Access::read_write), shmps::Error);  // read-write is checked too
}

TEST(Segment, FingerprintAndSizeMismatchesAreRefused) {
  Cleanup c{unique("fp")};
  {
    Segment s = Segment::create(c.name, 1 << 16);
    auto& h = s.header();
    h.magic = kMagic;
    h.layout_version = kLayoutVersion;
    h.fingerprint = kLayoutFingerprint ^ 1;
    h.total_bytes = 1 << 16;
    store_release(h.state, static_cast<std::uint32_t>(SegmentState::ready));
  }
  EXPECT_NE(error_of([&] { Segment::open(c.name, Access::read_only); }).find("fingerprint"), std::string::npos);
  // Fix the fingerprint, and make the file larger than the size its header records.
  ::truncate(segment_path(c.name).c_str(), 1 << 17);  // the file grew: not the size it was made with
  {
    int fd = ::open(segment_path(c.name).c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    const std::uint64_t good = kLayoutFingerprint;
    ASSERT_EQ(::pwrite(fd, &good, sizeof good, offsetof(SegmentHeader, fingerprint)), static_cast<ssize_t>(sizeof good));
    ::close(fd);
  }
  const std::string msg = error_of([&] { Segment::open(c.name, Access::read_only); });
  EXPECT_NE(msg.find("header says"), std::string::npos) << msg;
}

TEST(Segment, MissingSegmentSaysHowToStartOne) {
  const std::string msg = error_of([] { Segment::open("t-does-not-exist-xyz", Access::read_only); });
  EXPECT_NE(msg.find("does not exist"), std::string::npos);
  EXPECT_NE(msg.find("shmps-server"), std::string::npos);
}

TEST(Segment, TooLargeForDevShmIsRefusedAndCreatesNothing) {
  const std::string name = unique("huge");
  const std::string msg = error_of([&] { Segment::create(name, std::uint64_t{1} << 50); });
  EXPECT_NE(msg.find("/dev/shm has only"), std::string::npos) << msg;
  EXPECT_FALSE(std::filesystem::exists(segment_path(name)));
}

TEST(Segment, ReadOnlyMappingCannotBeWritten) {
  Cleanup c{unique("ro")};
  Segment::create(c.name, 1 << 16);
  Segment ro = Segment::open(c.name, Access::read_only);
  EXPECT_FALSE(ro.writable());
  // Writing through a read-only mapping faults: prove it in a child process.
  const pid_t pid = fork();
  if (pid == 0) {
    ::signal(SIGSEGV, SIG_DFL);  // a sanitizer's handler would turn the fault into an exit code
    const_cast<std::byte*>(static_cast<const Segment&>(ro).base())[100] = std::byte{1};
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV);
}
