// The only file that includes ProcessGroupGloo.hpp; its include path has
// multidevice/comm/gloo_shim (see the README there).
#include <hostfuse/multidevice/comm/c10d_backends.h>

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

namespace hostfuse {

c10::intrusive_ptr<c10d::Backend> createGlooBackend(
    const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
    std::chrono::milliseconds timeout, bool loopback) {
  c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> options;
  if (loopback) {
    options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(
        c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  } else {
    options = c10d::ProcessGroupGloo::Options::create_default(timeout);
  }
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size,
                                                     std::move(options));
}

}  // namespace hostfuse
