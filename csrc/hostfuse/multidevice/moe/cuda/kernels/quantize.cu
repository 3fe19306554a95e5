// fp8 dispatch's quantization on the device (multidevice/moe/fp8.h): one
// warp per (token, block of 128 channels), 4 channels per lane. The
// collective backend computes the same bits with ATen
// (moe::quantizeFp8Packed): the same rounded division for the scale and
// for each value, the same clamp (which keeps a NaN), and the nearest e4m3
// with ties to even.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include <hostfuse/multidevice/moe/fp8.h>
#include <hostfuse/multidevice/moe/cuda/kernels/dispatch_combine.cuh>

namespace hostfuse::moe {

namespace {

constexpr int kQuantThreads = 256;
constexpr int kChannelsPerLane = kFp8Block / 32;
static_assert(kChannelsPerLane == 4);

__device__ __forceinline__ float toFloat(float v) { return v; }
__device__ __forceinline__ float toFloat(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
__device__ __forceinline__ float toFloat(__half v) { return __half2float(v); }

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    quantizeKernel(const T* x, int64_t tokens, int64_t hidden, uint8_t* packed,
                   int64_t packed_row_bytes) {
  const int lane = threadIdx.x & 31;
  const int64_t blocks_per_row = hidden / kFp8Block;
  const int64_t warp =
      (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (warp >= tokens * blocks_per_row) {
    return;  // whole warps leave together
  }
  const int64_t t = warp / blocks_per_row;
  const int64_t block = warp % blocks_per_row;
  const T* in = x + t * hidden + block * kFp8Block + lane * kChannelsPerLane;
  float v[kChannelsPerLane];
  uint32_t amax_bits = 0;
#pragma unroll
  for (int i = 0; i < kChannelsPerLane; ++i) {
    v[i] = toFloat(in[i]);
    // |v| as bits: non-negative floats order like their bits, and a NaN
    // wins the maximum, so it reaches the scale as in ATen's amax.
    amax_bits = max(amax_bits, __float_as_uint(v[i]) & 0x7fffffffu);
  }
  amax_bits = __reduce_max_sync(0xffffffffu, amax_bits);
  const float amax = __uint_as_float(amax_bits);
  // max() would drop a NaN; ATen's clamp_min keeps it.
  const float clamped = amax < kFp8MinAmax ? kFp8MinAmax : amax;
  const float scale = __fdiv_rn(clamped, kFp8Max);
  uint32_t q = 0;
#pragma unroll
  for (int i = 0; i < kChannelsPerLane; ++i) {
    float r = __fdiv_rn(v[i], scale);
    r = r > kFp8Max ? kFp8Max : (r < -kFp8Max ? -kFp8Max : r);
    const uint32_t byte =
        __nv_cvt_float_to_fp8(r, __NV_SATFINITE, __NV_E4M3) & 0xffu;
    q |= byte << (8 * i);
  }
  uint8_t* row = packed + t * packed_row_bytes;
  reinterpret_cast<uint32_t*>(row + block * kFp8Block)[lane] = q;
  if (lane == 0) {
    reinterpret_cast<float*>(row + hidden)[block] = scale;
  }
}

}  // namespace

cudaError_t launchQuantizeFp8(const void* x, ElementType dtype, int64_t tokens,
                              int64_t hidden, void* packed,
                              int64_t packed_row_bytes, cudaStream_t stream) {
  if (hidden % kFp8Block != 0 || packed_row_bytes % 4 != 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t threads = tokens * (hidden / kFp8Block) * 32;
  if (threads == 0) {
    return cudaSuccess;
  }
  const auto grid =
      static_cast<unsigned>((threads + kQuantThreads - 1) / kQuantThreads);
  auto* out = static_cast<uint8_t*>(packed);
  switch (dtype) {
    case ElementType::kFloat32:
      quantizeKernel<<<grid, kQuantThreads, 0, stream>>>(
          static_cast<const float*>(x), tokens, hidden, out, packed_row_bytes);
      break;
    case ElementType::kBFloat16:
      quantizeKernel<<<grid, kQuantThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(x), tokens, hidden, out,
          packed_row_bytes);
      break;
    case ElementType::kFloat16:
      quantizeKernel<<<grid, kQuantThreads, 0, stream>>>(
          static_cast<const __half*>(x), tokens, hidden, out, packed_row_bytes);
      break;
  }
  return cudaGetLastError();
}

}  // namespace hostfuse::moe
