#include "group_ends.h"

namespace hostfuse::kernels {

namespace {

// One thread: at most a thousand groups, a sequential running sum is
// shorter than any parallel scan's set-up.
__global__ void groupEndsKernel(const int64_t* __restrict__ counts,
                                int64_t groups, int64_t rows,
                                int32_t* __restrict__ ends) {
  int64_t end = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t count = counts[g];
    // Once at `rows`, stay there (a huge count cannot wrap the sum).
    end = count > 0 && count < rows - end ? end + count
          : count > 0                     ? rows
                                          : end;
    ends[g] = static_cast<int32_t>(end);
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
  groupEndsKernel<<<1, 1, 0, stream>>>(counts, groups, rows, ends);
  return cudaGetLastError();
}

}  // namespace hostfuse::kernels
