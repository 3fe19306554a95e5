// Error reporting for hostfuse.
//
// Two kinds of failure, two macros:
//   HF_CHECK(cond, ...)  something a user can get wrong (a bad argument, a bad
//                        input tensor). The message names the argument and
//                        shows the expected and the actual value. Throws
//                        hostfuse::Error.
//   HF_ERROR(cond, ...)  a broken internal invariant: a bug in hostfuse, not
//                        in the caller's program. Throws
//                        hostfuse::InternalError.
// The _EQ/_NE/_LT/_LE/_GT/_GE forms print both sides.
//
// Message pieces are streamed with operator<<, so any printable value works:
//   HF_CHECK(dim < rank, "reduction dim ", dim, " is out of range for rank ",
//            rank, " tensor ", tv->toString());
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace hostfuse {

// A user error: the program or its inputs are wrong.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A hostfuse bug: an invariant that should hold for every valid program.
class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

namespace detail {

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream ss;
  (ss << ... << args);
  return ss.str();
}

[[noreturn]] void throwError(const char* file, int line, const char* condition,
                             const std::string& message);
[[noreturn]] void throwInternalError(const char* file, int line,
                                     const char* condition,
                                     const std::string& message);

}  // namespace detail

// Concatenates printable values into one string.
template <typename... Args>
std::string toString(const Args&... args) {
  return detail::concat(args...);
}

}  // namespace hostfuse

#define HF_CHECK(cond, ...)                                              \
  do {                                                                   \
    if (!(cond)) {                                                       \
      ::hostfuse::detail::throwError(__FILE__, __LINE__, #cond,          \
                                     ::hostfuse::toString(__VA_ARGS__)); \
    }                                                                    \
  } while (false)

#define HF_ERROR(cond, ...)                                              \
  do {                                                                   \
    if (!(cond)) {                                                       \
      ::hostfuse::detail::throwInternalError(                            \
          __FILE__, __LINE__, #cond, ::hostfuse::toString(__VA_ARGS__)); \
    }                                                                    \
  } while (false)

// Unconditional user error.
#define HF_THROW(...)                                         \
  ::hostfuse::detail::throwError(__FILE__, __LINE__, nullptr, \
                                 ::hostfuse::toString(__VA_ARGS__))

#define HF_CHECK_OP_(op, a, b, ...)                                        \
  do {                                                                     \
    const auto& hf_lhs_ = (a);                                             \
    const auto& hf_rhs_ = (b);                                             \
    if (!(hf_lhs_ op hf_rhs_)) {                                           \
      ::hostfuse::detail::throwError(                                      \
          __FILE__, __LINE__, #a " " #op " " #b,                           \
          ::hostfuse::toString(__VA_ARGS__ __VA_OPT__(, ) " (", #a, " = ", \
                               hf_lhs_, ", ", #b, " = ", hf_rhs_, ")"));   \
    }                                                                      \
  } while (false)

#define HF_CHECK_EQ(a, b, ...) HF_CHECK_OP_(==, a, b, __VA_ARGS__)
#define HF_CHECK_NE(a, b, ...) HF_CHECK_OP_(!=, a, b, __VA_ARGS__)
#define HF_CHECK_LT(a, b, ...) HF_CHECK_OP_(<, a, b, __VA_ARGS__)
#define HF_CHECK_LE(a, b, ...) HF_CHECK_OP_(<=, a, b, __VA_ARGS__)
#define HF_CHECK_GT(a, b, ...) HF_CHECK_OP_(>, a, b, __VA_ARGS__)
#define HF_CHECK_GE(a, b, ...) HF_CHECK_OP_(>=, a, b, __VA_ARGS__)
