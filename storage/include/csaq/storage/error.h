// The project's one error type and the check macros that raise it.
//
// Errors that a user can cause (bad files, bad options, a failing rank) are thrown as
// csaq::Error with a message that names the file, tensor, key or rank at fault. Broken
// internal invariants use CSAQ_ASSERT, whose message adds the source location.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace csaq {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
[[noreturn]] void assert_failed(const char* expr, const char* file, int line, const std::string& msg);
}  // namespace detail

// Formats a shape or any iterable of integers as "[a, b, c]".
template <typename Seq>
std::string shape_str(const Seq& seq) {
  std::ostringstream out;
  out << '[';
  bool first = true;
  for (const auto& v : seq) {
    out << (first ? "" : ", ") << v;
    first = false;
  }
  out << ']';
  return out.str();
}

// errno's text, for messages about failed system calls.
std::string errno_str(int err);

}  // namespace csaq

#define CSAQ_FAIL(...) throw ::csaq::Error(::csaq::detail::cat(__VA_ARGS__))

#define CSAQ_CHECK(cond, ...)   \
  do {                          \
    if (!(cond)) {              \
      CSAQ_FAIL(__VA_ARGS__);   \
    }                           \
  } while (0)

#define CSAQ_ASSERT(cond, ...)                                                          \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      ::csaq::detail::assert_failed(#cond, __FILE__, __LINE__,                          \
                                    ::csaq::detail::cat("" __VA_OPT__(, ) __VA_ARGS__)); \
    }                                                                                   \
  } while (0)
