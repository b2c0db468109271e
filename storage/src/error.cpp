#include "csaq/storage/error.h"

#include <cstring>

namespace csaq {

std::string errno_str(int err) {
  char buf[256];
  // GNU strerror_r returns the message pointer (which may or may not be buf).
  const char* msg = strerror_r(err, buf, sizeof(buf));
  return msg;
}

namespace detail {
void assert_failed(const char* expr, const char* file, int line, const std::string& msg) {
  throw Error(cat("internal error: ", expr, " failed at ", file, ":", line,
                  msg.empty() ? "" : ": ", msg));
}
}  // namespace detail

}  // namespace csaq
