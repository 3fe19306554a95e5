// The kernels' parameter blocks (kernels/dispatch_combine.cuh), filled from
// a workspace's config, launch settings, buffers and one call's tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <hostfuse/multidevice/moe/cuda/buffers.h>
#include <hostfuse/multidevice/moe/cuda/config.h>
#include <hostfuse/multidevice/moe/cuda/workspace.h>
#include <hostfuse/multidevice/moe/cuda/kernels/dispatch_combine.cuh>

namespace hostfuse {

// The kernels' element type of rows of `dtype` (Float, BFloat16 or Half).
moe::ElementType elementType(at::ScalarType dtype);

// What publishing a failure needs (no call's tensors).
moe::CommonParams failureParams(const CudaMoeConfig& config,
                                const CudaMoeLaunch& launch,
                                const CudaMoeBuffers& buffers);

// One dispatch: x [T, H] and topk_idx [T, K] contiguous, weights [T, K]
// contiguous fp32 or undefined; `out` holds the allocated outputs.
moe::DispatchParams dispatchParams(const CudaMoeConfig& config,
                                   const CudaMoeLaunch& launch,
                                   const CudaMoeBuffers& buffers,
                                   const at::Tensor& x, const at::Tensor& idx,
                                   const at::Tensor& weights,
                                   const CudaDispatchResult& out);

// One combine: rows [C, H] contiguous, out [T, H]; weights contiguous fp32
// or undefined: per_pick [T, K] (topk_weights), per_rank [C] (the rows').
moe::CombineParams combineParams(const CudaMoeConfig& config,
                                 const CudaMoeLaunch& launch,
                                 const CudaMoeBuffers& buffers,
                                 const at::Tensor& rows,
                                 const at::Tensor& weights,
                                 const at::Tensor& out, bool per_rank);

}  // namespace hostfuse
