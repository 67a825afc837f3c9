// Small helpers the tests share for checking errors and output.
#pragma once

#include <filesystem>
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

inline bool file_exists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::exists(path, ec);
}

}  // namespace shmps::test

// EXPECT that `text` contains `part`, showing the whole text when it does not.
#define EXPECT_HAS(text, part) \
  EXPECT_TRUE(::shmps::test::has(text, part)) << "expected \"" << (part) << "\" in:\n" << (text)
