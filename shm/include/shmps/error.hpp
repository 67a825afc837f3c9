// The one exception type of shmps. Messages say what was wrong and what to do about it.
#pragma once

#include <stdexcept>

namespace shmps {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace shmps
