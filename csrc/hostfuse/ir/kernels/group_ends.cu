#include "group_ends.h"
#include "group_rows.cuh"

namespace hostfuse::kernels {

namespace {

// One warp, 32 groups a step (groupRowsOfLane). It replaced a one-thread
// loop expected to wait on each load in turn; ncu on an H100 measured both
// at about 2.9 us for 8 groups, the cost of any launch (docs/perf_log.md,
// 2026-12-05).
__global__ void groupEndsKernel(const int64_t* __restrict__ counts,
                                int64_t groups, int64_t rows,
                                int32_t* __restrict__ ends) {
  const int lane = static_cast<int>(threadIdx.x);
  int64_t carry = 0;
  for (int64_t base = 0; base < groups; base += 32) {
    const GroupRows group =
        groupRowsOfLane(counts, groups, rows, base, lane, carry);
    if (base + lane < groups) {
      ends[base + lane] = static_cast<int32_t>(group.end);
    }
    carry = __shfl_sync(kFullWarpMask, group.end, 31);
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
