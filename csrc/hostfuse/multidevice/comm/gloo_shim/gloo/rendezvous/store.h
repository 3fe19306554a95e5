// Stand-in for Gloo's rendezvous store header: see
// multidevice/comm/gloo_shim/README.md.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace gloo::rendezvous {

// The interface that ProcessGroupGloo::GlooStore overrides. hostfuse never
// creates a GlooStore (libtorch's constructor does), so this class only has
// to let ProcessGroupGloo.hpp parse.
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& value) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) = 0;
};

}  // namespace gloo::rendezvous
