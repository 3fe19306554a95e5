// The only file that includes ProcessGroupNCCL.hpp (and so <nccl.h>);
// HOSTFUSE_HAS_NCCL is set when cmake found nccl.h.
#include <hostfuse/multidevice/comm/c10d_backends.h>

#include <hostfuse/utils/exceptions.h>

#ifdef HOSTFUSE_HAS_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace hostfuse {

bool isNcclBuilt() {
#ifdef HOSTFUSE_HAS_NCCL
  return true;
#else
  return false;
#endif
}

c10::intrusive_ptr<c10d::Backend> createNcclBackend(
    [[maybe_unused]] const c10::intrusive_ptr<c10d::Store>& store,
    [[maybe_unused]] int rank, [[maybe_unused]] int size,
    [[maybe_unused]] std::chrono::milliseconds timeout,
    [[maybe_unused]] const at::Device& device) {
#ifdef HOSTFUSE_HAS_NCCL
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  c10::intrusive_ptr<c10d::Backend> backend =
      c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size,
                                                  std::move(options));
  // Binding the device lets barrier() and communicator creation use this
  // rank's GPU instead of guessing it from the rank.
  backend->setBoundDeviceId(device);
  return backend;
#else
  HF_THROW(
      "hostfuse was built without nccl.h, so it cannot communicate CUDA "
      "tensors; rebuild where the NCCL headers are found (see "
      "cmake/HostfuseMultidevice.cmake)");
#endif
}

}  // namespace hostfuse
