// Death from the kernel (ARCHITECTURE.md rule 4): a process holds an open-file-description (OFD) lock
// on a byte of a lock file for its whole life; the kernel drops it when the process dies, however
// it dies. Whoever then finds the byte unlocked knows the holder is gone. A heartbeat only ever
// makes a process "suspect".
//
//   <dir>/shmps.<name>.server.lock   byte 0: the server
//   <dir>/shmps.<name>.slots.lock    byte r: the worker holding slot r
//
// Lock files are opened O_CLOEXEC so a child started with exec does not inherit the lock.
#pragma once

#include <string>

namespace shmps::shm {

// What a probe of a lock byte proves (LMDB's mdb_reader_pid contract, minus "error", which
// throws): nobody holds it (the last holder, if any, is certainly dead), or somebody does.
enum class Holder { none, alive };

class LockFile {
 public:
  // Opens (creating with `mode` if `create`) the lock file. Throws shmps::Error.
  static LockFile open(const std::string& path, bool create, unsigned mode = 0600);
  // Opens an existing lock file read-only, for probe() only (tools that must not write).
  static LockFile open_for_probe(const std::string& path);
  LockFile() = default;
  ~LockFile();
  LockFile(LockFile&& other) noexcept;
  LockFile& operator=(LockFile&& other) noexcept;
  LockFile(const LockFile&) = delete;
  LockFile& operator=(const LockFile&) = delete;

  // Takes an exclusive lock on `byte` without waiting; false if another holder has it.
  bool try_lock(unsigned byte);
  void unlock(unsigned byte);
  // Whether a lock held by another open file description covers `byte`. Never takes the lock.
  Holder probe(unsigned byte) const;

  // In a child after fork(): drops this process's reference to the lock's open file description
  // without unlocking it (an OFD lock belongs to the description, which the parent shares: an
  // unlock here would release the parent's lock, and keeping the reference would keep the lock
  // alive after the parent dies). Async-signal-safe.
  void forget_after_fork() noexcept;

  bool is_open() const noexcept { return fd_ >= 0; }
  const std::string& path() const noexcept { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

}  // namespace shmps::shm
