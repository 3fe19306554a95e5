// Stand-in for Gloo's context header: see multidevice/comm/gloo_shim/README.md.
#pragma once

#include <chrono>

namespace gloo {

// Only named by inline code of ProcessGroupGloo.hpp that hostfuse never
// instantiates; libtorch owns every Context.
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};

}  // namespace gloo
