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
// from L2 by every block. Rows and outputs past the end are clamped to the
// last one, so that every load is unconditional and a chunk's loads are all
// in flight before its sums (a load under a branch waits for the branch:
// 8 round trips per chunk instead of one); their sums are never written.
template <typename T, int kOutputs, int kRows>
__global__ void __launch_bounds__(kThreads)
    skinnyLinearKernel(const T* __restrict__ x, const T* __restrict__ w,
                       int64_t rows, int64_t hidden, int outputs,
                       float* __restrict__ out) {
  static_assert(kOutputs % 8 == 0);
  __shared__ float partial[kWarps][kRows * kOutputs];
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t chunks = hidden / kChunk;
  const uint4* x_rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = first_row + r < rows ? first_row + r : rows - 1;
    x_rows[r] = reinterpret_cast<const uint4*>(x + row * hidden);
  }
  float sum[kRows][kOutputs];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int n = 0; n < kOutputs; ++n) {
      sum[r][n] = 0.0f;
    }
  }
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    uint4 raw_x[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      raw_x[r] = __ldg(x_rows[r] + c);
    }
#pragma unroll
    for (int group = 0; group < kOutputs; group += 8) {
      uint4 raw_w[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int n = group + j < outputs ? group + j : outputs - 1;
        raw_w[j] = __ldg(reinterpret_cast<const uint4*>(w + n * hidden) + c);
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float xs[kChunk];
        toFloats(raw_x[r], xs, T{});
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          float ws[kChunk];
          toFloats(raw_w[j], ws, T{});
#pragma unroll
          for (int i = 0; i < kChunk; ++i) {
            sum[r][group + j] = fmaf(xs[i], ws[i], sum[r][group + j]);
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

// At most 64 sums per thread (registers). Few rows: two per block, so that
// many blocks share the reading of x; many rows: as many per block as the
// sums allow, so that fewer blocks read w again from L2.
template <typename T>
cudaError_t launchTyped(const void* x, const void* w, int64_t rows,
                        int64_t hidden, int outputs, float* out,
                        cudaStream_t stream) {
  const bool few_rows = rows <= 1024;
  if (outputs <= 8) {
    return few_rows
               ? launchFor<T, 8, 2>(x, w, rows, hidden, outputs, out, stream)
               : launchFor<T, 8, 8>(x, w, rows, hidden, outputs, out, stream);
  }
  if (outputs <= 16) {
    return few_rows
               ? launchFor<T, 16, 2>(x, w, rows, hidden, outputs, out, stream)
               : launchFor<T, 16, 4>(x, w, rows, hidden, outputs, out, stream);
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
