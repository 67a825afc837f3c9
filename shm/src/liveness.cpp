#include "shmps/shm/liveness.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include <shmps/error.hpp>

namespace shmps::shm {

namespace {
struct flock byte_lock(short type, unsigned byte) {
  struct flock lock {};
  lock.l_type = type;
  lock.l_whence = SEEK_SET;
  lock.l_start = static_cast<off_t>(byte);
  lock.l_len = 1;
  lock.l_pid = 0;  // required by OFD locks
  return lock;
}
}  // namespace

namespace {
// What a lock file opened without following symbolic links (O_NOFOLLOW) must be: a regular file,
// and one nobody else can have put there for us: ours (the server, which creates them), or at
// least not writable by every user (a worker of a job shared with --group opens its owner's).
// Throws shmps::Error naming the file.
void check_lock_file(int fd, const std::string& path, bool must_be_ours) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw Error("cannot stat lock file " + path + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    throw Error("lock file " + path + " is not a regular file: refusing to use it (shmps makes only regular files "
                "there; remove it)");
  if (must_be_ours && st.st_uid != ::geteuid())
    throw Error("lock file " + path + " belongs to another user (uid " + std::to_string(st.st_uid) + ", not " +
                std::to_string(::geteuid()) + "): refusing to use it (someone else made it; remove it, or run the "
                "server as that user)");
  if ((st.st_mode & S_IWOTH) != 0 && st.st_uid != ::geteuid())
    throw Error("lock file " + path + " belongs to another user and is writable by every user: refusing to use it "
                "(shmps makes lock files 0600 or 0660; remove it)");
}

[[noreturn]] void throw_open_error(const std::string& path, int err) {
  struct stat st {};
  if (err == ELOOP || (::lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode)))
    throw Error("lock file " + path + " is a symbolic link: refusing to follow it (shmps never makes one; someone "
                "else may have put it there to redirect the server's writes; remove it)");
  if (err == EACCES)
    throw Error("cannot open lock file " + path + ": permission denied (it belongs to another user or group; run as "
                "the job's user, or have the server widen access with --group)");
  if (err == ENOENT) throw Error("lock file " + path + " does not exist: is the server for this segment running?");
  throw Error("cannot open lock file " + path + ": " + std::strerror(err));
}
}  // namespace

LockFile LockFile::open(const std::string& path, bool create, unsigned mode) {
  LockFile file;
  const int flags = O_RDWR | O_CLOEXEC | O_NOFOLLOW | (create ? O_CREAT : 0);
  file.fd_ = ::open(path.c_str(), flags, static_cast<mode_t>(mode));
  if (file.fd_ < 0) throw_open_error(path, errno);
  check_lock_file(file.fd_, path, create);  // on a throw, the destructor closes it
  if (create) ::fchmod(file.fd_, static_cast<mode_t>(mode));  // the umask must not widen or narrow it
  file.path_ = path;
  return file;
}

LockFile LockFile::open_for_probe(const std::string& path) {
  LockFile file;
  file.fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (file.fd_ < 0) throw_open_error(path, errno);
  check_lock_file(file.fd_, path, false);
  file.path_ = path;
  return file;
}

LockFile::~LockFile() {
  if (fd_ >= 0) ::close(fd_);
}

LockFile::LockFile(LockFile&& other) noexcept : fd_(std::exchange(other.fd_, -1)), path_(std::move(other.path_)) {}

LockFile& LockFile::operator=(LockFile&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
  }
  return *this;
}

bool LockFile::try_lock(unsigned byte) {
  struct flock lock = byte_lock(F_WRLCK, byte);
  if (::fcntl(fd_, F_OFD_SETLK, &lock) == 0) return true;
  if (errno == EAGAIN || errno == EACCES) return false;
  throw Error("cannot lock byte " + std::to_string(byte) + " of " + path_ + ": " + std::strerror(errno));
}

void LockFile::unlock(unsigned byte) {
  struct flock lock = byte_lock(F_UNLCK, byte);
  ::fcntl(fd_, F_OFD_SETLK, &lock);
}

void LockFile::forget_after_fork() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Holder LockFile::probe(unsigned byte) const {
  struct flock lock = byte_lock(F_WRLCK, byte);
  if (::fcntl(fd_, F_OFD_GETLK, &lock) != 0)
    throw Error("cannot probe byte " + std::to_string(byte) + " of " + path_ + ": " + std::strerror(errno));
  return lock.l_type == F_UNLCK ? Holder::none : Holder::alive;
}

}  // namespace shmps::shm
