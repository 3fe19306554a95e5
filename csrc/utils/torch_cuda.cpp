#include "utils/torch_cuda.h"

#include <ATen/Context.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

namespace hostfuse::cuda {

bool isAvailable() {
  return at::hasCUDA() && c10::cuda::device_count() > 0;
}

int deviceCount() {
  return isAvailable() ? c10::cuda::device_count() : 0;
}

int currentDevice() {
  return c10::cuda::current_device();
}

cudaStream_t currentStream(int device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device))
      .stream();
}

}  // namespace hostfuse::cuda
