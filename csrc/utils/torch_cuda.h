// The one place where hostfuse touches libtorch's CUDA part (device queries,
// the current stream). Everything else asks through these functions, so the
// rest of the code base and every .cu file depends on the CUDA toolkit only.
#pragma once

#include <cuda_runtime_api.h>

namespace hostfuse::cuda {

// True when libtorch was built with CUDA and at least one device is visible.
// False on machines without a GPU, where the CUDA libraries still load.
bool isAvailable();

// Number of visible CUDA devices; 0 when isAvailable() is false.
int deviceCount();

// The current CUDA device of this thread.
int currentDevice();

// libtorch's current stream on `device`, the stream every hostfuse launch
// and copy is ordered on.
cudaStream_t currentStream(int device);

}  // namespace hostfuse::cuda
