#include <hostfuse/utils/exceptions.h>

#include <cstring>

namespace hostfuse::detail {

namespace {

std::string compose(const char* file, int line, const char* condition,
                    const std::string& message) {
  // Only the file name: full build paths make messages hard to read.
  const char* base = std::strrchr(file, '/');
  std::ostringstream ss;
  ss << message;
  if (condition != nullptr) {
    ss << "\n  check failed: " << condition;
  }
  ss << "\n  at " << (base != nullptr ? base + 1 : file) << ":" << line;
  return ss.str();
}

}  // namespace

// A user error says what was wrong with the call; the C++ condition that
// caught it would only be noise to the caller, so only the place is kept
// (for bug reports).
void throwError(const char* file, int line, const char* /*condition*/,
                const std::string& message) {
  throw Error(compose(file, line, nullptr, message));
}

void throwInternalError(const char* file, int line, const char* condition,
                        const std::string& message) {
  throw InternalError("hostfuse internal error (please report): " +
                      compose(file, line, condition, message));
}

}  // namespace hostfuse::detail
