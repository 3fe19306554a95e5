// The device path of TopKSoftmax (ir/topk_softmax.h): softmax over each row
// of fp32 logits, its K largest probabilities and their indices, optionally
// renormalized to sum to 1, in one kernel (one warp per row).
//
// Plain C++ and CUDA runtime types only: no torch here (the layering of
// docs/architecture.md). Pointers are device memory; the launch is queued
// on `stream` and returns its error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace hostfuse::kernels {

// The most columns (experts) a row may have: each lane of the row's warp
// holds kTopKSoftmaxMaxColumns / 32 of them in registers.
constexpr int64_t kTopKSoftmaxMaxColumns = 256;

// logits [rows, columns] f32, row-major; writes weights [rows, k] f32 and
// indices [rows, k] i64, largest first; among equal probabilities the
// lower index comes first. 1 <= k <= columns <= kTopKSoftmaxMaxColumns.
cudaError_t launchTopKSoftmax(const float* logits, int64_t rows,
                              int64_t columns, int64_t k, bool renormalize,
                              float* weights, int64_t* indices,
                              cudaStream_t stream);

}  // namespace hostfuse::kernels
