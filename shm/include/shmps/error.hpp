// The one exception type of shmps. Messages say what was wrong and what to do about it.
#pragma once

#include <stdexcept>

namespace shmps {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Thrown by a Worker call whose wait the process's interrupt check stopped (see
// set_interrupt_check in <shmps/worker.hpp>): it changed no more than a timeout would have.
class Interrupted : public Error {
 public:
  using Error::Error;
};

}  // namespace shmps
