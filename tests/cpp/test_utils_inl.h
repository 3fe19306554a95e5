#pragma once

#include <hostfuse/utils/exceptions.h>

namespace hostfuse::test {

template <typename Fn>
void expectErrorContains(Fn&& fn, const std::vector<std::string>& fragments) {
  try {
    fn();
  } catch (const ::hostfuse::Error& e) {
    const std::string message = e.what();
    for (const std::string& fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "expected the error to mention \"" << fragment
          << "\"; the error was:\n"
          << message;
    }
    return;
  }
  ADD_FAILURE() << "expected a hostfuse::Error, but nothing was thrown";
}

}  // namespace hostfuse::test
