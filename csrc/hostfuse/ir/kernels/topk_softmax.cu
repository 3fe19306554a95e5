#include "topk_softmax.h"

#include <cfloat>

namespace hostfuse::kernels {

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;

// One warp per row; lane l holds columns l, l + 32, ..., l + 32 (kPerLane -
// 1) of it. Softmax in fp32 with the row's maximum subtracted; then k rounds
// of a warp-wide argmax over the columns not taken yet (ties: the lower
// column wins). Pick p is kept by lane p % 32 in slot p / 32 and written
// once at the end, so that nothing is read back from memory. Every array
// is indexed by unrolled constants only: a dynamic index would move it to
// local memory.
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
      weights[row * k + pick] =
          renormalize ? kept_weight[i] / picked_sum : kept_weight[i];
      indices[row * k + pick] = kept_column[i];
    }
  }
}

template <int kPerLane>
void launchFor(unsigned blocks, const float* logits, int64_t rows, int columns,
               int k, bool renormalize, float* weights, int64_t* indices,
               cudaStream_t stream) {
  topkSoftmaxKernel<kPerLane><<<blocks, kRowsPerBlock * kWarp, 0, stream>>>(
      logits, rows, columns, k, renormalize, weights, indices);
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
