// Checked calls into the CUDA runtime and NVRTC. Every call that can fail goes
// through one of these macros, so a failure names the call, the error and the
// place instead of surfacing later as a corrupted result.
//
// This header depends on the CUDA toolkit only (no torch headers), so .cu
// files and driver-level code can use it.
#pragma once

#include <cuda_runtime_api.h>
#include <nvrtc.h>

#include <cstddef>

#include <hostfuse/utils/exceptions.h>
#include <hostfuse/utils/round_up.h>

#define HF_CUDA_CHECK(call)                               \
  do {                                                    \
    const cudaError_t hf_status_ = (call);                \
    if (hf_status_ != cudaSuccess) {                      \
      HF_THROW("CUDA runtime call failed: ", #call, ": ", \
               cudaGetErrorName(hf_status_), " (",        \
               cudaGetErrorString(hf_status_), ")");      \
    }                                                     \
  } while (false)

#define HF_NVRTC_CHECK(call)                       \
  do {                                             \
    const nvrtcResult hf_status_ = (call);         \
    if (hf_status_ != NVRTC_SUCCESS) {             \
      HF_THROW("NVRTC call failed: ", #call, ": ", \
               nvrtcGetErrorString(hf_status_));   \
    }                                              \
  } while (false)

namespace hostfuse::cuda {

// Makes `device` current for the calling thread while alive (with
// `for_driver_calls`, its primary context too, which driver-API calls
// need); restores the previous device.
class DeviceScope {
 public:
  explicit DeviceScope(int device, bool for_driver_calls = false) {
    HF_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      HF_CUDA_CHECK(cudaSetDevice(device));
    }
    if (for_driver_calls) {
      HF_CUDA_CHECK(cudaFree(nullptr));
    }
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace hostfuse::cuda
