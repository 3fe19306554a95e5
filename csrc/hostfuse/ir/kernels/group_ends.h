// The device path of GroupedMatmul (ir/grouped_matmul.h) needs the end row
// of every group as i32 (what at::_grouped_mm takes): one small kernel
// instead of four ATen operations (clamp, cumsum, clamp, cast).
//
// Plain C++ and CUDA runtime types only: no torch here (the layering of
// docs/architecture.md). Pointers are device memory; the launch is queued
// on `stream` and returns its error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace hostfuse::kernels {

// ends[g] = min(rows, max(counts[0], 0) + ... + max(counts[g], 0)) for g in
// [0, groups): a monotone list that never passes `rows`, whatever the
// counts hold. counts [groups] i64, ends [groups] i32; rows < 2^31.
cudaError_t launchGroupEnds(const int64_t* counts, int64_t groups, int64_t rows,
                            int32_t* ends, cudaStream_t stream);

}  // namespace hostfuse::kernels
