// Small helpers the tests share for checking errors and output.
#pragma once

#include <string>

#include <shmps/error.hpp>

namespace shmps::test {

// The message of the shmps::Error that `f` throws, or "(no error)".
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

inline bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace shmps::test
