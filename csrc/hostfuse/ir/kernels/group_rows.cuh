// The group table of a grouped GEMM, as one warp computes it on the
// device: each group's rows from its count, 32 groups a step. Used by
// launchGroupEnds (group_ends.cu) and hostfuse's grouped GEMM
// (grouped_gemm_sm90.cu), so both read counts the same way. CUDA only.
#pragma once

#include <cstdint>

namespace hostfuse::kernels {

constexpr unsigned kFullWarpMask = 0xffffffffu;

// The sum of `value` over lanes 0..lane (an inclusive warp scan); every
// lane of the warp must call it.
template <typename V>
__device__ __forceinline__ V warpInclusiveSum(V value, int lane) {
  for (int offset = 1; offset < 32; offset *= 2) {
    const V below = __shfl_up_sync(kFullWarpMask, value, offset);
    if (lane >= offset) {
      value += below;
    }
  }
  return value;
}

// Rows [begin, end) of group base + lane of `groups`: counts clamped to
// [0, rows] and laid out back to back from `carry`, the previous step's
// last end, the ends capped at `rows`. The same as min(rows, sum of every
// earlier clamped count), without a sum that could overflow (carry <=
// rows, a step adds at most 32 x rows). Lanes past the last group get an
// empty range at the step's end. Every lane of the warp must call it.
struct GroupRows {
  int64_t begin = 0;
  int64_t end = 0;
};

__device__ __forceinline__ GroupRows groupRowsOfLane(const int64_t* counts,
                                                     int64_t groups,
                                                     int64_t rows, int64_t base,
                                                     int lane, int64_t carry) {
  const int64_t g = base + lane;
  const int64_t count = g < groups ? counts[g] : 0;
  const int64_t own = count <= 0 ? 0 : count < rows ? count : rows;
  const int64_t sum = carry + warpInclusiveSum(own, lane);
  GroupRows result;
  result.end = sum < rows ? sum : rows;
  result.begin = sum - own < rows ? sum - own : rows;
  return result;
}

}  // namespace hostfuse::kernels
