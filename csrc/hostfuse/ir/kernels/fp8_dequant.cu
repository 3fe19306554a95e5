#include "fp8_dequant.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace hostfuse::kernels {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float e4m3ToFloat(uint8_t bits) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(
      static_cast<__nv_fp8_storage_t>(bits), __NV_E4M3)));
}

template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v) {
  return __float2half(v);
}

// The rows the counts cover: each count clamped to [0, rows], the running
// sum kept at most `rows`; `rows` without a limit (row_groups < 0).
// Block-uniform: the first warp sums, the others wait at the barrier.
__device__ __forceinline__ int64_t countedRows(const int64_t* row_counts,
                                               int64_t row_groups,
                                               int64_t rows) {
  if (row_groups < 0) {
    return rows;
  }
  __shared__ int64_t covered;
  if (threadIdx.x < 32) {
    int64_t sum = 0;
    for (int64_t g = threadIdx.x; g < row_groups; g += 32) {
      const int64_t count = row_counts[g];
      sum += count <= 0 ? 0 : count < rows ? count : rows;
      sum = sum < rows ? sum : rows;
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (threadIdx.x == 0) {
      covered = sum < rows ? sum : rows;
    }
  }
  __syncthreads();
  return covered;
}

// One thread per V consecutive channels of a row (V = 8 when every row,
// block and pointer allows 8-byte loads of q, else 1). A group of V never
// straddles two scale blocks: the block width is a multiple of V.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    dequantizeKernel(const uint8_t* __restrict__ q, int64_t q_stride,
                     const float* __restrict__ scales, int64_t scale_stride,
                     int64_t all_rows, int64_t hidden, int64_t block_width,
                     T* __restrict__ out,
                     const int64_t* __restrict__ row_counts,
                     int64_t row_groups) {
  const int64_t rows = countedRows(row_counts, row_groups, all_rows);
  const int64_t groups_per_row = hidden / V;
  const int64_t group =
      static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (group >= rows * groups_per_row) {
    return;
  }
  const int64_t row = group / groups_per_row;
  const int64_t column = (group % groups_per_row) * V;
  const float scale = scales[row * scale_stride + column / block_width];
  const uint8_t* in = q + row * q_stride + column;
  alignas(8) uint8_t bytes[V];
  if constexpr (V == 8) {
    *reinterpret_cast<uint2*>(bytes) = *reinterpret_cast<const uint2*>(in);
  } else {
    bytes[0] = *in;
  }
  alignas(16) T values[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    // __fmul_rn: one rounding to fp32, never contracted with anything.
    values[i] = fromFloat<T>(__fmul_rn(e4m3ToFloat(bytes[i]), scale));
  }
  T* destination = out + row * hidden + column;
  if constexpr (V == 8) {
    // 16 or 32 bytes, aligned (checked at launch).
#pragma unroll
    for (int i = 0; i < static_cast<int>(V * sizeof(T) / 16); ++i) {
      reinterpret_cast<uint4*>(destination)[i] =
          reinterpret_cast<const uint4*>(values)[i];
    }
  } else {
    destination[0] = values[0];
  }
}

template <typename T>
cudaError_t launchFor(const uint8_t* q, int64_t q_stride, const float* scales,
                      int64_t scale_stride, int64_t rows, int64_t hidden,
                      int64_t block_width, void* out, cudaStream_t stream,
                      const int64_t* row_counts, int64_t row_groups) {
  const bool wide = hidden % 8 == 0 && block_width % 8 == 0 &&
                    q_stride % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(q) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t threads = rows * (wide ? hidden / 8 : hidden);
  const int64_t grid = (threads + kThreads - 1) / kThreads;
  if (grid > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (wide) {
    dequantizeKernel<T, 8>
        <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
            q, q_stride, scales, scale_stride, rows, hidden, block_width,
            static_cast<T*>(out), row_counts, row_groups);
  } else {
    dequantizeKernel<T, 1>
        <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
            q, q_stride, scales, scale_stride, rows, hidden, block_width,
            static_cast<T*>(out), row_counts, row_groups);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launchDequantizeFp8Rows(
    const void* q, int64_t q_stride, const float* scales, int64_t scale_stride,
    int64_t rows, int64_t hidden, int64_t blocks, DequantOut dtype, void* out,
    cudaStream_t stream, const int64_t* row_counts, int64_t row_groups) {
  // Row strides may be anything non-negative: the rows are only read (a
  // broadcast row has stride 0).
  if (rows < 0 || hidden < 0 || blocks < 1 || hidden % blocks != 0 ||
      q_stride < 0 || scale_stride < 0 ||
      (row_groups > 0 && row_counts == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || hidden == 0) {
    return cudaSuccess;
  }
  const auto* bytes = static_cast<const uint8_t*>(q);
  const int64_t width = hidden / blocks;
  switch (dtype) {
    case DequantOut::kFloat32:
      return launchFor<float>(bytes, q_stride, scales, scale_stride, rows,
                              hidden, width, out, stream, row_counts,
                              row_groups);
    case DequantOut::kBFloat16:
      return launchFor<__nv_bfloat16>(bytes, q_stride, scales, scale_stride,
                                      rows, hidden, width, out, stream,
                                      row_counts, row_groups);
    case DequantOut::kFloat16:
      return launchFor<__half>(bytes, q_stride, scales, scale_stride, rows,
                               hidden, width, out, stream, row_counts,
                               row_groups);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hostfuse::kernels
