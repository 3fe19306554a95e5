// CUDA-event timing shared by the benchmarks.
#pragma once

#include <cuda_runtime_api.h>

#include <functional>

#include <hostfuse/utils/cuda_utils.h>

namespace hostfuse::bench {

// Mean microseconds per call of `calls` back-to-back calls of `fn`, from
// CUDA events recorded on `stream` around them (waits for the last one).
inline double eventTimeUs(cudaStream_t stream, int calls,
                          const std::function<void()>& fn) {
  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
  HF_CUDA_CHECK(cudaEventCreate(&start));
  HF_CUDA_CHECK(cudaEventCreate(&stop));
  HF_CUDA_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < calls; ++i) {
    fn();
  }
  HF_CUDA_CHECK(cudaEventRecord(stop, stream));
  HF_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.0f;
  HF_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  HF_CUDA_CHECK(cudaEventDestroy(start));
  HF_CUDA_CHECK(cudaEventDestroy(stop));
  return 1000.0 * ms / calls;
}

}  // namespace hostfuse::bench
