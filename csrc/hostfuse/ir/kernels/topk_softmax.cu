#include "topk_softmax.h"

#include <cfloat>

namespace hostfuse::kernels {

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;
constexpr int kPerLane = kTopKSoftmaxMaxColumns / kWarp;

// Lane l holds columns l, l + 32, l + 64, ... of its warp's row. Softmax in
// fp32 with the row's maximum subtracted; then k rounds of a warp-wide
// argmax over the columns not taken yet (ties: the lower column wins).
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
  float largest = -FLT_MAX;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int column = lane + i * kWarp;
    value[i] = column < columns ? in[column] : -FLT_MAX;
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
    if (best_column % kWarp == lane) {
      value[best_column / kWarp] = -1.0f;
    }
    if (lane == 0) {
      indices[row * k + pick] = best_column;
      weights[row * k + pick] = best;
    }
    picked_sum += best;  // in pick order
  }
  if (renormalize && lane == 0) {
    for (int pick = 0; pick < k; ++pick) {
      weights[row * k + pick] /= picked_sum;
    }
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
  topkSoftmaxKernel<<<static_cast<unsigned>(blocks), kRowsPerBlock * kWarp, 0,
                      stream>>>(logits, rows, static_cast<int>(columns),
                                static_cast<int>(k), renormalize, weights,
                                indices);
  return cudaGetLastError();
}

}  // namespace hostfuse::kernels
