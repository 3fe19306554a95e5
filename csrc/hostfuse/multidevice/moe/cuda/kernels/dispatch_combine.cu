// Kernel set-up shared by the dispatch and combine kernels (dispatch.cu,
// combine.cu).
#include <climits>

#include <hostfuse/multidevice/moe/cuda/kernels/device_utils.cuh>

namespace hostfuse::moe {

cudaError_t prepareKernels(int device, int num_experts, ElementType dtype,
                           int* max_blocks) {
  *max_blocks = 0;
  int sms = 0;
  cudaError_t status =
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) {
    return status;
  }
  int dispatch_per_sm = 0;
  status =
      dispatchOccupancy(dispatchSharedBytes(num_experts), &dispatch_per_sm);
  if (status != cudaSuccess) {
    return status;
  }
  int combine_per_sm = 0;
  status = combineOccupancy(dtype, &combine_per_sm);
  if (status != cudaSuccess) {
    return status;
  }
  const int per_sm =
      dispatch_per_sm < combine_per_sm ? dispatch_per_sm : combine_per_sm;
  // Cooperative launches need every block resident; one block per SM is
  // also what the kernels are tuned for.
  *max_blocks = (per_sm < 1 ? per_sm : 1) * sms;
  return cudaSuccess;
}

namespace {

__global__ void publishFailureKernel(const CommonParams c, int32_t reason) {
  device::publishFailure(device::waitContextOf(c, 0, 0), reason);
}

}  // namespace

cudaError_t launchPublishFailure(const CommonParams& common, int32_t reason,
                                 cudaStream_t stream) {
  publishFailureKernel<<<1, 1, 0, stream>>>(common, reason);
  return cudaGetLastError();
}

}  // namespace hostfuse::moe
