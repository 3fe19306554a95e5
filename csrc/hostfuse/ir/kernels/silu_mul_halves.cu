#include "silu_mul.cuh"
#include "silu_mul_halves.h"

#include <cuda_bf16.h>

namespace hostfuse::kernels {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;

// Four columns a thread per step (8-byte loads of gate and up, one 8-byte
// store), a grid-stride loop over the counted rows' quads.
__global__ void siluMulHalvesKernel(const __nv_bfloat16* __restrict__ product,
                                    int64_t rows, int64_t half,
                                    const int32_t* __restrict__ ends,
                                    int64_t groups,
                                    __nv_bfloat16* __restrict__ out) {
  int64_t counted = rows;
  if (ends != nullptr) {
    const int64_t end = ends[groups - 1];
    counted = end < 0 ? 0 : end < rows ? end : rows;
  }
  const int64_t quads_per_row = half / 4;
  const int64_t quads = counted * quads_per_row;
  for (int64_t q = blockIdx.x * int64_t{kThreads} + threadIdx.x; q < quads;
       q += int64_t{gridDim.x} * kThreads) {
    const int64_t row = q / quads_per_row;
    const int64_t column = (q - row * quads_per_row) * 4;
    const __nv_bfloat16* gate = product + row * 2 * half + column;
    const uint2 g = *reinterpret_cast<const uint2*>(gate);
    const uint2 u = *reinterpret_cast<const uint2*>(gate + half);
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&g);
    const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&u);
    uint2 result;
    __nv_bfloat162* r2 = reinterpret_cast<__nv_bfloat162*>(&result);
    for (int i = 0; i < 2; ++i) {
      const float2 gf = __bfloat1622float2(g2[i]);
      const float2 uf = __bfloat1622float2(u2[i]);
      r2[i] = __floats2bfloat162_rn(siluMul(gf.x, uf.x), siluMul(gf.y, uf.y));
    }
    *reinterpret_cast<uint2*>(out + row * half + column) = result;
  }
}

}  // namespace

cudaError_t launchSiluMulHalves(const void* product, int64_t rows, int64_t half,
                                const int32_t* ends, int64_t groups, void* out,
                                cudaStream_t stream) {
  if (rows < 0 || half < 0 || half % 4 != 0 ||
      (ends != nullptr && groups < 1) ||
      reinterpret_cast<uintptr_t>(product) % 8 != 0 ||
      reinterpret_cast<uintptr_t>(out) % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t quads = rows * (half / 4);
  if (quads == 0) {
    return cudaSuccess;
  }
  const int64_t wanted = (quads + kThreads - 1) / kThreads;
  const int blocks =
      static_cast<int>(wanted < kMaxBlocks ? wanted : kMaxBlocks);
  siluMulHalvesKernel<<<blocks, kThreads, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(product), rows, half, ends, groups,
      static_cast<__nv_bfloat16*>(out));
  return cudaGetLastError();
}

}  // namespace hostfuse::kernels
