#include "skinny_linear.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hostfuse::kernels {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 8;  // channels per 16-byte load

__device__ __forceinline__ void toFloats(const uint4& raw, float* out,
                                         __nv_bfloat16 /*tag*/) {
  const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void toFloats(const uint4& raw, float* out,
                                         __half /*tag*/) {
  const auto* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// A block takes kRows rows of x; thread t takes the chunks t, t + 256, ...
// of those rows and keeps kRows x kOutputs partial sums, each over its
// chunks in order. The warps then reduce their lanes with a fixed butterfly
// and the block sums the warps in order. w (outputs x hidden, small) is read
// from L2 by every block.
template <typename T, int kOutputs, int kRows>
__global__ void __launch_bounds__(kThreads)
    skinnyLinearKernel(const T* __restrict__ x, const T* __restrict__ w,
                       int64_t rows, int64_t hidden, int outputs,
                       float* __restrict__ out) {
  __shared__ float partial[kWarps][kRows * kOutputs];
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t chunks = hidden / kChunk;
  float sum[kRows][kOutputs];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int n = 0; n < kOutputs; ++n) {
      sum[r][n] = 0.0f;
    }
  }
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    float xs[kRows][kChunk];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = first_row + r;
      const uint4 raw =
          row < rows
              ? __ldg(reinterpret_cast<const uint4*>(x + row * hidden) + c)
              : make_uint4(0, 0, 0, 0);
      toFloats(raw, xs[r], T{});
    }
#pragma unroll
    for (int n = 0; n < kOutputs; ++n) {
      if (n < outputs) {
        float ws[kChunk];
        toFloats(__ldg(reinterpret_cast<const uint4*>(w + n * hidden) + c), ws,
                 T{});
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int i = 0; i < kChunk; ++i) {
            sum[r][n] = fmaf(xs[r][i], ws[i], sum[r][n]);
          }
        }
      }
    }
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int n = 0; n < kOutputs; ++n) {
      float s = sum[r][n];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, offset);
      }
      if (lane == 0) {
        partial[warp][r * kOutputs + n] = s;
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kRows * kOutputs; i += kThreads) {
    const int r = i / kOutputs;
    const int n = i % kOutputs;
    const int64_t row = first_row + r;
    if (row < rows && n < outputs) {
      float s = 0.0f;
#pragma unroll
      for (int v = 0; v < kWarps; ++v) {
        s += partial[v][i];
      }
      out[row * outputs + n] = s;
    }
  }
}

template <typename T, int kOutputs, int kRows>
cudaError_t launchFor(const void* x, const void* w, int64_t rows,
                      int64_t hidden, int outputs, float* out,
                      cudaStream_t stream) {
  const int64_t blocks = (rows + kRows - 1) / kRows;
  if (blocks > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  skinnyLinearKernel<T, kOutputs, kRows>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(w), rows, hidden,
          outputs, out);
  return cudaGetLastError();
}

// The sums held per thread stay at 64 or fewer (registers): four rows up to
// 16 outputs, two rows up to 32.
template <typename T>
cudaError_t launchTyped(const void* x, const void* w, int64_t rows,
                        int64_t hidden, int outputs, float* out,
                        cudaStream_t stream) {
  if (outputs <= 8) {
    return launchFor<T, 8, 4>(x, w, rows, hidden, outputs, out, stream);
  }
  if (outputs <= 16) {
    return launchFor<T, 16, 4>(x, w, rows, hidden, outputs, out, stream);
  }
  return launchFor<T, 32, 2>(x, w, rows, hidden, outputs, out, stream);
}

}  // namespace

bool skinnyLinearFits(int64_t outputs, int64_t hidden, const void* x,
                      const void* w) {
  return outputs >= 1 && outputs <= kSkinnyLinearMaxOutputs && hidden > 0 &&
         hidden % kChunk == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

cudaError_t launchSkinnyLinear(SkinnyLinearDtype dtype, const void* x,
                               const void* w, int64_t rows, int64_t hidden,
                               int64_t outputs, float* out,
                               cudaStream_t stream) {
  if (rows < 0 || !skinnyLinearFits(outputs, hidden, x, w)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) {
    return cudaSuccess;
  }
  const int n = static_cast<int>(outputs);
  return dtype == SkinnyLinearDtype::BFloat16
             ? launchTyped<__nv_bfloat16>(x, w, rows, hidden, n, out, stream)
             : launchTyped<__half>(x, w, rows, hidden, n, out, stream);
}

}  // namespace hostfuse::kernels
