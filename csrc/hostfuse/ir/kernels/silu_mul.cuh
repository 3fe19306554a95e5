// silu(gate) * up as the grouped GEMM's epilogue computes it, shared by
// every kernel that applies it so that they give the same bits. CUDA only.
#pragma once

#include <cuda_bf16.h>

namespace hostfuse::kernels {

// silu(g) * u of the bf16 roundings of g and u, in fp32, as the separate
// activation computes it (hf_silu of the fusion kernels, then a multiply).
__device__ __forceinline__ float siluMul(float g, float u) {
  const float gate = __bfloat162float(__float2bfloat16_rn(g));
  const float up = __bfloat162float(__float2bfloat16_rn(u));
  return gate / (1.0f + expf(-gate)) * up;
}

}  // namespace hostfuse::kernels
