#include "group_ends.h"

namespace hostfuse::kernels {

namespace {

// One warp, 32 groups a step: lane i loads count base + i, clamps it to
// [0, rows], and an inclusive warp scan gives the running sums. ends =
// min(rows, carry + running sum), where carry is the previous step's last
// end: the same as min(rows, sum of every earlier clamped count), without
// a sum that could overflow (carry <= rows, a step's sum <= 32 rows). It
// replaced a one-thread loop expected to wait on each load in turn; ncu on
// an H100 measured both at about 2.9 us for 8 groups, the cost of any
// launch (docs/perf_log.md, 2026-12-05).
__global__ void groupEndsKernel(const int64_t* __restrict__ counts,
                                int64_t groups, int64_t rows,
                                int32_t* __restrict__ ends) {
  constexpr unsigned kAll = 0xffffffffu;
  const int lane = static_cast<int>(threadIdx.x);
  int64_t carry = 0;
  for (int64_t base = 0; base < groups; base += 32) {
    const int64_t g = base + lane;
    const int64_t count = g < groups ? counts[g] : 0;
    int64_t sum = count <= 0 ? 0 : count < rows ? count : rows;
    for (int offset = 1; offset < 32; offset *= 2) {
      const int64_t below = __shfl_up_sync(kAll, sum, offset);
      if (lane >= offset) {
        sum += below;
      }
    }
    const int64_t end = carry + sum < rows ? carry + sum : rows;
    if (g < groups) {
      ends[g] = static_cast<int32_t>(end);
    }
    carry = __shfl_sync(kAll, end, 31);
  }
}

}  // namespace

cudaError_t launchGroupEnds(const int64_t* counts, int64_t groups, int64_t rows,
                            int32_t* ends, cudaStream_t stream) {
  if (groups < 0 || rows < 0 || rows > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (groups == 0) {
    return cudaSuccess;
  }
  groupEndsKernel<<<1, 32, 0, stream>>>(counts, groups, rows, ends);
  return cudaGetLastError();
}

}  // namespace hostfuse::kernels
