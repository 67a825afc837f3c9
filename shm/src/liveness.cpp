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

LockFile LockFile::open(const std::string& path, bool create, unsigned mode) {
  LockFile file;
  const int flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0);
  file.fd_ = ::open(path.c_str(), flags, static_cast<mode_t>(mode));
  if (file.fd_ < 0) {
    const int err = errno;
    if (err == EACCES)
      throw Error("cannot open lock file " + path + ": permission denied (it belongs to another user or group; run as "
                  "the job's user, or have the server widen access with --group)");
    if (err == ENOENT) throw Error("lock file " + path + " does not exist: is the server for this segment running?");
    throw Error("cannot open lock file " + path + ": " + std::strerror(err));
  }
  if (create) ::fchmod(file.fd_, static_cast<mode_t>(mode));  // the umask must not widen or narrow it
  file.path_ = path;
  return file;
}

LockFile LockFile::open_for_probe(const std::string& path) {
  LockFile file;
  file.fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (file.fd_ < 0) throw Error("cannot open lock file " + path + ": " + std::strerror(errno));
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
