#include "topk_softmax.h"

#include <cuda_fp16.h>

#include <cfloat>
#include <cstring>

namespace hostfuse::kernels {

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;

// Softmax and top-k of one row held by a warp: lane l holds columns l,
// l + 32, ..., l + 32 (kPerLane - 1) of it in `value` (-FLT_MAX where the
// column is past `columns`). Softmax in fp32 with the row's maximum
// subtracted; then k rounds of a warp-wide argmax over the columns not
// taken yet (ties: the lower column wins). Pick p is kept by lane p % 32 in
// slot p / 32 and written once at the end, so that nothing is read back
// from memory. Every array is indexed by unrolled constants only: a dynamic
// index would move it to local memory.
template <int kPerLane>
__device__ void topkSoftmaxOfRow(float (&value)[kPerLane], int lane,
                                 int columns, int k, bool renormalize,
                                 float* __restrict__ weights,
                                 int64_t* __restrict__ indices) {
  float largest = -FLT_MAX;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    largest = fmaxf(largest, value[i]);
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
  }
  float total = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int column = lane + i * kWarp;
    value[i] = column < columns ? expf(value[i] - largest) : 0.0f;
    total += value[i];
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    total += __shfl_xor_sync(0xffffffffu, total, offset);
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    // -1 marks a column that is not there or already taken.
    value[i] = lane + i * kWarp < columns ? value[i] / total : -1.0f;
  }

  float kept_weight[kPerLane];
  int kept_column[kPerLane];
  float picked_sum = 0.0f;
  for (int pick = 0; pick < k; ++pick) {
    float best = -1.0f;
    int best_column = columns;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (value[i] > best) {  // columns rise with i: ties keep the lower
        best = value[i];
        best_column = lane + i * kWarp;
      }
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_column =
          __shfl_xor_sync(0xffffffffu, best_column, offset);
      if (other > best || (other == best && other_column < best_column)) {
        best = other;
        best_column = other_column;
      }
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (lane + i * kWarp == best_column) {
        value[i] = -1.0f;
      }
      if (pick == lane + i * kWarp) {
        kept_weight[i] = best;
        kept_column[i] = best_column;
      }
    }
    picked_sum += best;  // in pick order, the same in every lane
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int pick = lane + i * kWarp;
    if (pick < k) {
      weights[pick] =
          renormalize ? kept_weight[i] / picked_sum : kept_weight[i];
      indices[pick] = kept_column[i];
    }
  }
}

// One warp per row of logits.
template <int kPerLane>
__global__ void topkSoftmaxKernel(const float* __restrict__ logits,
                                  int64_t rows, int columns, int k,
                                  bool renormalize, float* __restrict__ weights,
                                  int64_t* __restrict__ indices) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) {
    return;
  }
  const float* in = logits + row * columns;
  float value[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int column = lane + i * kWarp;
    value[i] = column < columns ? in[column] : -FLT_MAX;
  }
  topkSoftmaxOfRow<kPerLane>(value, lane, columns, k, renormalize,
                             weights + row * k, indices + row * k);
}

template <int kPerLane>
void launchFor(unsigned blocks, const float* logits, int64_t rows, int columns,
               int k, bool renormalize, float* weights, int64_t* indices,
               cudaStream_t stream) {
  topkSoftmaxKernel<kPerLane><<<blocks, kRowsPerBlock * kWarp, 0, stream>>>(
      logits, rows, columns, k, renormalize, weights, indices);
}

// The router: block b computes the logits of tokens kTokens * b, ... and
// hands each token's row to one of its warps for topkSoftmaxOfRow. Thread i
// multiplies 16-byte vectors i, i + kRouterThreads, ... of the tokens' rows
// with the same vectors of every expert's weights (read once per block for
// all kTokens tokens), summing the exact products in fp32 in vector order;
// then each sum over the warp's lanes (xor shuffles) and over the warps in
// warp order: a fixed order, so every run gives the same bits.
constexpr int kRouterThreads = 256;
constexpr int kRouterWarps = kRouterThreads / kWarp;

// Two bf16 or f16 values packed in 32 bits, as fp32 (exactly).
template <bool kHalf>
__device__ __forceinline__ float2 unpackPair(uint32_t bits) {
  if constexpr (kHalf) {
    __half2 pair;
    memcpy(&pair, &bits, sizeof(pair));
    return __half22float2(pair);
  } else {
    return make_float2(__uint_as_float(bits << 16),
                       __uint_as_float(bits & 0xffff0000u));
  }
}

// acc += the dot product of two vectors of 8 values, in element order.
template <bool kHalf>
__device__ __forceinline__ float dot8(const float2 (&x)[4], uint4 w,
                                      float acc) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = unpackPair<kHalf>(words[i]);
    acc = fmaf(x[i].x, pair.x, acc);
    acc = fmaf(x[i].y, pair.y, acc);
  }
  return acc;
}

template <bool kHalf, int kExperts, int kTokens>
__global__ void __launch_bounds__(kRouterThreads)
    routerTopKKernel(const uint4* __restrict__ x,
                     const uint4* __restrict__ router_w, int64_t rows,
                     int vectors, int experts, int k, bool renormalize,
                     float* __restrict__ weights,
                     int64_t* __restrict__ indices) {
  static_assert(kTokens <= kRouterWarps && kExperts <= kWarp);
  __shared__ float partial[kRouterWarps][kTokens][kExperts];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTokens;
  const int64_t tokens = rows - first < kTokens ? rows - first : kTokens;
  float acc[kTokens][kExperts];
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
#pragma unroll
    for (int e = 0; e < kExperts; ++e) {
      acc[t][e] = 0.0f;
    }
  }
  for (int v = threadIdx.x; v < vectors; v += kRouterThreads) {
    uint4 w[kExperts];
#pragma unroll
    for (int e = 0; e < kExperts; ++e) {
      w[e] = e < experts ? router_w[static_cast<int64_t>(e) * vectors + v]
                         : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      if (t < tokens) {
        const uint4 xv = x[(first + t) * vectors + v];
        const float2 xf[4] = {unpackPair<kHalf>(xv.x), unpackPair<kHalf>(xv.y),
                              unpackPair<kHalf>(xv.z), unpackPair<kHalf>(xv.w)};
#pragma unroll
        for (int e = 0; e < kExperts; ++e) {
          acc[t][e] = dot8<kHalf>(xf, w[e], acc[t][e]);
        }
      }
    }
  }
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
#pragma unroll
    for (int e = 0; e < kExperts; ++e) {
      float sum = acc[t][e];
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      }
      if (lane == 0) {
        partial[warp][t][e] = sum;
      }
    }
  }
  __syncthreads();
  if (warp >= tokens) {
    return;
  }
  float value[1] = {-FLT_MAX};
  if (lane < experts) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kRouterWarps; ++w) {
      sum += partial[w][warp][lane];
    }
    value[0] = sum;
  }
  const int64_t row = first + warp;
  topkSoftmaxOfRow<1>(value, lane, experts, k, renormalize, weights + row * k,
                      indices + row * k);
}

template <bool kHalf, int kExperts, int kTokens>
void launchRouterFor(const void* x, const void* router_w, int64_t rows,
                     int vectors, int experts, int k, bool renormalize,
                     float* weights, int64_t* indices, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((rows + kTokens - 1) / kTokens);
  routerTopKKernel<kHalf, kExperts, kTokens>
      <<<blocks, kRouterThreads, 0, stream>>>(
          static_cast<const uint4*>(x), static_cast<const uint4*>(router_w),
          rows, vectors, experts, k, renormalize, weights, indices);
}

// Tokens per block: one while that gives few blocks (the most blocks, for
// the most loads in flight), else as many as keep kTokens * kExperts
// accumulators in registers (64), so that each block's read of the router
// weights serves more tokens.
template <bool kHalf, int kExperts>
void launchRouterFor(const void* x, const void* router_w, int64_t rows,
                     int vectors, int experts, int k, bool renormalize,
                     float* weights, int64_t* indices, cudaStream_t stream) {
  constexpr int kMostTokens = 64 / kExperts;
  if (rows <= kRouterOneTokenRows) {
    launchRouterFor<kHalf, kExperts, 1>(x, router_w, rows, vectors, experts, k,
                                        renormalize, weights, indices, stream);
  } else {
    launchRouterFor<kHalf, kExperts, kMostTokens>(x, router_w, rows, vectors,
                                                  experts, k, renormalize,
                                                  weights, indices, stream);
  }
}

template <bool kHalf>
void launchRouterFor(const void* x, const void* router_w, int64_t rows,
                     int vectors, int experts, int k, bool renormalize,
                     float* weights, int64_t* indices, cudaStream_t stream) {
  if (experts <= 8) {
    launchRouterFor<kHalf, 8>(x, router_w, rows, vectors, experts, k,
                              renormalize, weights, indices, stream);
  } else if (experts <= 16) {
    launchRouterFor<kHalf, 16>(x, router_w, rows, vectors, experts, k,
                               renormalize, weights, indices, stream);
  } else {
    launchRouterFor<kHalf, 32>(x, router_w, rows, vectors, experts, k,
                               renormalize, weights, indices, stream);
  }
}

}  // namespace

cudaError_t launchTopKSoftmax(const float* logits, int64_t rows,
                              int64_t columns, int64_t k, bool renormalize,
                              float* weights, int64_t* indices,
                              cudaStream_t stream) {
  if (columns < 1 || columns > kTopKSoftmaxMaxColumns || k < 1 || k > columns ||
      rows < 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  static_assert(kTopKSoftmaxMaxColumns == 8 * kWarp);
  const auto grid = static_cast<unsigned>(blocks);
  const int n = static_cast<int>(columns);
  const int picks = static_cast<int>(k);
  if (columns <= kWarp) {
    launchFor<1>(grid, logits, rows, n, picks, renormalize, weights, indices,
                 stream);
  } else if (columns <= 2 * kWarp) {
    launchFor<2>(grid, logits, rows, n, picks, renormalize, weights, indices,
                 stream);
  } else if (columns <= 4 * kWarp) {
    launchFor<4>(grid, logits, rows, n, picks, renormalize, weights, indices,
                 stream);
  } else {
    launchFor<8>(grid, logits, rows, n, picks, renormalize, weights, indices,
                 stream);
  }
  return cudaGetLastError();
}

}  // namespace hostfuse::kernels

namespace hostfuse::kernels {

bool routerTopKSupports(const void* x, const void* router_w, int64_t hidden,
                        int64_t experts) {
  const auto aligned = [](const void* pointer) {
    return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
  };
  return hidden >= 8 && hidden % 8 == 0 && hidden / 8 <= 0x7fffffff &&
         experts >= 1 && experts <= kRouterTopKMaxExperts && aligned(x) &&
         aligned(router_w);
}

cudaError_t launchRouterTopK(RouterDtype dtype, const void* x,
                             const void* router_w, int64_t rows, int64_t hidden,
                             int64_t experts, int64_t k, bool renormalize,
                             float* weights, int64_t* indices,
                             cudaStream_t stream) {
  if (!routerTopKSupports(x, router_w, hidden, experts) || k < 1 ||
      k > experts || rows < 0 || rows > 0x7fffffffLL) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) {
    return cudaSuccess;
  }
  const int vectors = static_cast<int>(hidden / 8);
  const int n = static_cast<int>(experts);
  const int picks = static_cast<int>(k);
  if (dtype == RouterDtype::kHalf) {
    launchRouterFor<true>(x, router_w, rows, vectors, n, picks, renormalize,
                          weights, indices, stream);
  } else {
    launchRouterFor<false>(x, router_w, rows, vectors, n, picks, renormalize,
                           weights, indices, stream);
  }
  return cudaGetLastError();
}

}  // namespace hostfuse::kernels
