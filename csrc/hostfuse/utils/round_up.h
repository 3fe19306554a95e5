// Integer rounding shared by host code and CUDA kernels (no dependencies,
// so .cu files can include it).
#pragma once

#include <cstddef>

#if defined(__CUDACC__)
#define HF_HOST_DEVICE __host__ __device__
#else
#define HF_HOST_DEVICE
#endif

namespace hostfuse {

// `value` rounded up to a multiple of `multiple` (> 0).
HF_HOST_DEVICE constexpr size_t roundUp(size_t value, size_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

}  // namespace hostfuse
